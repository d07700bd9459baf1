"""Loading a causal LM for a model pass: device, dtype, body and head, and the head check.

* **Security.** Weights load only from safetensors (``use_safetensors=True``: a directory with only
  pickled ``.bin`` weights is refused) and ``trust_remote_code`` stays off unless the user asks.
* **Identity** (which directory a spec names, tokenizer check, weights fingerprint) lives in
  :mod:`winnow.pipeline.models`, shared with ingest.
* **Body and head.** The pass runs ``model.base_model`` (embeddings, layers, final norm) and applies
  the LM head itself (:mod:`winnow.kernels.chunked_head`). A head applied outside ``forward`` must
  reproduce the model's own post-processing; :func:`check_head` compares it with a full forward on a
  small random input at load time, trying the post-processing the config names (logit scale,
  ``1/logits_scaling``, final softcapping), and refuses with a clear message when none matches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from winnow.kernels.chunked_head import LMHead
from winnow.pipeline.errors import UserError
from winnow.pipeline.models import load_causal_lm, weights_fingerprint

if TYPE_CHECKING:
    import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


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
    if dev.type not in ("cpu", "cuda", "mps"):  # meta and friends hold no data: loading then crashes
        raise UserError(f"device={device!r} cannot run a model; use auto, cpu, cuda or cuda:N")
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

    # FlashAttention kernels take fp16/bf16 only; an fp32 GPU pass stays on SDPA with padded batches
    flash = flash_attention_available(device) and dtype in (torch.bfloat16, torch.float16)
    if layout == "auto":
        layout = "packed" if flash else "padded"
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if flash and layout == "packed":
        kwargs["attn_implementation"] = "flash_attention_2"
    try:
        model = load_causal_lm(model_dir, **kwargs)
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
