"""`winnow lemo-fit RUN --model M --out DIR`: LeMo's per-layer block predictors from a run's samples, for
``winnow train ... --set lemo.predictors=DIR`` (the method: :mod:`winnow.trainer.lemo`; the fit:
:mod:`winnow.trainer.lemo_fit`).

The roof's part: resolve the model, check its tokenizer against the samples', read the samples (in stored
order, at most ``max_samples`` of at least two blocks, each cut to ``max_len`` tokens), split off the
held-out ones by a hash of ``sample_id`` (``held_out`` share, at least one), and write ``DIR``:
``lemo_predictors.safetensors`` and ``lemo_predictors.json`` (geometry, layers, the fit's losses, held-out
recall per layer, the model fingerprint). ``--out`` is required and must not lie inside a run or the
model (a rerun replaces its own two files; other files there are refused). The run itself is only read;
the manifest records ``lemo_fit`` with the recall.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from winnow.core.models import check_tokenizer, resolve_model, weights_fingerprint
from winnow.core.steps import Step
from winnow.core.store import RunDir, UserError


@dataclass(kw_only=True)
class LemoFitParams:
    model: str = ""  # builtin:<name> or a local Hugging Face model directory (the one you will train)
    out: str = ""  # folder for lemo_predictors.safetensors + .json (required; outside the run)
    layers: str = ""  # decoder layers ("1,2" or "1-3"); empty: the code's n//2-1 .. n-2 (15..30 of 32)
    block: int = 64  # tokens per block
    keep: float = 0.4  # the keep ratio the held-out recall is measured at
    steps: int = 400  # optimizer steps, one sequence each (the code's 400)
    lr: float = 2e-5  # AdamW rate after 20 warmup steps (the code's; 1e-4, 1e-3 no better: trainer.lemo_fit)
    h1: int = 128  # first hidden width of each predictor side (the code's 128)
    h2: int = 0  # second hidden width; 0: block * head_dim (the code's 64·d)
    held_out: float = 0.2  # share of samples held out for recall (by a hash of sample_id; at least one)
    max_samples: int = 256  # at most this many samples (stored order)
    max_len: int = 16384  # samples are cut to this many tokens (then to whole blocks)
    device: str = "auto"  # auto (cuda when available), cpu, cuda
    threads: int = 1  # CPU intra-op threads (as train's: two threads ran 10-15x slower on a shared 2-core VM)
    seed: int = 0  # seeds the predictors' initialisation and the order of training sequences

    def __post_init__(self) -> None:
        if (
            self.block < 1
            or self.steps < 1
            or self.threads < 1
            or self.h1 < 1
            or self.h2 < 0
            or self.max_samples < 2
        ):
            raise ValueError("block, steps, threads, h1 must be >= 1, h2 >= 0 and max_samples >= 2")
        if not 0.0 < self.keep <= 1.0 or not 0.0 < self.held_out < 1.0 or not self.lr > 0:
            raise ValueError(
                f"keep={self.keep} must be in (0, 1], held_out={self.held_out} in (0, 1), lr > 0"
            )
        if self.max_len < 2 * self.block:
            raise ValueError(f"max_len={self.max_len} must hold at least two blocks of {self.block}")


def _unit(sample_id: str) -> float:
    return int(hashlib.sha256(sample_id.encode()).hexdigest()[:12], 16) / float(1 << 48)


def _check_out(out: Path, run: RunDir, model_dir: Path) -> None:
    from winnow.core.write_guard import enclosing_run
    from winnow.trainer.lemo import META_FILE, PRED_FILE

    target = out.expanduser().resolve()
    inside = enclosing_run(target) or (target if target == Path(run.root).resolve() else None)
    if inside is not None or Path(run.root).resolve() in target.parents:
        raise UserError(f"--out {out} is inside the run {inside or run.root}: choose a folder outside it")
    model = model_dir.resolve()
    if target == model or model in target.parents or target in model.parents:
        raise UserError(f"--out {out} overlaps the model directory {model_dir}; choose another --out")
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {out} is a file: give a folder")
    foreign = (
        sorted(p.name for p in target.iterdir() if p.name not in (PRED_FILE, META_FILE))
        if target.is_dir()
        else []
    )
    if foreign:
        raise UserError(
            f"--out {out} holds other files ({', '.join(foreign[:3])}): give an empty or new folder"
        )


def _samples(run: RunDir, p: LemoFitParams) -> tuple[list, list]:
    import torch

    table = run.table("samples")
    if not table.exists():
        raise UserError(f"{run.root} has no samples: run `winnow ingest` first")
    rows = table.read(columns=["sample_id", "input_ids"]).to_pydict()
    train, held = [], []
    for sid, ids in zip(rows["sample_id"], rows["input_ids"], strict=True):
        n = min(len(ids), p.max_len) // p.block * p.block
        if n < 2 * p.block:
            continue
        (held if _unit(sid) < p.held_out else train).append(torch.tensor(ids[:n], dtype=torch.long))
        if len(train) + len(held) >= p.max_samples:
            break
    if not held and len(train) > 1:
        held.append(train.pop())
    if not train:
        raise UserError(
            f"{run.root}: fewer than 2 samples of at least {2 * p.block} tokens (two blocks of lemo-fit's "
            f"block={p.block}); LeMo is for long documents: ingest longer samples or lower --set block"
        )
    return train, held


def lemo_fit(run: RunDir, p: LemoFitParams) -> dict[str, Any]:
    import torch

    from winnow.core.model_io import resolve_device
    from winnow.trainer.lemo import default_layers, parse_layers, save_predictors
    from winnow.trainer.lemo_fit import fit

    if not p.model or not p.out:
        raise UserError("winnow lemo-fit needs --model (the model you will train) and --out DIR")
    model_dir = resolve_model(p.model)
    out = Path(p.out).expanduser()
    _check_out(out, run, model_dir)
    check_tokenizer(run, model_dir, what="model")
    train, held = _samples(run, p)
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    device = resolve_device(p.device)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True)
    model = model.to(device).eval().requires_grad_(False)
    cfg = model.config
    n = cfg.num_hidden_layers
    if cfg.hidden_size % cfg.num_attention_heads:
        raise UserError(f"{model_dir}: hidden size {cfg.hidden_size} is not a multiple of the head count")
    layers = parse_layers(p.layers, n, "--set layers") if p.layers else default_layers(n)
    before = torch.get_num_threads()
    torch.set_num_threads(p.threads)
    try:
        preds, meta = fit(model, [s.to(device) for s in train], [s.to(device) for s in held], layers, p)
    finally:
        torch.set_num_threads(before)
    meta |= {
        "model": str(model_dir),
        "model_fingerprint": weights_fingerprint(model_dir),
        "seconds": time.perf_counter() - t0,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_predictors(out, preds, meta)
    entry = {"out": str(out), "layers": layers, "recall": meta["recall"], "recall_mean": meta["recall_mean"]}
    run.update_manifest("lemo_fit", entry | {"model": str(model_dir)})
    print(
        f"[winnow] lemo-fit: {len(layers)} layers, {len(train)} + {len(held)} held-out samples, held-out recall "
        f"{meta['recall_mean']:.3f} at keep {p.keep} (untrained {sum(meta['recall_untrained'].values()) / len(layers):.3f}) -> {out}"
    )
    return entry


STEP = Step(
    name="lemo_fit",
    params=LemoFitParams,
    run=lemo_fit,
    help="LeMo's per-layer block predictors (long-context token sparsity) from the run's samples -> --out DIR",
)
