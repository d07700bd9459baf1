"""Does curation pay? Fine-tune one starting model on each policy's selection and measure (issue 15).

Per dataset a ``prepare_*`` function returns a scored winnow run (the training pool), the model to
fine-tune from, a held-out JSONL (the yardstick), whether exact-match accuracy is computed and what each
model pass and stage cost. Then, per budget (50% of the samples, or of the supervised tokens for the
token-level policies; 25% for the two best policies), every row is a ``winnow.trainer`` training of the
same number of optimizer steps from that model, evaluated on the held-out set: the mean loss over its
answers and, where the model solves any, the exact-match accuracy of greedy generation (``#### N``).

Budgets are the stages' own knobs, rerun in a copy of the run per budget (stages are cheap; the model
passes are not rerun): ``eu_plane.r_sample``, ``excess_loss.k_ratio``, ``sstoken.rho``, ``dv4llm.budget``,
the online policies' ``q_tuning.r_sample``, ``rho1.k_ratio``, ``sstoken.rho``; the simple baselines keep
the lowest-loss (base model) or the longest answers by SQL. critical_tokens (drop wrong answers) and the
composed quickstart selection have no knob: they keep what they keep and the table says how much.
A policy marked GT reads a ground-truth column (cDPO's correctness labels) and cannot win the target.

Random rows are paired with a policy: the same number of samples drawn uniformly, then the same number
of weighted tokens drawn uniformly among their supervised tokens (``curation_eval.random_pairing``), one
draw per seed, trained from an export-style parquet with ``winnow train --data``. Online policies are not
paired (what they keep is decided during training).

Trainings run in worker processes (``--workers``, one thread each), each on its own copy of the budget run
(a training writes the run's manifest; one writer per run). Every result is appended to
``<workdir>/results.jsonl`` as it lands: a rerun skips what is there, ``--max-minutes`` stops starting
trainings at a deadline and ``--report`` prints the table of what finished. Rows run in phases (every core
row once, then all seeds of full and the three best, then every other row, then 25%, then the rest) so a
run cut short still answers the main question. Measured on the shared 2-core VM at load 11-17
(``benchmarks/RESULTS.md``): one demo training of 100 steps plus its evaluation on 300 problems took
90-170 s per worker, two workers about 45 s a row; ``--quick`` took 221 s with the model passes done.

Usage: ``python benchmarks/curation.py [--quick] [--models builtin|quality] [--seeds 3] [--workers 2]
[--datasets demo,gsm8k] [--steps N] [--start base|new-task] [--rows a,b] [--max-minutes M] [--report]``.
The table is printed and written to ``<workdir>/table.md`` and ``results.json``. ``--start new-task``: see
:func:`prepare_demo` (the setting where DV4LLM met the target, benchmarks/RESULTS.md).

``--methods otr,dft,caft,hft,greentrainer`` (issue 26): instead of the policy rows, ``full`` and one row per
training method, each on the whole pool with the same data, steps and lr and the method's ``--set`` values
(:data:`METHODS`; ``--method-set greentrainer.rho=0.7`` overrides one); no scoring model is built or run.
With ``--start new-task`` every row is also scored on the 24 templates the start model learned (forgetting).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

TEST_SEED = 301  # the held-out test draw: no model (builtin 101-105, quality 201-204) trained on it
TARGET_SEED = 302  # DV4LLM's "small set of clean examples of the task" a user would have


# ----------------------------------------------------------------------------------------------- demo data
def _demo_rows(n: int, seed: int, pool_questions: set[str], templates: tuple[str, ...] | None = None) -> list[dict]:
    """Clean math rows of the draw ``(n, seed)`` whose question is not in the pool (of ``templates``)."""
    from winnow.pipeline.builtin.demo_data import generate_demo

    rows = []
    for r in generate_demo(n, seed):
        q = r["messages"][0]["content"]
        if r["corruption"] == "none" and r["domain"] == "math" and q not in pool_questions:
            if templates is None or r["template"] in templates:
                rows.append({"messages": r["messages"], "final_answer": r["final_answer"]})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    from winnow.core.store import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    return path


def stage_seconds(run_dir: Path, previous: dict[str, float] | None = None) -> dict[str, float]:
    """Wall seconds of every model pass and stage in the run's manifest (``model_pass:current``, ...).

    A rerun that skipped a step records its skip time; ``previous`` keeps the time it took when computed."""
    manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    steps = manifest.get("steps", manifest)
    out = dict(previous or {})
    for k, v in steps.items():
        if not (
            isinstance(v, dict) and "wall_s" in v and k.split(":")[0] in ("model_pass", "stage", "ingest")
        ):
            continue
        if v.get("shards", {}).get("computed", 1) > 0 or k not in out:
            out[k] = float(v["wall_s"])
    return out


def _previous_seconds(workdir: Path) -> dict[str, float]:
    f = workdir / "stage_seconds.json"
    return json.loads(f.read_text()) if f.exists() else {}


def prepare_demo(
    workdir: Path,
    quick: bool,
    *,
    models: str | None = None,
    test_size: int | None = None,
    start: str = "base",
    score: bool = True,
) -> dict[str, Any]:
    """The quickstart pipeline on the demo data: builtin models (``quick``) or the quality models.

    ``start="new-task"``: fine-tune the quality base that never saw a quarter of the math templates
    (``quality_models.NEW_TASK_BASE``), test on those templates only, and give DV4LLM clean examples of
    them as its targets (a user teaching a task has some); the scoring models stay the quality set.
    ``score=False`` (the training-method rows, which train on the whole pool): only the starting model is
    built and only the ingest runs; with ``new-task`` a second test set of the 24 templates the base was
    trained on (same seed-301 draw, other problems) measures forgetting."""
    from winnow.core.models import resolve_model
    from winnow.pipeline.builtin.demo_data import DEMO_SIZE, generate_demo
    from winnow.pipeline.recipe import Recipe, load_recipe, run_loaded, targets_ingest, with_models

    workdir.mkdir(parents=True, exist_ok=True)
    pool = {r["messages"][0]["content"] for r in generate_demo(DEMO_SIZE)}
    task = None
    if start == "new-task":
        from quality_models import HELD_OUT_TEMPLATES

        task = HELD_OUT_TEMPLATES
    # test: a fresh clean draw no model trained on; targets: another, never the pool's meta_corruption
    n_test = test_size or (150 if quick else 500)
    draw = 1 if task is None else 4  # the task is a quarter of the templates
    test = _write_jsonl(workdir / "test.jsonl", _demo_rows(3 * draw * n_test, TEST_SEED, pool, task)[:n_test])
    targets = _write_jsonl(
        workdir / "dv4llm_targets.jsonl", _demo_rows(400 * draw, TARGET_SEED, pool, task)[:200]
    )
    recipe = load_recipe(HERE.parent / "recipes" / "quickstart.toml")
    base = "builtin:tiny"
    if not score:
        return _prepare_pool(
            workdir, recipe, models or ("builtin" if quick else "quality"), task, pool, n_test, test
        )
    if (models or ("builtin" if quick else "quality")) == "quality":
        from quality_models import NEW_TASK_BASE, QUICKSTART_ROLES, build_quality_models

        dirs = {k: str(v) for k, v in build_quality_models().items()}
        if task is not None:  # ssToken's history (and drop_high_loss's base loss): the model trained from
            from winnow.pipeline.builtin.tiny_model import build_model

            dirs["quality-base"] = str(build_model(NEW_TASK_BASE))
        recipe = with_models(recipe, {old: dirs[new] for old, new in QUICKSTART_ROLES.items()})
        base = dirs["quality-base"]
    elif task is not None:
        raise SystemExit("--start new-task needs --models quality (its base is a quality recipe)")
    steps = []
    for step, params in recipe.steps:
        if step.name == "train":
            continue  # the benchmark trains every row itself
        if step.name == "dv4llm":  # file targets: ingested into targets/ by a step of their own first
            params = dataclasses.replace(params, targets=str(targets))
            steps.append(targets_ingest(steps, targets))
        steps.append((step, params))
    run_dir = workdir / "run"
    run_loaded(Recipe(recipe.path, str(run_dir), steps), str(run_dir))
    return {
        "run_dir": run_dir,
        "base_model": resolve_model(base),
        "eval_jsonl": test,
        "accuracy": True,
        "stage_seconds": stage_seconds(run_dir, _previous_seconds(workdir)),
    }


def _prepare_pool(workdir: Path, recipe, models: str, task, pool: set[str], n_test: int, test: Path):
    """prepare_demo without scoring: the starting model, the pool ingested, the held-out test set(s)."""
    from quality_models import BASE, NEW_TASK_BASE

    from winnow.core.models import resolve_model
    from winnow.pipeline.builtin.demo_data import MATH_TEMPLATES
    from winnow.pipeline.builtin.tiny_model import build_model
    from winnow.pipeline.recipe import Recipe, run_loaded

    base = "builtin:tiny" if models == "builtin" else str(build_model(NEW_TASK_BASE if task else BASE))
    steps = [(s, dataclasses.replace(p, model=base)) for s, p in recipe.steps if s.name == "ingest"]
    run_dir = workdir / "run"
    run_loaded(Recipe(recipe.path, str(run_dir), steps), str(run_dir))
    out = {"run_dir": run_dir, "base_model": resolve_model(base), "eval_jsonl": test, "accuracy": True}
    if task is not None:  # the templates the base learned: 24 of 32, so a draw of 6x the size holds enough
        old = tuple(t for t in MATH_TEMPLATES if t not in task)
        rows = _demo_rows(6 * n_test, TEST_SEED, pool, old)[:n_test]
        out["eval_old_jsonl"] = _write_jsonl(workdir / "test_old.jsonl", rows)
    return out | {"stage_seconds": stage_seconds(run_dir, _previous_seconds(workdir))}


# ----------------------------------------------------------------------------------------------- policies
@dataclass
class Policy:
    name: str
    kind: str  # full | select | online | method
    gt: bool = False  # reads a ground-truth column
    stage: str = ""  # stage rerun with the budget knob
    knob: str = ""
    select: dict[str, str] = field(default_factory=dict)  # winnow select parameters
    sql_budget: str = ""  # drop_high_loss | drop_short: SQL keep built from the budget
    online: str = ""
    cost: tuple[str, ...] = ()  # manifest keys of the passes and stages it needs
    lora: bool = False
    train: dict[str, Any] = field(default_factory=dict)  # extra winnow train parameters (online, method rows)

    @property
    def budgeted(self) -> bool:
        return bool(self.knob or self.sql_budget)


CUR, HIST, REF, CON = (
    "model_pass:current",
    "model_pass:history",
    "model_pass:reference",
    "model_pass:contrast",
)
_QS_KEEP = "sample_id in (select sample_id from scores_excess_loss where mean_excess >= 0)"
FLOOR = "<|im_end|>,####"  # the structural tokens ssToken drops (RESULTS.md): always kept in the *_floor rows
POLICIES = [
    Policy("full", "full"),
    Policy("drop_high_loss", "select", sql_budget="drop_high_loss", cost=(HIST,)),
    Policy("drop_short", "select", sql_budget="drop_short"),
    # Rho-1's score per sample (mean excess loss, current minus reference), every supervised token kept
    Policy("excess_samples", "select", sql_budget="excess_samples", cost=(CUR, REF, "stage:excess_loss")),
    Policy(
        "eu_plane",
        "select",
        stage="eu_plane",
        knob="r_sample",
        select={"policy": "eu_plane"},
        cost=(CUR, "stage:eu_plane"),
    ),
    Policy(
        "excess_loss",
        "select",
        stage="excess_loss",
        knob="k_ratio",
        select={"policy": "excess_loss"},
        cost=(CUR, REF, "stage:excess_loss"),
    ),
    Policy(
        "sstoken",
        "select",
        stage="sstoken",
        knob="rho",
        select={"policy": "sstoken"},
        cost=(CUR, HIST, "stage:sstoken"),
    ),
    Policy(
        "sstoken_floor",
        "select",
        stage="sstoken",
        knob="rho",
        select={"policy": "sstoken", "always_keep": FLOOR},
        cost=(CUR, HIST, "stage:sstoken"),
    ),
    Policy(
        "dv4llm", "select", stage="dv4llm", knob="budget", select={"policy": "dv4llm"}, cost=("stage:dv4llm",)
    ),
    Policy(
        "critical_tokens",
        "select",
        gt=True,
        select={"policy": "critical_tokens", "tokens": "loss_mask"},
        cost=(CON, "stage:critical_tokens"),
    ),
    Policy(
        "cdpo_p_ce",
        "select",
        gt=True,
        select={"policy": "critical_tokens", "tokens": "p_ce"},
        cost=(CON, "stage:critical_tokens"),
    ),
    Policy(
        "quickstart",
        "select",
        gt=True,
        select={"policy": "dv4llm,critical_tokens,sql", "keep": _QS_KEEP, "tokens": "excess_loss"},
        cost=(CUR, REF, CON, "stage:dv4llm", "stage:critical_tokens", "stage:excess_loss"),
    ),
    Policy(  # the quickstart composition without its oracle: no correctness labels
        "quickstart_no_labels",
        "select",
        select={"policy": "dv4llm,sql", "keep": _QS_KEEP, "tokens": "excess_loss"},
        cost=(CUR, REF, "stage:dv4llm", "stage:excess_loss"),
    ),
    Policy("online_q_tuning", "online", online="q_tuning", knob="r_sample"),
    Policy("online_rho1", "online", online="rho1", knob="k_ratio"),
    Policy("online_sstoken", "online", online="sstoken", knob="rho"),
    Policy("online_sstoken_floor", "online", online="sstoken", knob="rho", train={"always_keep": FLOOR}),
]
QUICK_POLICIES = ("full", "eu_plane", "excess_loss")
# the rows every seed-0 pass starts with: full and the policies reading no ground truth that the quality
# report found (excess_loss: AUROC 1.000 on junk and wrong final answers; eu_plane: 0.92-0.96 on wrong answers)
CORE = ("full", "excess_loss", "quickstart_no_labels", "eu_plane", "drop_high_loss", "excess_samples", "dv4llm")
LORA_POLICIES = ("full", "eu_plane", "sstoken", "cdpo_p_ce")  # Q-Tuning, ssToken, cDPO ran with LoRA
# Training methods of issue 26 (``--methods``): each trains on the whole pool like ``full``, same data, steps
# and lr, with its own ``--set`` parameters (the values; ``--method-set`` overrides one).
METHODS = [
    Policy("otr", "method", train={"loss": "otr", "otr.k": 256}),
    Policy("dft", "method", train={"loss": "dft"}),
    Policy("caft", "method", train={"caft.heads": 4}),
    Policy("hft", "method", train={"hft.enabled": True}),
    Policy("greentrainer", "method", train={"greentrainer.rho": 0.5}),
]
# CAFT's heads phase before its fine-tune, as the authors' scripts (train_aux_heads.py, then train.py): trunk
# and LM head frozen, the heads learn the pool for this many steps (about one epoch of it; never more than the
# fine-tune's steps), then the fine-tune loads them (caft.heads_from) instead of starting from copies of a decoder layer.
CAFT_HEADS_STEPS = 200
TOP_BUDGET_POLICIES = ("drop_high_loss", "drop_short", "excess_samples", "eu_plane", "excess_loss", "sstoken", "dv4llm")


def _sql_budget(kind: str, n_keep: int) -> str:
    if kind == "excess_samples":
        inner = f"select sample_id from scores_excess_loss order by mean_excess desc nulls last, sample_id limit {n_keep}"
        return f"sample_id in ({inner})"
    if kind == "drop_short":
        order = "s.n_loss_tokens desc, s.sample_id"
        src = "samples s"
    else:  # mean loss of the supervised tokens under the base model (the history pass)
        loss = (
            "list_avg(list_transform(list_filter(list_zip(h.logprob, s.loss_mask), lambda x: x[2] = 1), "
            "lambda x: -x[1]))"
        )
        order = f"{loss} asc nulls last, s.sample_id"
        src = "samples s join signals_history h using (sample_id)"
    return f"sample_id in (select s.sample_id from {src} order by {order} limit {n_keep})"


# ----------------------------------------------------------------------------------------------- run steps
def _run_steps(run_dir: Path, steps: list[tuple[str, dict[str, Any]]]) -> None:
    """Run registry steps on ``run_dir`` in this process (the recipe runner: lock, order check, manifest)."""
    from winnow.core.params import build_params
    from winnow.pipeline.recipe import Recipe, run_loaded
    from winnow.pipeline.steps import get_step

    built = []
    for name, values in steps:
        step = get_step(name)
        built.append((step, build_params(step.params, values, f"curation {name}")))
    run_loaded(Recipe(Path("curation.toml"), str(run_dir), built), str(run_dir))


def _manifest_config(run_dir: Path, key: str) -> dict[str, Any]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    steps = manifest.get("steps", manifest)
    if key not in steps:
        raise SystemExit(f"{run_dir}: no {key} in the manifest; the prepare step must run it")
    return dict(steps[key]["config"])


def _selection_stats(run_dir: Path, name: str) -> dict[str, int]:
    from winnow.core.store import RunDir

    t = RunDir(run_dir).table(f"selection/{name}").read(columns=["keep", "n_weighted"]).to_pydict()
    kept = [n for k, n in zip(t["keep"], t["n_weighted"], strict=True) if k]
    return {"samples": len(kept), "tokens": int(sum(kept)), "pool": len(t["keep"])}


def budget_run(src: Path, dst: Path, budget: float, policies: list[Policy]) -> dict[str, dict[str, int]]:
    """Copy the scored run, rerun the knobbed stages at ``budget`` and make every policy's selection."""
    from winnow.core.store import RunDir

    if not (dst / "manifest.json").exists():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("train", ".winnow.lock", "card"))
    n_pool = RunDir(dst).table("samples").read(columns=["sample_id"]).num_rows
    steps: list[tuple[str, dict[str, Any]]] = []
    for st in sorted({p.stage for p in policies if p.stage and p.kind == "select"}):
        cfg = _manifest_config(dst, f"stage:{st}")
        knob = next(p.knob for p in policies if p.stage == st)
        steps.append((st, {k: v for k, v in cfg.items() if v is not None} | {knob: budget}))
    for p in policies:
        if p.kind != "select":
            continue
        values = dict(p.select, name=p.name)
        if p.sql_budget:
            values |= {"policy": "sql", "keep": _sql_budget(p.sql_budget, round(budget * n_pool))}
        steps.append(("select", values))
    _run_steps(dst, steps)
    return {p.name: _selection_stats(dst, p.name) for p in policies if p.kind == "select"}


