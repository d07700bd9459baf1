"""Which model a spec names, its tokenizer, and the fingerprints that identify both (one place).

Every step that takes a model (ingest, the model and contrast passes, dv4llm's re-ingest of a targets
file) resolves it here, so ``builtin:<name>`` and local directories mean the same thing everywhere and
the error messages are the same.

* **Specs.** ``builtin:<name>`` is one of winnow's own tiny models
  (:data:`winnow.pipeline.builtin.tiny_model.BUILTIN_MODELS`), trained once and cached in
  ``$WINNOW_CACHE/models/<name>-<hash>/``, looked up through :mod:`winnow.core.builtins` (the roof
  registers the provider: the ground floor never imports it); anything else is a local Hugging Face directory written by
  ``save_pretrained`` (there is no hub download: the project runs offline).
* **Tokenizer.** ``AutoTokenizer.from_pretrained`` with ``trust_remote_code`` off unless the user asks;
  its fingerprint is :func:`winnow.core.render.tokenizer_fingerprint` (one definition), recorded in
  the samples table's schema metadata under :data:`FINGERPRINT_KEY`. A model pass refuses a model whose
  tokenizer fingerprints differently (:func:`check_tokenizer`): its token ids would mean other strings.
* **Weights fingerprint** (commit records' ``model_fingerprint``: a pass is redone when the model
  changes, and Rho-1/ssToken refuse two aliases with equal weights). A hash of the tensors (name, dtype,
  shape, data in name order), not of the files: re-saved identical weights fingerprint equal. Up to
  :data:`FULL_HASH_BYTES` of safetensors every data byte is hashed (~1 s per GB here); above that the
  first and last 4 KiB of every tensor's data: any fine-tune, merged LoRA or re-quantisation rewrites
  whole tensors, so it is caught while reading a few MB of a 15 GB model. ``config.json`` is hashed
  separately (:func:`config_fingerprint`) into the pass fingerprint: rope scaling, softcapping and the
  like change outputs without touching weights. Only safetensors are accepted: winnow never unpickles
  weights.

Imports nothing heavy at module level (transformers is loaded by :func:`load_tokenizer` only).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from winnow.core import builtins
from winnow.core.errors import UserError

if TYPE_CHECKING:
    from winnow.core.store import RunDir

BUILTIN_PREFIX = "builtin:"
FINGERPRINT_KEY = b"winnow.tokenizer_fingerprint"
FULL_HASH_BYTES = 512 * 1024 * 1024
_SAMPLE_BYTES = 4096


# ------------------------------------------------------------------------------------- resolving
def resolve_model(spec: str | Path) -> Path:
    """``builtin:<name>`` -> the cached builtin model (built on first use); else a local model directory."""
    spec = str(spec)
    if spec.startswith(BUILTIN_PREFIX):
        return builtins.resolve("model", spec)
    path = Path(spec).expanduser()
    if adapter_base(path) is not None:  # a peft adapter: scored as its base with the adapter merged in
        return path
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise UserError(
            f"model {spec!r}: {path} {what}. Pass a local Hugging Face model directory (one written by "
            f"save_pretrained, with config.json, weights and tokenizer; there is no hub download), or "
            f"builtin:<name> with name one of {builtins.names('model')}"
        )
    return path


def safetensors_files(model_dir: Path) -> list[Path]:
    """The model's ``*.safetensors`` files (sorted); UserError when there are none (no pickle, ever)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise UserError(
            f"{model_dir} has no .safetensors weights; winnow loads safetensors only (never pickled .bin "
            "files). Re-save with `model.save_pretrained(dir, safe_serialization=True)`."
        )
    return files


# ------------------------------------------------------------------------------------- adapters
ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(path: Path) -> Path | None:
    """The base model directory a peft adapter directory names, or None when ``path`` is no adapter."""
    cfg = Path(path) / ADAPTER_CONFIG
    if not cfg.is_file():
        return None
    try:
        base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{cfg}: unreadable adapter config ({e})") from None
    if not base or not (Path(base) / "config.json").is_file():
        raise UserError(
            f"{cfg}: base_model_name_or_path={base!r} is not a local model directory; "
            "point it at the base model's save_pretrained folder"
        )
    return Path(base)


def load_causal_lm(path: Path, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained(path)``; an adapter directory is loaded onto its base and
    merged (peft), so callers such as the model passes see one plain model with the adapter's weights."""
    from transformers import AutoModelForCausalLM

    base = adapter_base(path)
    if base is None:
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    try:
        import peft
    except ModuleNotFoundError:
        raise UserError(f"{path} is a LoRA adapter: loading it needs pip install 'winnow[peft]'") from None
    kind = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("peft_type", "LORA")
    if kind != "LORA":  # prompt tuning has no merged form: its virtual tokens shift every position
        raise UserError(
            f"{path} is a {kind} adapter: model passes score with the base or a LoRA adapter only; "
            "load it with peft's AutoPeftModelForCausalLM.from_pretrained instead"
        )
    model = AutoModelForCausalLM.from_pretrained(str(base), **kwargs)
    return peft.PeftModel.from_pretrained(model, str(path)).merge_and_unload()


# ------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(model_dir: Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved beside ``model_dir``'s weights (an adapter without one: its base's)."""
    from transformers import AutoTokenizer

    base = adapter_base(model_dir)
    if base is not None and not (Path(model_dir) / "tokenizer_config.json").is_file():
        model_dir = base

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{model_dir}: cannot load its tokenizer ({e}). winnow tokenizes with the model's own tokenizer "
            "and checks that token ids mean the same strings everywhere; save it beside the weights "
            "(`tokenizer.save_pretrained(dir)`)."
        ) from None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The samples table's tokenizer fingerprint (defined once, in :mod:`winnow.core.render`)."""
    from winnow.core.render import tokenizer_fingerprint as fp

    return fp(tokenizer)


def samples_tokenizer_fingerprint(run: RunDir) -> str | None:
    """The fingerprint recorded in the committed samples table's schema (None when absent)."""
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


# ------------------------------------------------------------------------------------- weights
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
    files = safetensors_files(model_dir)
    full = sum(f.stat().st_size for f in files) <= FULL_HASH_BYTES
    h = hashlib.sha256()
    base = adapter_base(model_dir)
    if base is not None:  # an adapter means base + adapter: both enter its fingerprint
        h.update(weights_fingerprint(base).encode())
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
    base = adapter_base(model_dir)
    if base is not None:
        return hashlib.sha256(
            (base / "config.json").read_bytes() + (Path(model_dir) / ADAPTER_CONFIG).read_bytes()
        ).hexdigest()[:16]
    return hashlib.sha256(cfg.read_bytes() if cfg.is_file() else b"").hexdigest()[:16]
