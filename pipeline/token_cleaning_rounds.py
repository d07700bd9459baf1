"""Self-evolving Token Cleaning (Pang et al., ICML 2025, Algorithm 1; ALGORITHMS_TRAINING.md §3): a step
that alternates cleaning and fine-tuning over T+1 parts of the pool.

The pool is split, in stored order (shard, then row), into ``rounds + 1`` contiguous parts D_0..D_T
(row r of N goes to part ``⌊r·(T+1)/N⌋``). With θ_0 = ``model`` (the base, whose model pass over the
pool is ``signals/<base>``):

```
round 0:  θ_1 ← fine-tune(θ_0, D_0, every supervised token)
round t:  score D_t with ℓ_θ0 − ℓ_θt; keep its top rho (level global: of the part; sample: of each sample);
          θ_{t+1} ← fine-tune(θ_t, cleaned D_t)          for t = 1..T
```

so the base stays fixed and the reference is always the latest model, as in the authors' script. Each
round's selection is a table, ``selection/<name>-round<t>`` (rows outside D_t are dropped with reason
``other_part``; kept ones carry ``round<t>``), and each round's model is ``RUN/train/<name>-round<t>/``,
trained by the `train` step with the ``[train]`` parameters (``model``, ``selection`` and ``name`` are set
by the round). The latest model's losses on D_t are computed in memory (only D_t is scored, one forward
of a model pass; ``token_budget``, ``device``); the selection runs on
:func:`winnow.stages.token_cleaning_math.token_cleaning_select`, the function of the fixed-model stage.

Resumable after a kill at any point: a round whose selection is committed with the same fingerprint (its
parameters and the weights fingerprint of θ_t) is not rescored, and a round whose training finished is
skipped by the trainer (a killed training resumes from its last checkpoint). Every file is written
atomically by the store and the trainer. Deviations from the code: the authors fine-tune a fresh LoRA
each round and merge it; here each round continues full fine-tuning from the saved θ_t (LoRA is refused:
its output is an adapter, not a model to continue from). What it keeps overall is not rho: D_0 keeps
every token, so with T = 4 and rho = 0.6 about 1/5 + 4/5·0.6 = 68% of the supervised tokens.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from winnow.core.markdown import md_table
from winnow.core.models import resolve_model, weights_fingerprint
from winnow.core.steps import Step
from winnow.core.store import RunDir, UserError
from winnow.core.write_guard import check_name
from winnow.stages import stage_io as io
from winnow.stages.select_policy import _always_keep
from winnow.stages.select_policy import _shard_table as selection_shard
from winnow.stages.token_cleaning_math import LEVELS, token_cleaning_select
from winnow.trainer.config import TrainParams

CODE_VERSION = "token_cleaning_rounds/1"
SET_BY_ROUND = ("model", "selection", "name", "out", "data")


@dataclass(kw_only=True)
class RoundsParams:
    """Parameters of the self-evolving rounds (recipes/token_cleaning.toml; ``[train]`` for the fine-tuning)."""

    model: str = ""  # θ_0: the base model (builtin:<name> or a directory); round 0 trains from it
    base: str = "base"  # signals alias of θ_0's model pass over the pool (ℓ_base)
    rounds: int = 4  # T: the pool is split into T+1 parts (the code's 5 subsets)
    rho: float = 0.6  # share of each cleaned part's response tokens kept
    level: str = "global"  # global: top rho of the part; sample: top rho of each sample
    name: str = "token_cleaning"  # selection/<name>-round<t>/ and RUN/train/<name>-round<t>/
    token_budget: int = 0  # tokens per scoring forward; 0 = 4096 on CPU, 16384 on GPU
    device: str = "auto"  # where θ_t scores D_t
    # texts whose supervised tokens every round keeps (as `select --always-keep`), e.g. ["<|im_end|>", "####"]
    always_keep: list[str] = field(default_factory=list)
    train: TrainParams = field(default_factory=TrainParams)  # every round's fine-tuning

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model is required: the base model θ_0 (builtin:<name> or a local directory)")
        if self.rounds < 1:
            raise ValueError(f"rounds={self.rounds} must be >= 1 (T cleaned parts after part 0)")
        if not 0.0 < self.rho <= 1.0:
            raise ValueError(f"rho={self.rho} must be in (0, 1]; e.g. rho = 0.6")
        if self.level not in LEVELS:
            raise ValueError(f"level={self.level!r} must be one of {list(LEVELS)}")
        self.name = check_name(self.name)
        set_here = [k for k in SET_BY_ROUND if getattr(self.train, k)]
        if set_here:
            raise ValueError(f"train.{set_here[0]} is set by each round; remove it from [train]")
        if self.train.lora.enabled:
            raise ValueError(
                "train.lora: each round continues from the saved full model; LoRA is not supported"
            )


@dataclass
class RoundSelection:
    """What one round's selection depends on (its fingerprint)."""

    policy: str
    round: int
    rounds: int
    rho: float
    level: str
    base: str
    reference: str  # θ_t's directory ("" in round 0)
    reference_fingerprint: str
    always_keep: list[str]