def write_random(run_dir: Path, out: Path, samples: int, tokens: int, seed: int) -> dict[str, int]:
    """Parquet (input_ids, token_weight, loss_mask, sample_id) of a seeded random pairing of the pool."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from curation_eval import random_pairing

    from winnow.core.store import RunDir

    t = RunDir(run_dir).table("samples").read(columns=["sample_id", "input_ids", "loss_mask"]).to_pydict()
    masks = [np.asarray(m, dtype=np.float32) for m in t["loss_mask"]]
    pair = random_pairing(masks, samples, tokens, seed)
    keep = [i for i, w in enumerate(pair.weights) if w.any()]
    table = pa.table(
        {
            "sample_id": [t["sample_id"][i] for i in keep],
            "input_ids": pa.array([t["input_ids"][i] for i in keep], pa.list_(pa.int32())),
            "token_weight": pa.array([pair.weights[i] for i in keep], pa.list_(pa.float32())),
            "loss_mask": pa.array([masks[i].astype(np.uint8) for i in keep], pa.list_(pa.uint8())),
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return {"samples": pair.samples, "tokens": pair.tokens, "shortfall": pair.shortfall}


# ----------------------------------------------------------------------------------------------- jobs
@dataclass
class TrainCfg:
    steps: int = 150
    tokens_per_batch: int = 1024
    max_seq_len: int = 512
    lr: float = 5e-4
    lora_lr: float = 3e-3
    lora_r: int = 8
    warmup: int = 10
    max_new_tokens: int = 80  # demo answers: 99th percentile 82 supervised tokens, clean math shorter


_TEST_CACHE: dict[str, Any] = {}


def _test_set(test_run: Path) -> dict[str, Any]:
    if str(test_run) not in _TEST_CACHE:
        from winnow.core.store import RunDir

        t = RunDir(test_run).table("samples").read(columns=["input_ids", "loss_mask", "messages"]).to_pydict()
        msgs = [json.loads(m) for m in t["messages"]]
        last = [max(i for i, m in enumerate(ms) if m["role"] == "assistant") for ms in msgs]
        _TEST_CACHE[str(test_run)] = {
            "ids": [np.asarray(x, dtype=np.int64) for x in t["input_ids"]],
            "mask": [np.asarray(x, dtype=np.float32) for x in t["loss_mask"]],
            "prompts": [ms[:k] for ms, k in zip(msgs, last, strict=True)],
            "refs": [ms[k]["content"] for ms, k in zip(msgs, last, strict=True)],
        }
    return _TEST_CACHE[str(test_run)]


def evaluate(
    model_dir: Path, test_run: Path, accuracy: bool, max_new_tokens: int, tokenizer_dir: Path | None = None
) -> dict[str, Any]:
    """Held-out answer loss and (if asked) greedy exact-match accuracy of the model in ``model_dir``."""
    import torch
    from curation_eval import eval_loss, exact_match, greedy_answers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    t0 = time.time()
    data = _test_set(test_run)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True)
    res: dict[str, Any] = {"eval_loss": eval_loss(model, data["ids"], data["mask"])}
    if accuracy:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir))
        outs = greedy_answers(model, tok, data["prompts"], max_new_tokens)
        res["accuracy"] = float(np.mean([exact_match(o, r) for o, r in zip(outs, data["refs"], strict=True)]))
        res["example"] = outs[0]
    res["eval_s"] = time.time() - t0
    return res


def _run_copy(src: str) -> Path:
    """This worker's own copy of a budget run: trainings write the run's manifest, one writer per run."""
    dst = Path(f"{src}.w{os.getpid()}")
    if not (dst / "manifest.json").exists():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("train", ".winnow.lock", "card"))
    return dst


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One row x seed: train with ``winnow.trainer`` into job['out'], then evaluate the result."""
    from winnow.core.params import build_params
    from winnow.pipeline.train import train
    from winnow.trainer.config import TrainParams

    cfg = TrainCfg(**job["cfg"])
    values: dict[str, Any] = {
        "model": job["base_model"],
        "out": job["out"],
        "max_steps": cfg.steps,
        "epochs": 1000,  # max_steps decides
        "tokens_per_batch": cfg.tokens_per_batch,
        "max_seq_len": cfg.max_seq_len,
        "lr": cfg.lr,
        "warmup_steps": cfg.warmup,
        "eval_fraction": 0.0,  # the yardstick is the external held-out set, scored below
        "save_every": 0,
        "keep_checkpoints": 1,
        "seed": job["seed"],
        "progress": False,
        "threads": 1,
    }
    run_dir = None
    if job.get("data"):
        values["data"] = job["data"]
    else:
        run_dir = _run_copy(job["run"])
        values["selection"] = job.get("selection") or "all"  # online rows select inside training
    if job.get("online"):
        values |= {"online": job["online"], f"{job['online']}.{job['knob']}": job["budget"]}
    values |= job.get("train", {})
    if job.get("lora"):
        values |= {"lora_r": cfg.lora_r, "lr": cfg.lora_lr, "merge": True}
    t0 = time.time()
    if values.get("caft.heads"):
        values["caft.heads_from"] = _caft_heads(values, run_dir, job["row"])
    res = train(build_params(TrainParams, values, f"curation {job['row']}"), run_dir)
    train_s = time.time() - t0
    model_dir = Path(job["out"]) / ("merged" if job.get("lora") else "")
    ev = evaluate(
        model_dir, Path(job["test_run"]), job["accuracy"], cfg.max_new_tokens, Path(job["base_model"])
    )
    if job.get("test_run_old"):  # forgetting: the templates the starting model learned
        old = evaluate(
            model_dir, Path(job["test_run_old"]), True, cfg.max_new_tokens, Path(job["base_model"])
        )
        ev |= {
            "old_eval_loss": old["eval_loss"],
            "old_accuracy": old["accuracy"],
            "eval_s": ev["eval_s"] + old["eval_s"],
        }
    counts = dict(res.get("counts", {}))
    online = {}
    if job.get("online"):  # what the policy kept, summed over the steps (the pool counts say nothing here)
        lines = [json.loads(x) for x in (Path(job["out"]) / "metrics.jsonl").read_text().splitlines()]
        online = {k: sum(r.get(k, 0) for r in lines) for k in ("online_kept_samples", "online_seen_samples")}
        online["online_kept_tokens"] = sum(r.get("online_kept_tokens", 0) for r in lines)
        counts = {}
    return {
        **{k: job[k] for k in ("dataset", "row", "policy", "budget", "seed", "gt", "lora", "paired")},
        "train_s": train_s,
        "train_samples": counts.get("train_samples"),
        "weighted_tokens": counts.get("weighted_tokens"),
        **online,
        **ev,
    }


