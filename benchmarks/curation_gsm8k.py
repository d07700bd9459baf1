"""Real wrong answers: a scored winnow run over model-written GSM8K solutions, for the curation benchmark.

``prepare_gsm8k(workdir, quick)`` builds everything ``benchmarks/curation.py`` needs for its GSM8K half
(issue 15, item 3b) and ``main()`` prints how well each stage's score separates incorrect from correct
solutions (AUROC). Data: ``../shared/data/gsm8k/`` (``model_solutions_even.jsonl``: 2,640 solutions by
four GPT-3 solvers, four per even-numbered test question, 986 correct; ``test.jsonl``; ``train.jsonl``).

Splits (deterministic, by index; nothing random):

| part | rows | used for |
|---|---|---|
| scored half | solutions, ``test_index % 4 == 0`` (330 questions, 1,320 rows) | the scored run |
| contrast half | solutions, ``test_index % 4 == 2`` (the other 330 even questions) | cDPO pos./neg. |
| eval | reference answers of the *odd* test questions (659) | the benchmark's held-out loss |
| train ``i % 3 == 0`` | GSM8K train reference answers | warm (``current``) model |
| train ``i % 3 == 1`` | GSM8K train reference answers, another subset | Rho-1 ``reference`` |
| train ``i % 3 == 2`` | the first ``target_rows``: DV4LLM targets; the next 64: the models' eval | targets |

Nothing trained on even-question solutions is ever evaluated on even questions: the eval file holds only
odd ones (a test checks it against ``test.jsonl``). ``--quick`` keeps the first 60 questions of each half
and the first 120 odd questions.

Models, all made by ``winnow train`` (the project's one loop), all from the same base (``builtin:tiny`` by
default, 1.0M parameters, byte-level BPE trained on the demo data: GSM8K text encodes in ~226 tokens
per chat at the median, 1,602 at most; one solution over the base's 1,024 positions is rejected at ingest):

| role (alias) | trained on | steps (full / quick) |
|---|---|---|
| history | the base itself | - |
| current (warm) | base + GSM8K train ``i % 3 == 0`` answers | 100 / 30 |
| reference | base + GSM8K train ``i % 3 == 1`` answers (a disjoint subset), twice as long | 200 / 60 |
| positive / negative | base + correct / incorrect solutions of the contrast half | 80 / 30 each |

The warm model is trained half as long as the reference (it stands in for a model part-way through
fine-tuning), so the Rho-1 and ssToken contrasts measure training progress on the task, not two equally
trained copies. The scored run then runs ``recipes/quickstart.toml``'s model passes and stages with the
same step names and parameters (only the models, the inputs and DV4LLM's targets change), so ``winnow
select`` policies and the quickstart's composed selection apply unchanged. Measured numbers are in
``benchmarks/RESULTS.md`` ("GSM8K: detecting real wrong answers"): on the full half no stage beats the
answer's length (AUROC 0.632; best stage sstoken 0.615; within length quintiles 0.48-0.59), the warm
model solves no odd question, and the whole prepare took 35 min on the loaded 2-core VM (load 11-19),
half of it model builds (warm 150 -> 100, reference 300 -> 200, cDPO pair 120 -> 80 steps were cut).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"
SOLUTIONS = "model_solutions_even.jsonl"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one prepare builds; ``quick`` shrinks every number."""

    questions: int | None  # questions per even half (None: all 330)
    warm_rows: int
    warm_steps: int
    ref_rows: int
    ref_steps: int
    contrast_steps: int
    target_rows: int
    model_eval_rows: int = 64
    tokens_per_batch: int = 4096
    lr: float = 1e-3


FULL = Sizes(questions=None, warm_rows=2000, warm_steps=100, ref_rows=2000, ref_steps=200,
             contrast_steps=80, target_rows=200)
QUICK = Sizes(questions=60, warm_rows=300, warm_steps=30, ref_rows=300, ref_steps=60, contrast_steps=30,
              target_rows=50, model_eval_rows=32)


# ------------------------------------------------------------------------------------------ splits


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def even_halves(solutions: list[dict[str, Any]], questions: int | None = None) -> tuple[list, list]:
    """(scored, contrast): solutions of questions ``test_index % 4 == 0`` and ``% 4 == 2``; with
    ``questions``, only the first that many questions of each half (by ``test_index``)."""
    odd = sorted({s["test_index"] for s in solutions if s["test_index"] % 2})
    if odd:
        raise ValueError(f"{SOLUTIONS} holds odd test questions {odd[:5]}: the even/odd split would leak")
    halves = []
    for rest in (0, 2):
        qs = sorted({s["test_index"] for s in solutions if s["test_index"] % 4 == rest})
        keep = set(qs[:questions] if questions is not None else qs)
        halves.append([s for s in solutions if s["test_index"] in keep])
    return halves[0], halves[1]