def part_of_rows(n: int, rounds: int) -> np.ndarray:
    """Part index of each of ``n`` rows in stored order: ``⌊r·(T+1)/n⌋`` (contiguous, sizes differ by ≤ 1)."""
    return (np.arange(n, dtype=np.int64) * (rounds + 1)) // max(n, 1)


def _check_base(run: RunDir, p: RoundsParams, parts: list[int]) -> None:
    """signals/<base> exists for every shard and was computed from ``model`` (θ_0)."""
    io.require_signals(run, p.base, ["logprob"], parts)
    want = weights_fingerprint(resolve_model(p.model))
    got = io.model_fingerprints(run, p.base)
    if got and got != {want}:
        raise UserError(
            f"signals/{p.base} was computed with another model than model={p.model!r}: rerun "
            f"`{io.signals_command(run, p.base, ['logprob'])}` with --model {p.model}"
        )


def _scores(run: RunDir, part: int, rows: np.ndarray, base: str, loaded: Any, budget: int) -> tuple:
    """(nll_base, nll_latest, scored mask) padded (B, T) for the ``rows`` of samples shard ``part``."""
    from winnow.stages.passes.model_scoring import score_samples, split_lists

    shard = io.read_shard(run, part, {base: ["logprob"]}, ["input_ids"])
    take = np.flatnonzero(rows)
    ids = split_lists(shard.samples["input_ids"], np.int64)
    seqs = [ids[i] for i in take]
    masks = [shard.loss_mask[i, : len(ids[i])].astype(np.uint8) for i in take]
    res = score_samples(loaded, seqs, masks, signals=["logprob"], token_budget=budget)
    latest = np.full((len(take), shard.loss_mask.shape[1]), np.nan)
    for j, (a, b) in enumerate(zip(*_bounds(seqs), strict=True)):
        latest[j, : b - a] = np.where(res.valid[a:b], res.values["logprob"][a:b], np.nan)
    lp_base = shard.signals[(base, "logprob")][take]
    mask = shard.loss_mask[take] & ~np.isnan(lp_base) & ~np.isnan(latest)
    return -lp_base, -latest, mask


def _bounds(seqs: list[np.ndarray]) -> tuple[list[int], list[int]]:
    ends = np.cumsum([len(s) for s in seqs]).tolist()
    return [e - len(s) for e, s in zip(ends, seqs, strict=True)], ends