def _caft_heads(values: dict[str, Any], run_dir: Path | None, row: str) -> str:
    """CAFT's heads phase into ``<out>-heads`` (trunk frozen, CAFT_HEADS_STEPS steps); its dir for heads_from."""
    from winnow.core.params import build_params
    from winnow.pipeline.train import train
    from winnow.trainer.config import TrainParams

    heads = dict(values, out=f"{values['out']}-heads", max_steps=min(CAFT_HEADS_STEPS, values["max_steps"]))
    heads["caft.phase"] = "heads"
    train(build_params(TrainParams, heads, f"curation {row} heads phase"), run_dir)
    return heads["out"]


def _key(r: dict[str, Any]) -> str:
    return f"{r['dataset']}|{r['row']}|{r['budget']}|{r['seed']}"


def read_journal(path: Path) -> list[dict[str, Any]]:
    """Results written so far (one JSON line per finished training; a torn last line is ignored)."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _append(path: Path, rec: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_jobs(jobs: list[dict[str, Any]], args, log) -> list[dict[str, Any]]:
    """Run the jobs not yet in the journal, seed-major (every row of seed 0 first), until the deadline.

    Each result is appended to the journal as it lands, so a killed or timed-out run keeps what finished
    and a rerun continues; past ``args.deadline`` no new training starts (running ones finish)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, wait

    done = {_key(r) for r in read_journal(args.journal)}
    todo = sorted((j for j in jobs if _key(j) not in done), key=lambda j: (j["seed"], j["lora"]))
    out = []
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=mp.get_context("spawn")) as ex:
        pending, queue = set(), list(todo)
        while queue or pending:
            while queue and len(pending) < args.workers and time.time() < args.deadline:
                pending.add(ex.submit(run_job, queue.pop(0)))
            if not pending:
                log(f"deadline reached: {len(queue)} trainings not started")
                break
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                r = f.result()
                _append(args.journal, r)
                acc = f" acc {r['accuracy']:.3f}" if "accuracy" in r else ""
                log(
                    f"{r['dataset']} {r['row']} b{r['budget']} s{r['seed']}: loss {r['eval_loss']:.4f}{acc} "
                    f"(train {r['train_s']:.0f}s, eval {r['eval_s']:.0f}s)"
                )
                out.append(r)
    return out