def odd_reference(test_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reference answers of the odd-numbered test questions, as gsm8k-format records."""
    return [
        {"question": r["question"], "answer": r["answer"], "test_index": i}
        for i, r in enumerate(test_rows)
        if i % 2 == 1
    ]


def train_parts(train_rows: list[dict[str, Any]], sizes: Sizes) -> dict[str, list[dict[str, Any]]]:
    """Disjoint subsets of GSM8K train by row index: warm, reference, targets, eval (of the models)."""
    by_rest = {k: [dict(r, train_index=i) for i, r in enumerate(train_rows) if i % 3 == k] for k in range(3)}
    spare = by_rest[2]
    return {
        "warm": by_rest[0][: sizes.warm_rows],
        "reference": by_rest[1][: sizes.ref_rows],
        "targets": spare[: sizes.target_rows],
        "eval": spare[sizes.target_rows : sizes.target_rows + sizes.model_eval_rows],
    }


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    from winnow.core.store import atomic_write_bytes

    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    atomic_write_bytes(path, blob)
    return path


# ------------------------------------------------------------------------------------- recipes


def _recipe(name: str, run_dir: Path, tables: list[dict[str, Any]]):
    from winnow.core.params import build_params
    from winnow.pipeline.recipe import Recipe
    from winnow.pipeline.steps import get_step

    steps = []
    for i, table in enumerate(tables):
        table = dict(table)
        step = get_step(table.pop("step"))
        steps.append((step, build_params(step.params, table, f"{name}: steps[{i}] ({step.name})")))
    return Recipe(Path(f"{name}.toml"), str(run_dir), steps)


def _train_steps(base: str, sizes: Sizes, models: Path, jobs: dict[str, tuple[str, int]], **extra) -> list:
    """select (sql) + train steps: one model per job name -> (keep condition, steps)."""
    from winnow.core.params import build_params
    from winnow.core.store import stable_hash
    from winnow.trainer.config import TrainParams

    tables: list[dict[str, Any]] = []
    for name, (keep, steps) in jobs.items():
        tables.append({"step": "select", "policy": "sql", "keep": keep, "name": name})
        train = {
            "step": "train", "model": base, "selection": name, "max_steps": steps,
            "epochs": 1000,  # max_steps decides (a step count, whatever the subset's size)
            "lr": sizes.lr, "warmup_steps": 10, "tokens_per_batch": sizes.tokens_per_batch,
            "max_seq_len": 1024, "progress": False, "save_every": 0, **extra,
        }
        # The folder names the trainer's whole resolved configuration (defaults included): another size,
        # schedule or trainer version trains beside it instead of being refused by `winnow train`.
        ident = build_params(TrainParams, {k: v for k, v in train.items() if k != "step"}, name).identity()
        out = models / f"{name}-{stable_hash([ident, keep, dataclasses.asdict(sizes)], 8)}"
        tables.append(train | {"out": str(out)})
    return tables


@dataclasses.dataclass
class Seconds:
    """Wall seconds per step; a step that only skipped finished work keeps the time it took when it ran
    (``previous``, read from the work folder), so a resumed prepare still reports what each step costs."""

    previous: dict[str, float]
    now: dict[str, float] = dataclasses.field(default_factory=dict)

    def record(self, name: str, wall: float, skipped: bool) -> None:
        self.now[name] = self.previous[name] if skipped and name in self.previous else wall


def _timed(recipe, seconds: Seconds, build: bool = False) -> None:
    """Run ``recipe`` and time its steps. Scored run: the manifest keys (``ingest``,
    ``model_pass:current``, ``stage:eu_plane``, ...); model runs: ``build:<model>`` per training and
    ``build:data`` (their ingest and select steps, summed over this call)."""
    from winnow.pipeline.recipe import run_loaded

    for key, res in run_loaded(recipe).items():
        kind, _, name = key.partition(":")
        wall = float(res.get("wall_s", 0.0))
        if build and kind != "train":
            seconds.now["build:data"] = seconds.now.get("build:data", 0.0) + wall
            continue
        shards = res.get("shards", {})
        skipped = bool(res.get("skipped") or (shards.get("total") and not shards.get("computed")))
        seconds.record(f"build:{name}" if build else key, wall, skipped)


def build_models(
    work: Path, data: Path, sizes: Sizes, base: str, seconds: Seconds
) -> dict[str, Path]:
    """warm, reference (GSM8K train) and positive, negative (the contrast half's solutions)."""
    models = work / "models"
    tables = [{"step": "ingest", "inputs": [str(data / "train_parts.jsonl")], "model": base}]
    tables += _train_steps(
        base, sizes, models,
        {
            "warm": ("meta_part = 'warm'", sizes.warm_steps),
            "reference": ("meta_part = 'reference'", sizes.ref_steps),
        },
        eval_where="meta_part = 'eval'",
    )
    _timed(_recipe("gsm8k_models", work / "train_run", tables), seconds, build=True)
    outs = tables
    tables = [{"step": "ingest", "inputs": [str(data / "contrast_half.jsonl")], "model": base}]
    tables += _train_steps(
        base, sizes, models,
        {"positive": ("meta_is_correct", sizes.contrast_steps),
         "negative": ("not meta_is_correct", sizes.contrast_steps)},
        eval_fraction=0.05,
    )
    _timed(_recipe("gsm8k_contrast_models", work / "contrast_run", tables), seconds, build=True)
    return {Path(t["selection"]).name: Path(t["out"]) for t in outs + tables if t["step"] == "train"}


def scored_recipe(run_dir: Path, solutions: Path, targets: Path, base: str, models: dict[str, Path]):
    """recipes/quickstart.toml's ingest, passes and stages (same names and parameters) on the solutions."""
    from winnow.pipeline.recipe import Recipe, load_recipe, targets_ingest, with_models
    from winnow.pipeline.steps import spec

    quick = load_recipe(REPO / "recipes" / "quickstart.toml")
    roles = {
        "builtin:tiny": base, "builtin:tiny-warm": str(models["warm"]),
        "builtin:tiny-reference": str(models["reference"]),
        "builtin:tiny-positive": str(models["positive"]), "builtin:tiny-negative": str(models["negative"]),
    }
    steps = []
    for step, params in with_models(quick, roles).steps:
        kind = spec(step.name).kind
        if kind in ("selection", "training"):
            continue  # the curation benchmark selects and trains
        if step.name == "ingest":
            params = dataclasses.replace(params, inputs=[str(solutions)])
        elif step.name == "dv4llm":  # file targets: ingested into targets/ by a step of their own first
            params = dataclasses.replace(params, targets=str(targets))
            steps.append(targets_ingest(steps, targets))
        steps.append((step, params))
    return Recipe(quick.path, str(run_dir), steps)


# ------------------------------------------------------------------------------------- prepare


def _write_inputs(data: Path, gsm8k: Path, sizes: Sizes) -> dict[str, Path]:
    solutions = read_jsonl(gsm8k / SOLUTIONS)
    scored, contrast = even_halves(solutions, sizes.questions)
    parts = train_parts(read_jsonl(gsm8k / "train.jsonl"), sizes)
    odd = odd_reference(read_jsonl(gsm8k / "test.jsonl"))
    tagged = [dict(r, part=part) for part in ("warm", "reference", "eval") for r in parts[part]]
    return {
        "scored": write_jsonl(data / "scored_half.jsonl", scored),
        "contrast": write_jsonl(data / "contrast_half.jsonl", contrast),
        "train_parts": write_jsonl(data / "train_parts.jsonl", tagged),
        "targets": write_jsonl(data / "dv4llm_targets.jsonl", parts["targets"]),
        "eval": write_jsonl(data / "eval_odd.jsonl", odd[:120] if sizes.questions is not None else odd),
    }


def prepare_gsm8k(
    workdir: Path, quick: bool, *, base: str = "builtin:tiny", gsm8k: Path = GSM8K_DIR
) -> dict[str, Any]:
    """Build the models, the scored run and the eval file under ``workdir``; rerunning skips what is done.

    Returns ``run_dir``, ``base_model``, ``eval_jsonl``, ``accuracy`` (whether the warm model solves any
    odd test question by greedy generation), ``stage_seconds`` (manifest key of each pass and stage, e.g.
    ``model_pass:current``, ``stage:eu_plane``, and ``build:<model>`` -> seconds) and ``auroc`` (score ->
    AUROC, incorrect vs correct solutions).
    """
    from winnow.core.models import resolve_model
    from winnow.core.store import UserError, atomic_write_json

    if not (gsm8k / SOLUTIONS).exists():
        raise UserError(f"GSM8K data not found at {gsm8k}: expected {SOLUTIONS}, train.jsonl, test.jsonl")
    sizes = QUICK if quick else FULL
    work = Path(workdir) / ("gsm8k-quick" if quick else "gsm8k")
    files = _write_inputs(work / "data", gsm8k, sizes)
    base_dir = resolve_model(base)
    times_path = work / "stage_seconds.json"
    seconds = Seconds(json.loads(times_path.read_text()) if times_path.exists() else {})
    models = build_models(work, work / "data", sizes, str(base_dir), seconds)
    recipe = scored_recipe(work / "run", files["scored"], files["targets"], str(base_dir), models)
    _timed(recipe, seconds)
    atomic_write_json(times_path, seconds.now)
    t = time.time()
    solved = solved_count(models["warm"], files["eval"], n=16 if quick else 64)
    seconds.now["accuracy_check"] = round(time.time() - t, 3)
    return {
        "run_dir": work / "run",
        "base_model": base_dir,
        "eval_jsonl": files["eval"],
        "accuracy": solved > 0,
        "stage_seconds": seconds.now,
        "auroc": sample_auroc(work / "run"),
    }


# ------------------------------------------------------------------------------------ accuracy


_ANSWER = re.compile(r"####\s*\$?(-?[\d,]*\.?\d+)")


def final_answer(text: str) -> str | None:
    """The number after the first ``####`` (commas and a leading $ removed), or None."""
    m = _ANSWER.search(text)
    return m.group(1).replace(",", "") if m else None


def solved_count(model_dir: Path, eval_jsonl: Path, n: int, max_new_tokens: int = 200) -> int:
    """How many of the first ``n`` eval questions ``model_dir`` answers right (greedy, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rows = read_jsonl(eval_jsonl)[:n]
    solved = 0
    for i in range(0, len(rows), 16):
        batch = rows[i : i + 16]
        prompts = [
            tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                    add_generation_prompt=True)
            for r in batch
        ]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for r, ids in zip(batch, out[:, enc["input_ids"].shape[1] :], strict=True):
            got = final_answer(tok.decode(ids, skip_special_tokens=True))
            solved += got is not None and got == final_answer(r["answer"])
    return solved


# -------------------------------------------------------------------------------------- AUROC


def _quality_report():
    sys.path.insert(0, str(Path(__file__).parent))
    import quality_report

    return quality_report


def _sample_scores(run_dir: Path) -> tuple[dict[str, bool], dict[str, int], dict[str, dict[str, float]]]:
    """(is_correct, supervised tokens, score name -> sample -> score) of the scored run."""
    from winnow.pipeline.inspect_run import open_views

    qr = _quality_report()
    con = open_views(run_dir).con
    label = dict(con.sql("select sample_id, meta_is_correct from samples").fetchall())
    length = dict(con.sql("select sample_id, n_loss_tokens from samples").fetchall())
    scores = {name: dict(con.sql(q).fetchall()) for name, q in qr.SCORES.items()}
    scores["length (supervised tokens)"] = {k: float(v) for k, v in length.items()}
    rng = np.random.default_rng(0)
    scores["random"] = {sid: float(rng.random()) for sid in sorted(label)}
    return label, length, scores


def _auroc_of(sc: dict[str, float], label: dict[str, bool], ids) -> tuple[float, int]:
    """(AUROC incorrect vs correct over ``ids``, n_incorrect * n_correct)."""
    pos = np.array([sc[s] for s in ids if label[s] is False and sc.get(s) is not None], dtype=float)
    neg = np.array([sc[s] for s in ids if label[s] is True and sc.get(s) is not None], dtype=float)
    if not (len(pos) and len(neg)):
        return float("nan"), 0
    return _quality_report().auroc(pos, neg), len(pos) * len(neg)


def sample_auroc(run_dir: Path) -> dict[str, float]:
    """AUROC of each stage's sample score (quality_report's signs: higher = more suspicious), incorrect
    solutions as positives against correct ones; plus a seeded random control and answer length."""
    label, _, scores = _sample_scores(run_dir)
    return {name: _auroc_of(sc, label, sorted(label))[0] for name, sc in scores.items()}


def length_stratified_auroc(run_dir: Path, bins: int = 5) -> dict[str, float]:
    """The same AUROC within quantile bins of supervised length, pooled (weights n_inc * n_cor): what a
    score says beyond "incorrect solutions are longer"."""
    label, length, scores = _sample_scores(run_dir)
    ids = sorted(label)
    edges = np.quantile([length[s] for s in ids], np.linspace(0, 1, bins + 1)[1:-1])
    strata = [[s for s in ids if np.searchsorted(edges, length[s], side="right") == b] for b in range(bins)]
    out = {}
    for name, sc in scores.items():
        got = [_auroc_of(sc, label, st) for st in strata]
        w = sum(n for _, n in got)
        out[name] = sum(a * n for a, n in got if n) / w if w else float("nan")
    return out


# Per-token scores, higher = more suspicious, signs fixed before looking (as the sample scores).
TOKEN_SCORES = {
    "current surprise (-logprob)": "list_transform(c.logprob, lambda x: -x)",
    "excess_loss (-token_score)": "list_transform(e.token_score, lambda x: -x)",
    "contrast (logp_neg - logp_pos)": "list_transform(list_zip(k.logprob_neg, k.logprob_pos), "
    "lambda x: x[1] - x[2])",
    "critical_tokens (1 - p_CE)": "list_transform(t.token_p_ce, lambda x: 1 - x)",
}


def answer_token_auroc(run_dir: Path) -> dict[str, tuple[float, int, int]]:
    """Token level, where ground truth exists: the tokens of the final answer (after the last ``A:``) of
    incorrect solutions against those of correct ones. -> score -> (AUROC, n incorrect, n correct)."""
    from winnow.pipeline.inspect_run import open_views

    qr = _quality_report()
    con = open_views(run_dir).con
    cols = ", ".join(f"{q} AS s{i}" for i, q in enumerate(TOKEN_SCORES.values()))
    rows = con.sql(
        f"select s.text, s.messages, s.offsets, s.loss_mask, s.meta_is_correct, {cols} from samples s "
        "join signals_current c using (sample_id) join scores_excess_loss e using (sample_id) "
        "join signals_contrast k using (sample_id) join scores_critical_tokens t using (sample_id)"
    ).fetchall()
    pos: list[list[float]] = [[] for _ in TOKEN_SCORES]
    neg: list[list[float]] = [[] for _ in TOKEN_SCORES]
    for text, messages, offsets, mask, correct, *vals in rows:
        content = [m["content"] for m in json.loads(messages) if m["role"] == "assistant"][-1]
        start = text.find(content)
        cut = content.rfind("A:")
        if start < 0 or cut < 0:
            continue
        lo, hi = start + cut + 2, start + len(content)
        for i, (o, m) in enumerate(zip(offsets, mask, strict=True)):
            if m and lo <= o < hi:
                for j, v in enumerate(vals):
                    if v is not None and v[i] is not None:
                        (neg if correct else pos)[j].append(v[i])
    return {
        name: (qr.auroc(np.array(pos[j]), np.array(neg[j])), len(pos[j]), len(neg[j]))
        for j, name in enumerate(TOKEN_SCORES)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="60 questions per half, short model training")
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "curation")
    ap.add_argument("--base", default="builtin:tiny", help="base model (builtin:NAME or a model directory)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    res = prepare_gsm8k(args.workdir, args.quick, base=args.base)
    wall = time.time() - t0
    from winnow.pipeline.inspect_run import open_views

    con = open_views(res["run_dir"]).con
    n = con.sql("select count(*), count(*) filter (where not meta_is_correct) from samples").fetchall()[0]
    rej = con.sql("select reason, count(*) from rejects group by 1 order by 1").fetchall()
    print(f"scored run {res['run_dir']}: {n[0]} solutions ({n[1]} incorrect); rejected {rej}")
    solved = "some solved" if res["accuracy"] else "none solved"
    print(f"accuracy check (warm model, greedy, odd questions): {solved}")
    strat = length_stratified_auroc(res["run_dir"])
    print(f"\n{'sample score (incorrect vs correct)':38s} {'AUROC':>7s} {'within length quintiles':>24s}")
    for name, v in res["auroc"].items():
        print(f"{name:38s} {v:7.3f} {strat[name]:24.3f}")
    print(f"\n{'final-answer tokens (incorrect vs correct)':44s} {'AUROC':>7s} {'n_inc':>7s} {'n_cor':>7s}")
    tok = answer_token_auroc(res["run_dir"])
    for name, (v, a, b) in tok.items():
        print(f"{name:44s} {v:7.3f} {a:7d} {b:7d}")
    print("\nseconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res["stage_seconds"].items()))
    print(f"prepare wall {wall:.1f}s")
    from winnow.core.store import atomic_write_json

    atomic_write_json(
        REPO / "benchmarks" / "out" / f"curation_gsm8k{'_quick' if args.quick else ''}.json",
        {
            "auroc": res["auroc"], "auroc_within_length_quintiles": strat, "answer_tokens": tok,
            "stage_seconds": res["stage_seconds"], "accuracy": res["accuracy"], "wall_s": wall,
            "samples": n[0], "incorrect": n[1],
        },
    )


if __name__ == "__main__":
    main()