def _cleaned(
    run: RunDir, p: RoundsParams, where: dict[int, np.ndarray], latest: Path
) -> dict[int, np.ndarray]:
    """Per shard, the (B_in_part, T) kept tokens of D_t: global top rho of the part or per sample."""
    import torch

    from winnow.core.model_io import load_model, resolve_device, resolve_dtype
    from winnow.stages.passes.pass_step import auto_token_budget

    device = resolve_device(p.device)
    loaded = load_model(latest, device=device, dtype=resolve_dtype("auto", device))
    budget = auto_token_budget(p.token_budget, device)
    got = {
        part: _scores(run, part, rows, p.base, loaded, budget) for part, rows in where.items() if rows.any()
    }
    if p.level == "sample":
        pick = lambda b, r, m: token_cleaning_select(b, r, m, p.rho, "sample")[1]  # noqa: E731
        return {k: pick(*(torch.from_numpy(x) for x in v)).numpy() for k, v in got.items()}
    flat = [np.concatenate([v[i][v[2]] for v in got.values()])[None] for i in (0, 1)]
    _, keep = token_cleaning_select(
        *map(torch.from_numpy, flat), torch.ones(flat[0].shape, dtype=torch.bool), p.rho
    )
    out, at = {}, 0
    for part, (_, _, mask) in got.items():  # back to each shard's scored positions, in the same order
        k = np.zeros(mask.shape, bool)
        k[mask] = keep.numpy()[0, at : at + int(mask.sum())]
        out[part], at = k, at + int(mask.sum())
    return out


def _write_round(
    run: RunDir, p: RoundsParams, t: int, where: dict[int, np.ndarray], latest: Path | None
) -> dict:
    """Commit ``selection/<name>-round<t>`` unless it is fresh; returns its manifest entry."""
    ref_fp = weights_fingerprint(latest) if latest is not None else ""
    spec = RoundSelection(
        "token_cleaning_rounds", t, p.rounds, p.rho, p.level, p.base, str(latest or ""), ref_fp, p.always_keep
    )
    sel = f"{p.name}-round{t}"
    st = io.StageOutput(
        run, "select", spec, CODE_VERSION, time.time(), table=f"selection/{sel}", key=f"select:{sel}"
    )
    parts = list(where)
    inputs = io.table_inputs(run, [io.SAMPLES, f"signals/{p.base}"])
    floor_ids, meta = _always_keep(run, p)
    io.drop_orphans(st.out, parts)
    if io.all_fresh(st.out, parts, st.fp, inputs):
        return st.finish(len(parts))
    kept = _cleaned(run, p, where, latest) if latest is not None else {}
    for part, rows in where.items():
        columns = ["sample_id", "n_tokens", "loss_mask"] + (["input_ids"] if p.always_keep else [])
        cols = run.table(io.SAMPLES).read_part(part, columns=columns)
        n_tokens = cols["n_tokens"].to_numpy()
        weight = np.zeros((len(n_tokens), int(n_tokens.max(initial=0))), np.float32)
        within = np.arange(weight.shape[1])[None, :] < n_tokens[:, None]
        if latest is None:  # round 0: every supervised token of D_0 (the loss mask multiplies it in)
            weight[rows] = 1.0
        elif part in kept:
            weight[rows, : kept[part].shape[1]] = kept[part]
        ids = cols["sample_id"].to_pylist()
        keep = {sid: bool(r) for sid, r in zip(ids, rows, strict=True)}
        why = {sid: f"round{t}" if r else "other_part" for sid, r in zip(ids, rows, strict=True)}
        table = selection_shard(cols, keep, why, weight[within], f"token_cleaning_rounds:{t}", floor_ids)
        table = table.replace_schema_metadata(meta)
        counts = {"samples": len(ids), "kept": int(np.asarray(table["keep"]).sum())}
        st.commit(
            part, table, inputs, counts | {"weighted_tokens": int(np.asarray(table["n_weighted"]).sum())}
        )
    return st.finish(len(parts))