# ----------------------------------------------------------------------------------------------- plan
def _jobs(ctx: dict[str, Any], budget: float, policies: list[Policy], stats, seeds, lora: tuple[str, ...]):
    """Every (row, seed) training of one budget: each policy, its random pair, its LoRA variant."""
    jobs = []
    for p in policies:
        for seed in seeds:
            job = {
                "dataset": ctx["dataset"],
                "policy": p.name,
                "budget": budget,
                "seed": seed,
                "gt": p.gt,
                "lora": False,
                "paired": "",
                "base_model": str(ctx["base_model"]),
                "run": str(ctx["run_b"]),
                "test_run": str(ctx["test_run"]),
                "accuracy": ctx["accuracy"],
                "cfg": ctx["cfg"],
            }
            tag = f"b{int(budget * 100)}/{p.name}/s{seed}"
            if p.kind == "select":
                job["selection"] = p.name
            if p.kind == "online":
                job |= {"online": p.online, "knob": p.knob, "train": p.train}
            if p.kind == "method":
                job |= {"train": p.train}
            if ctx.get("test_run_old"):
                job["test_run_old"] = str(ctx["test_run_old"])
            jobs.append(job | {"row": p.name, "out": str(ctx["workdir"] / "train" / tag)})
            if p.name in lora and seed in seeds[: ctx["lora_seeds"]]:
                jobs.append(
                    job
                    | {
                        "row": f"{p.name} (LoRA)",
                        "lora": True,
                        "out": str(ctx["workdir"] / "train" / f"{tag}-lora"),
                    }
                )
            if p.kind == "select":
                data = ctx["workdir"] / "random" / f"b{int(budget * 100)}" / f"{p.name}-s{seed}.parquet"
                st = stats[p.name]
                write_random(ctx["run_b"], data, st["samples"], st["tokens"], seed)
                jobs.append(
                    job
                    | {
                        "row": f"random~{p.name}",
                        "policy": "random",
                        "gt": False,
                        "paired": p.name,
                        "selection": "",
                        "data": str(data),
                        "out": str(ctx["workdir"] / "train" / f"{tag}-random"),
                    }
                )
    return jobs


