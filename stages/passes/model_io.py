"""Loading a causal LM for a model pass: identity checks, fingerprints, and the head check.

* **Security.** Weights load only from safetensors (``use_safetensors=True``: a directory with only
  pickled ``.bin`` weights is refused) and ``trust_remote_code`` stays off unless the user asks.
* **Tokenizer identity.** The samples table records ``winnow.tokenizer_fingerprint``; a model whose
  tokenizer fingerprints differently is refused with :class:`UserError` (exit 2): its token ids would
  mean other strings.
* **Weights fingerprint** (commit records' ``model_fingerprint``: a pass is redone when the model
  changes, and Rho-1/ssToken refuse two aliases with equal weights). A hash of the tensors (name, dtype,
  shape, data in name order), not of the files: re-saved identical weights fingerprint equal. Up to
  :data:`FULL_HASH_BYTES` of safetensors every data byte is hashed (~1 s per GB here); above that the
  first and last 4 KiB of every tensor's data: any fine-tune, merged LoRA or re-quantisation rewrites
  whole tensors, so it is caught while reading a few MB of a 15 GB model. ``config.json`` is hashed
  separately (:func:`config_fingerprint`) into the pass fingerprint: rope scaling, softcapping and the
  like change outputs without touching weights.
* **Body and head.** The pass runs ``model.base_model`` (embeddings, layers, final norm) and applies
  the LM head itself (:mod:`winnow.kernels.chunked_head`). A head applied outside ``forward`` must
  reproduce the model's own post-processing; :func:`check_head` compares it with a full forward on a
  small random input at load time, trying the post-processing the config names (logit scale,
  ``1/logits_scaling``, final softcapping), and refuses with a clear message when none matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from winnow.kernels.chunked_head import LMHead
from winnow.pipeline.store import RunDir, UserError

if TYPE_CHECKING:
    import torch

FULL_HASH_BYTES = 512 * 1024 * 1024
_SAMPLE_BYTES = 4096
DTYPES = ("auto", "float32", "bfloat16", "float16")
FINGERPRINT_KEY = b"winnow.tokenizer_fingerprint"


# ------------------------------------------------------------------------------------- identity
def resolve_model_dir(spec: str) -> Path:
    """``builtin:<name>`` or a local Hugging Face directory -> its path (UserError when missing)."""
    try:
        from winnow.pipeline.builtin.tiny_model import resolve_model
    except ModuleNotFoundError as e:  # pragma: no cover - the builtin models ship with winnow
        if spec.startswith("builtin:"):
            raise UserError(f"model {spec!r}: builtin models are not available ({e})") from None
        path = Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(
                f"model {spec!r}: {path} is not a Hugging Face model directory (no config.json)"
            ) from None
        return path
    return resolve_model(spec)


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{model_dir}: cannot load its tokenizer ({e}). A model pass needs the model's tokenizer to check "
            "that token ids mean the same strings as in the samples table; save it beside the weights."
        ) from None


def tokenizer_fingerprint(tokenizer) -> str:
    """The samples table's tokenizer fingerprint (one definition: ``winnow.pipeline.render``)."""
    from winnow.pipeline.render import tokenizer_fingerprint as fp

    return fp(tokenizer)


def samples_tokenizer_fingerprint(run: RunDir) -> str | None:
    schema = run.table("samples").schema()
    if schema is None:
        raise UserError(f"{run.root} has no committed samples: run `winnow ingest` first")
    raw = (schema.metadata or {}).get(FINGERPRINT_KEY)
    return raw.decode() if isinstance(raw, bytes) else raw


def check_tokenizer(
    run: RunDir, model_dir: Path, trust_remote_code: bool = False, what: str = "model"
) -> str:
    """Refuse (UserError, exit 2) a model whose tokenizer differs from the one that made the samples."""
    want = samples_tokenizer_fingerprint(run)
    if want is None:
        raise UserError(
            f"the samples table of {run.root} records no tokenizer fingerprint (schema metadata "
            f"{FINGERPRINT_KEY.decode()}); re-run `winnow ingest` so model passes can check token ids"
        )
    have = tokenizer_fingerprint(load_tokenizer(model_dir, trust_remote_code))
    if have != want:
        raise UserError(
            f"{what} {model_dir} has a different tokenizer (fingerprint {have}) from the one the samples were "
            f"tokenized with ({want}): its token ids would mean other strings. Score with a model that shares "
            f"the samples' tokenizer, or ingest again with `--model {model_dir}`."
        )
    return have


def _tensor_index(files: list[Path]) -> list[tuple[str, Path, dict, int]]:
    """``(name, file, header entry, data start)`` of every tensor over the safetensors shards, by name."""
    out = []
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        out += [(name, f, info, 8 + n) for name, info in header.items() if name != "__metadata__"]
    return sorted(out, key=lambda t: t[0])