def _summary(run: RunDir, parts: list[int], rounds: list[dict], latest: Path, started: float) -> dict:
    """The rounds' manifest entry: each round, the last model and the kept share of the pool's tokens."""
    supervised = sum(
        int(np.asarray(run.table(io.SAMPLES).read_part(q, columns=["n_loss_tokens"])["n_loss_tokens"]).sum())
        for q in parts
    )
    weighted = sum(r["weighted_tokens"] or 0 for r in rounds)
    entry = {
        "step": "token_cleaning_rounds",
        "rounds": rounds,
        "model": str(latest),
        "counts": {
            "supervised_tokens": supervised,
            "weighted_tokens": weighted,
            "kept_share": weighted / supervised if supervised else None,
        },
        "wall_s": round(time.time() - started, 1),
    }
    return entry


def run_rounds(run: RunDir, p: RoundsParams) -> dict[str, Any]:
    """Rounds 0..T: select D_t (all tokens, then cleaned by θ_0 vs θ_t), train θ_{t+1} from θ_t."""
    from winnow.core.dist import init_distributed
    from winnow.pipeline.train import train

    # under torchrun rank 0 scores and writes each round, every rank trains (DDP); the broadcast of the
    # round's entry comes after rank 0 saved θ_t, so no rank trains from a model not yet written
    d = init_distributed("cpu")
    started = time.time()
    records = run.table(io.SAMPLES).records()
    if not records:
        raise UserError(f"{run.root} has no samples: run `winnow ingest` first")
    parts = [r.part for r in records]
    _check_base(run, p, parts)
    n = sum(r.rows for r in records)
    if n < p.rounds + 1:
        raise UserError(f"{run.root} has {n} samples: too few for rounds={p.rounds} (one part per round)")
    part_of = part_of_rows(n, p.rounds)
    starts = np.cumsum([0, *(r.rows for r in records)])
    latest, rounds = resolve_model(p.model), []
    for t in range(p.rounds + 1):
        where = {part: part_of[starts[i] : starts[i + 1]] == t for i, part in enumerate(parts)}
        entry = d.broadcast(_write_round(run, p, t, where, latest if t else None) if d.main else None)
        sel = f"{p.name}-round{t}"
        res = train(dataclasses.replace(p.train, model=str(latest), selection=sel, name=sel), run.root)
        latest = Path(res["out"])
        c = entry.get("counts", {})
        rounds.append(
            {
                "round": t,
                "selection": sel,
                "model": str(latest),
                "kept": c.get("kept"),
                "weighted_tokens": c.get("weighted_tokens"),
                "eval_loss": res.get("eval_loss"),
                "skipped": bool(res.get("skipped")),
            }
        )
        if d.main:
            print(
                f"[winnow] token_cleaning round {t}: {c.get('weighted_tokens')} weighted tokens -> {latest}"
            )
    entry = _summary(run, parts, rounds, latest, started)
    if d.main:
        run.update_manifest(f"token_cleaning_rounds:{p.name}", entry)
    return entry


def card_section(card: Any, spec: Any) -> list[str]:
    """The card's rounds table: per round, the part's kept samples and weighted tokens, the model, eval loss."""
    lines = []
    for key, entry in sorted(card.man.get("steps", {}).items()):
        if not key.startswith(f"{spec.name}:"):
            continue
        rows = [
            [r["round"], r["selection"], r["kept"], r["weighted_tokens"], r["eval_loss"]]
            for r in entry["rounds"]
        ]
        c = entry["counts"]
        lines += [
            f"### Self-evolving Token Cleaning `{key.split(':', 1)[1]}`: what each round kept",
            "",
            f"**{c['weighted_tokens']} of {c['supervised_tokens']}** supervised tokens of the pool weighted over "
            f"all rounds ({c['kept_share']:.1%}: part 0 keeps every token). Final model: `{entry['model']}`.",
            "",
            md_table(["round", "selection", "kept samples", "weighted tokens", "eval_loss after"], rows),
            "",
        ]
    return lines


STEP = Step(name="token_cleaning_rounds", params=RoundsParams, run=run_rounds)