def _mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray([x for x in xs if x is not None], dtype=np.float64)
    if not len(a):
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def aggregate(results: list[dict[str, Any]], costs: dict[str, float]) -> list[dict[str, Any]]:
    """One table row per (dataset, budget, row): mean and std over seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["budget"], r["row"]), []).append(r)
    by_name = {p.name: p for p in POLICIES + METHODS}
    rows = []
    for (ds, budget, row), rs in groups.items():
        pol = by_name.get(rs[0]["policy"])
        if pol is None or not pol.cost and pol.kind != "online":
            cost = 0.0
        elif pol.kind == "online":
            cost = None  # paid inside training: see train s
        else:
            cost = sum(_cost(costs.get(ds, {}), k) for k in pol.cost)
        loss, loss_sd = _mean_std([r["eval_loss"] for r in rs])
        acc, acc_sd = _mean_std([r.get("accuracy") for r in rs])
        old_acc, old_acc_sd = _mean_std([r.get("old_accuracy") for r in rs])
        old_loss, old_loss_sd = _mean_std([r.get("old_eval_loss") for r in rs])
        rows.append(
            {
                "dataset": ds,
                "budget": budget,
                "row": row,
                "gt": rs[0]["gt"],
                "lora": rs[0]["lora"],
                "paired": rs[0]["paired"],
                "seeds": len(rs),
                "samples": _mean_std([r["train_samples"] for r in rs])[0],
                "tokens": _mean_std([r["weighted_tokens"] for r in rs])[0],
                "loss": loss,
                "loss_sd": loss_sd,
                "acc": acc,
                "acc_sd": acc_sd,
                "old_acc": old_acc,
                "old_acc_sd": old_acc_sd,
                "old_loss": old_loss,
                "old_loss_sd": old_loss_sd,
                "scoring_s": cost,
                "train_s": _mean_std([r["train_s"] for r in rs])[0],
            }
        )
    return sorted(rows, key=_order)


def _order(r: dict[str, Any]) -> tuple:
    names = [p.name for p in POLICIES + METHODS]
    pol = r["paired"] or r["row"].split(" ")[0]
    idx = names.index(pol) if pol in names else -1
    variant = 1 if r["paired"] else 2 if r["lora"] else 0
    return (r["dataset"], -(r["budget"] or 1.0), idx, variant)


def _cost(stage_s: dict[str, float], key: str) -> float:
    if key in stage_s:
        return stage_s[key]
    short = key.split(":", 1)[-1]
    return next((v for k, v in stage_s.items() if k.split(":", 1)[-1] == short), 0.0)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| data | budget | row | GT | seeds | samples | weighted tokens | eval loss | exact match % | scoring s | "
        "train s |\n|---|---:|---|:-:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        b = (
            "-"
            if r["budget"] is None
            else "100%"
            if r["row"].startswith("full")
            else f"{int(r['budget'] * 100)}%"
        )
        acc = "-" if np.isnan(r["acc"]) else f"{100 * r['acc']:.1f} ± {100 * r['acc_sd']:.1f}"
        cost = "in training" if r["scoring_s"] is None else f"{r['scoring_s']:.0f}"
        samples = "-" if np.isnan(r["samples"]) else f"{r['samples']:.0f}"
        tokens = "-" if np.isnan(r["tokens"]) else f"{r['tokens']:.0f}"
        lines.append(
            f"| {r['dataset']} | {b} | {r['row']} | {'yes' if r['gt'] else ''} | {r['seeds']} | {samples} | {tokens} | "
            f"{r['loss']:.4f} ± {r['loss_sd']:.4f} | {acc} | {cost} | {r['train_s']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def methods_markdown(rows: list[dict[str, Any]]) -> str:
    """The ``--methods`` table: each method against full on the new templates and (forgetting) the old ones."""
    head = (
        "| data | row | seeds | eval loss | exact match % | old templates: eval loss | old: exact match % | "
        "train s |\n|---|---|---:|---:|---:|---:|---:|---:|\n"
    )

    def pm(m: float, sd: float, scale: float, digits: int) -> str:
        return "-" if np.isnan(m) else f"{scale * m:.{digits}f} ± {scale * sd:.{digits}f}"

    lines = [
        f"| {r['dataset']} | {r['row']} | {r['seeds']} | {pm(r['loss'], r['loss_sd'], 1, 4)} | "
        f"{pm(r['acc'], r['acc_sd'], 100, 1)} | {pm(r['old_loss'], r['old_loss_sd'], 1, 4)} | "
        f"{pm(r['old_acc'], r['old_acc_sd'], 100, 1)} | {r['train_s']:.0f} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def target_check(rows: list[dict[str, Any]], dataset: str = "demo", budget: float = 0.5) -> list[str]:
    """Policies reading no ground-truth column that beat full and their random pair in exact match by more
    than the seed spread (the larger std of the two compared rows; rows with one seed do not count)."""
    at = {r["row"]: r for r in rows if r["dataset"] == dataset and r["budget"] == budget and not r["lora"]}
    full = at.get("full")
    wins = []
    if full is None or np.isnan(full["acc"]):
        return wins
    for name, r in at.items():
        rnd = at.get(f"random~{name}")
        if r["gt"] or name == "full" or name.startswith("random~") or rnd is None:
            continue
        if min(r["seeds"], full["seeds"], rnd["seeds"]) < 2:  # one seed has no spread to beat
            continue
        if all(r["acc"] - o["acc"] > max(r["acc_sd"], o["acc_sd"]) for o in (full, rnd)):
            wins.append(name)
    return wins


# ----------------------------------------------------------------------------------------------- driver
def _prepare(name: str, workdir: Path, args) -> dict[str, Any] | None:
    quick = args.quick
    if name == "demo":
        return prepare_demo(workdir, quick, models=args.models, test_size=args.test_size, start=args.start)
    try:
        from curation_gsm8k import prepare_gsm8k
    except ImportError:
        print("[curation] gsm8k: benchmarks/curation_gsm8k.py is not here yet; skipped", flush=True)
        return None
    # --gsm8k-prep-dir: a prepare already run elsewhere (its model paths are in the run's manifest, so it
    # must be resumed where it was made, not copied)
    where = Path(args.gsm8k_prep_dir) if args.gsm8k_prep_dir else workdir
    return prepare_gsm8k(where, quick, **({"base": args.gsm8k_base} if args.gsm8k_base else {}))


def _ingest_test(prep: dict[str, Any], test_run: Path) -> None:
    _run_steps(
        test_run, [("ingest", {"inputs": [str(prep["eval_jsonl"])], "model": str(prep["base_model"])})]
    )


def ranked(results: list[dict[str, Any]], accuracy: bool, names) -> list[str]:
    """Policies of ``names`` with 50% results, best first (mean accuracy, else lowest held-out loss)."""
    rows = [r for r in aggregate(results, {}) if r["row"] in names and r["budget"] == 0.5]
    return [r["row"] for r in sorted(rows, key=(lambda r: -r["acc"]) if accuracy else (lambda r: r["loss"]))]


def _base_result(name: str, ev: dict[str, Any]) -> dict[str, Any]:
    return {
        "dataset": name,
        "row": "base (no training)",
        "policy": "base",
        "budget": None,
        "seed": 0,
        "gt": False,
        "lora": False,
        "paired": "",
        "train_s": 0.0,
        "train_samples": None,
        "weighted_tokens": None,
        **ev,
    }


def bench_dataset(name: str, args, cfg: TrainCfg, log) -> tuple[list[dict[str, Any]], dict[str, float]]:
    workdir = args.workdir / name
    t0 = time.time()
    prep = _prepare(name, workdir, args)
    if prep is None:
        return [], {}
    log(f"{name}: prepared in {time.time() - t0:.0f}s; stage seconds {prep['stage_seconds']}")
    from winnow.core.store import atomic_write_json

    atomic_write_json(workdir / "stage_seconds.json", prep["stage_seconds"])
    test_run = workdir / "test_run"
    _ingest_test(prep, test_run)
    results = [r for r in read_journal(args.journal) if r["dataset"] == name]
    base = next((r for r in results if r["row"] == "base (no training)"), None)
    if base is None:
        base = _base_result(
            name, evaluate(Path(prep["base_model"]), test_run, prep["accuracy"], cfg.max_new_tokens)
        )
        _append(args.journal, base)
        results.append(base)
    log(
        f"{name}: base model loss {base['eval_loss']:.4f} acc {base.get('accuracy')}; e.g. {base.get('example')!r}"
    )
    names = QUICK_POLICIES if args.quick else tuple(p.name for p in POLICIES)
    if args.rows:
        names = ("full", *args.rows)
    policies = [p for p in POLICIES if p.name in names]
    lora = () if args.quick or args.no_lora else LORA_POLICIES
    ctx = {
        "dataset": name,
        "base_model": prep["base_model"],
        "test_run": test_run,
        "workdir": workdir,
        "accuracy": prep["accuracy"],
        "cfg": dataclasses.asdict(cfg),
        "lora_seeds": args.lora_seeds,
    }
    seeds = list(range(args.seeds))
    journal = lambda: [r for r in read_journal(args.journal) if r["dataset"] == name]  # noqa: E731
    ctx["run_b"] = workdir / "run_b50"
    stats = budget_run(Path(prep["run_dir"]), ctx["run_b"], 0.5, policies)
    log(f"{name}: 50% selections: {stats}")
    jobs50 = _jobs(ctx, 0.5, policies, stats, seeds, lora)

    # Phases, so that a run cut short by --max-minutes still answers the main question (does a policy beat
    # full and random at 50%, beyond the seed spread?): A the core rows once, C every seed of full and the
    # three best of them with their random pairs, A2 every other row once, B the 25% budget for the two best
    # knobbed policies with their pairs, D every remaining seed.
    def core(j):
        return (j["row"] in CORE or j["paired"] in CORE) and not j["lora"]

    run_jobs([j for j in jobs50 if j["seed"] == 0 and core(j)], args, log)
    if args.quick:
        return journal(), prep["stage_seconds"]
    names = [p.name for p in POLICIES if not p.gt and p.name != "full"]
    top = {"full", *ranked(journal(), prep["accuracy"], names)[:3]}
    run_jobs([j for j in jobs50 if (j["row"] in top or j["paired"] in top) and not j["lora"]], args, log)
    run_jobs([j for j in jobs50 if j["seed"] == 0], args, log)
    best = ranked(journal(), prep["accuracy"], TOP_BUDGET_POLICIES)[:2]
    log(f"{name}: 25% budget for {best}")
    ctx25 = ctx | {"run_b": workdir / "run_b25"}
    pol25 = [p for p in POLICIES if p.name in best]
    jobs25 = _jobs(
        ctx25, 0.25, pol25, budget_run(Path(prep["run_dir"]), ctx25["run_b"], 0.25, pol25), seeds, ()
    )
    run_jobs(jobs25, args, log)
    # D: every remaining seed
    run_jobs(jobs50, args, log)
    return journal(), prep["stage_seconds"]


def bench_methods(name: str, args, cfg: TrainCfg, log) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """``--methods``: full and each training method on the whole pool (no scoring model is built or run)."""
    if name != "demo":
        raise SystemExit("--methods runs on --datasets demo")
    workdir = args.workdir / name
    prep = prepare_demo(
        workdir, args.quick, models=args.models, test_size=args.test_size, start=args.start, score=False
    )
    tests = {"test_run": workdir / "test_run"}
    _ingest_test(prep, tests["test_run"])
    if prep.get("eval_old_jsonl"):
        tests["test_run_old"] = workdir / "test_run_old"
        _ingest_test(prep | {"eval_jsonl": prep["eval_old_jsonl"]}, tests["test_run_old"])
    if not any(r["row"] == "base (no training)" for r in read_journal(args.journal)):
        ev = evaluate(Path(prep["base_model"]), tests["test_run"], True, cfg.max_new_tokens)
        if "test_run_old" in tests:
            old = evaluate(Path(prep["base_model"]), tests["test_run_old"], True, cfg.max_new_tokens)
            ev |= {"old_eval_loss": old["eval_loss"], "old_accuracy": old["accuracy"]}
        _append(args.journal, _base_result(name, ev))
    by_name = {p.name: p for p in METHODS}
    policies = [POLICIES[0]] + [
        dataclasses.replace(by_name[m], train=dict(by_name[m].train)) for m in args.methods
    ]
    for kv in args.method_set:  # group.key=value -> the method row named by the group
        key, value = kv.split("=", 1)
        row = next((p for p in policies[1:] if p.name == key.split(".")[0]), None)
        if row is None:
            raise SystemExit(f"--method-set {kv}: no method row {key.split('.')[0]!r} in --methods")
        row.train[key] = value
    ctx = {
        "dataset": name,
        "base_model": prep["base_model"],
        "workdir": workdir,
        "accuracy": True,
        "cfg": dataclasses.asdict(cfg),
        "lora_seeds": 0,
        "run_b": prep["run_dir"],
        **tests,
    }
    run_jobs(_jobs(ctx, 1.0, policies, {}, list(range(args.seeds)), ()), args, log)
    return [r for r in read_journal(args.journal) if r["dataset"] == name], prep["stage_seconds"]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="demo data, builtin models, 1 seed, 4 rows")
    ap.add_argument("--seeds", type=int, default=None, help="default 3 (1 with --quick)")
    ap.add_argument("--workers", type=int, default=2, help="trainings in parallel (one thread each)")
    ap.add_argument(
        "--datasets", default=None, help="comma list of demo,gsm8k (default: demo, +gsm8k in full)"
    )
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per training")
    ap.add_argument("--no-lora", action="store_true", help="skip the LoRA rows")
    ap.add_argument("--rows", default=None, help="comma list of policy rows to run (full is always run)")
    ap.add_argument(
        "--methods",
        default=None,
        help=f"comma list of training methods ({','.join(p.name for p in METHODS)}) to run beside full on the "
        "whole pool instead of the policy rows (no scoring models)",
    )
    ap.add_argument(
        "--method-set",
        action="append",
        default=[],
        help="KEY=VALUE for a method row, e.g. greentrainer.rho=0.7",
    )
    ap.add_argument("--lora-seeds", type=int, default=1, help="seeds of the LoRA rows (the first N)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument(
        "--models",
        choices=("builtin", "quality"),
        default=None,
        help="demo models (default: quality; builtin with --quick)",
    )
    ap.add_argument(
        "--start",
        choices=("base", "new-task"),
        default="base",
        help="demo starting model: the quality base, or the one that never saw the test's templates",
    )
    ap.add_argument(
        "--test-size", type=int, default=None, help="held-out demo problems (500; 150 with --quick)"
    )
    ap.add_argument(
        "--max-minutes", type=float, default=None, help="start no training after this (then report)"
    )
    ap.add_argument("--gsm8k-base", default=None, help="GSM8K starting model (default: curation_gsm8k's)")
    ap.add_argument("--gsm8k-prep-dir", default=None, help="workdir of an earlier prepare_gsm8k to resume")
    ap.add_argument("--report", action="store_true", help="only print the table of the results so far")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 3)
    known = {p.name for p in POLICIES}
    args.rows = args.rows.split(",") if args.rows else None
    if args.rows and not set(args.rows) <= known:
        ap.error(f"--rows: unknown {sorted(set(args.rows) - known)}; rows are {sorted(known)}")
    args.methods = args.methods.split(",") if args.methods else None
    if args.methods and not set(args.methods) <= {p.name for p in METHODS}:
        ap.error(f"--methods: unknown {sorted(set(args.methods) - {p.name for p in METHODS})}")
    default_dir = "curation-quick" if args.quick else "curation" + ("-new-task" if args.start == "new-task" else "")
    default_dir += "-methods" if args.methods else ""
    args.workdir = args.workdir or HERE / "out" / default_dir
    datasets = (args.datasets or ("demo" if args.quick else "demo,gsm8k")).split(",")
    cfg = TrainCfg(steps=args.steps or (40 if args.quick else 150))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.journal = args.workdir / "results.jsonl"
    args.deadline = t0 + 60 * args.max_minutes if args.max_minutes else float("inf")

    def log(msg: str) -> None:
        print(f"[curation {time.time() - t0:6.0f}s] {msg}", flush=True)

    results, costs = [], {}
    for name in datasets:
        if args.report:
            res = [r for r in read_journal(args.journal) if r["dataset"] == name]
            f = args.workdir / name / "stage_seconds.json"
            cost = json.loads(f.read_text()) if f.exists() else {}
        else:
            res, cost = (bench_methods if args.methods else bench_dataset)(name, args, cfg, log)
        results += res
        costs[name] = cost
    rows = aggregate(results, costs)
    table = (methods_markdown if args.methods else markdown)(rows)
    wins = target_check(rows)
    print(table)
    if not args.methods:
        print(
            f"target (demo, 50%, no GT column, beats full and random by more than the seed spread): "
            f"{', '.join(wins) if wins else 'not met'}"
        )
    if not args.report:
        print(f"wall time {time.time() - t0:.0f}s, load average {os.getloadavg()}")
    from winnow.core.store import atomic_write_bytes, atomic_write_json

    atomic_write_bytes(args.workdir / "table.md", table.encode())
    atomic_write_json(
        args.workdir / "results.json",
        {
            "config": dataclasses.asdict(cfg),
            "seeds": args.seeds,
            "quick": args.quick,
            "results": results,
            "rows": rows,
            "target_met_by": wins,
            "wall_s": time.time() - t0,
            "stage_seconds": costs,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