def weights_fingerprint(model_dir: Path) -> str:
    """Hash of a model directory's tensors: each tensor's name, dtype, shape and data, in name order.

    File names, the split into shards, header metadata and ``config.json`` do not enter it, so the same
    weights re-saved (another transformers version, another shard size) fingerprint equal: stages that
    refuse two passes of the same weights (Rho-1, ssToken) compare this. Above :data:`FULL_HASH_BYTES`
    only the first and last 4 KiB of each tensor's data are hashed (see the module docstring).
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise UserError(
            f"{model_dir} has no .safetensors weights; winnow loads safetensors only (never pickled .bin "
            "files). Convert with `model.save_pretrained(dir, safe_serialization=True)`."
        )
    full = sum(f.stat().st_size for f in files) <= FULL_HASH_BYTES
    h = hashlib.sha256()
    handles = {f: open(f, "rb") for f in files}  # noqa: SIM115  (closed below)
    try:
        for name, f, info, base in _tensor_index(files):
            h.update(json.dumps([name, info["dtype"], info["shape"]]).encode())
            a, b = info["data_offsets"]
            spans = (
                [(a, b)]
                if full
                else [(off, min(off + _SAMPLE_BYTES, b)) for off in sorted({a, max(a, b - _SAMPLE_BYTES)})]
            )
            for lo, hi in spans:
                handles[f].seek(base + lo)
                h.update(handles[f].read(hi - lo))
    finally:
        for fh in handles.values():
            fh.close()
    return h.hexdigest()[:32]


def config_fingerprint(model_dir: Path) -> str:
    """Hash of ``config.json`` (rope scaling, softcapping and the like change outputs without touching
    weights): part of a pass's commit fingerprint beside :func:`weights_fingerprint`."""
    cfg = Path(model_dir) / "config.json"
    return hashlib.sha256(cfg.read_bytes() if cfg.is_file() else b"").hexdigest()[:16]


# ------------------------------------------------------------------------------------- loading
def resolve_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"device={device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device!r} but no CUDA device is available; use device=cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: fp32 on CPU (bf16 is ~27x slower on this CPU), bf16 on GPUs that support it."""
    import torch

    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def flash_attention_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


@dataclass
class LoadedModel:
    model: Any  # the *ForCausalLM module, eval mode
    body: Any  # model.base_model: embeddings + layers + final norm
    head: LMHead  # fp32 copy of the LM head with the model's post-processing
    path: Path
    fingerprint: str
    device: torch.device
    dtype: torch.dtype
    layout: str  # "padded" | "packed" (see winnow.stages.passes.batching)

    @property
    def attn_implementation(self) -> str:
        return str(self.model.config._attn_implementation)

    @property
    def hidden_size(self) -> int:
        return int(self.head.weight.shape[1])

    @property
    def pad_id(self) -> int:
        pad = getattr(self.model.config, "pad_token_id", None)
        return int(pad) if isinstance(pad, int) and 0 <= pad < self.head.vocab_size else 0


def load_model(
    model_dir: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    layout: str = "auto",
    trust_remote_code: bool = False,
    fingerprint: str | None = None,
) -> LoadedModel:
    """Load ``model_dir`` for scoring and verify its head (UserError when it cannot be scored exactly)."""
    import torch
    from transformers import AutoModelForCausalLM

    # FlashAttention kernels take fp16/bf16 only; an fp32 GPU pass stays on SDPA with padded batches
    flash = flash_attention_available(device) and dtype in (torch.bfloat16, torch.float16)
    if layout == "auto":
        layout = "packed" if flash else "padded"
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if flash and layout == "packed":
        kwargs["attn_implementation"] = "flash_attention_2"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {model_dir} as a causal LM: {e}") from None
    model.to(device).eval()
    model.config.use_cache = False  # a KV cache would make packed samples attend to each other
    body = model.base_model
    out_emb = model.get_output_embeddings()
    if body is model or out_emb is None or not hasattr(out_emb, "weight"):
        raise UserError(
            f"{model_dir} ({type(model).__name__}) has no separable body and linear LM head; winnow applies "
            "the head itself to avoid full logits and cannot score this architecture"
        )
    head = LMHead(out_emb.weight, getattr(out_emb, "bias", None))
    with torch.inference_mode():
        head = check_head(model, body, head, device=device, dtype=dtype, where=str(model_dir))
    return LoadedModel(
        model=model,
        body=body,
        head=head.to_fp32(),
        path=Path(model_dir),
        fingerprint=fingerprint or weights_fingerprint(model_dir),
        device=device,
        dtype=dtype,
        layout=layout,
    )


def _postproc_candidates(config) -> list[tuple[float, float | None]]:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(cfg, "final_logit_softcapping", None) or None
    scales = [1.0]
    for name, values in (("logit_scale", "mul"), ("logits_scaling", "both")):
        v = getattr(cfg, name, None)
        if isinstance(v, (int, float)) and v not in (0, 1):
            scales += [float(v)] if values == "mul" else [1.0 / float(v), float(v)]
    out = []
    for s in scales:
        out += [(s, softcap)] if softcap else []
        out += [(s, None)]
    return out


def check_head(model, body, head: LMHead, *, device, dtype, where: str, seq: int = 12) -> LMHead:
    """Return ``head`` with the post-processing that reproduces ``model(...).logits``; refuse otherwise.

    Both sides run in the model's dtype on the same random input, so the only way they can differ
    is a different computation (not precision): tolerance 1e-4 (fp32) / 2e-2 (half) of the logit scale.
    """
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, head.vocab_size, (2, seq), generator=g).to(device)
    ref = model(input_ids=ids, use_cache=False).logits  # (2, seq, V)
    hid = body(input_ids=ids, use_cache=False).last_hidden_state
    tol = (1e-4 if dtype == torch.float32 else 2e-2) * (1.0 + float(ref.float().abs().max()))
    best = float("inf")
    for scale, softcap in _postproc_candidates(model.config):
        cand = LMHead(head.weight, head.bias, scale, softcap)
        diff = float((cand.logits(hid, dtype=ref.dtype).float() - ref.float()).abs().max())
        if diff <= tol:
            return cand
        best = min(best, diff)
    raise UserError(
        f"{where}: applying its LM head outside model.forward does not reproduce the model's logits (max "
        f"difference {best:.3g}, tolerance {tol:.3g}); {type(model).__name__} post-processes logits in a way "
        "winnow does not know (known: logit_scale, logits_scaling, final_logit_softcapping), so its "
        "log-probs would be wrong. Please report the architecture."
    )
