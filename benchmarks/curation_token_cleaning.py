"""Token Cleaning in the curation benchmark's new-task setting (issue 27 item 4; benchmarks/RESULTS.md, "Token
Cleaning"): fixed-model and self-evolving Token Cleaning against random tokens at each row's own
weighted-token count and against all tokens, the same total steps, trained from ``quality-base-new-task``
(the base that never saw a quarter of the math templates) and evaluated on held-out problems of those
templates. The setting, test set, training configuration and yardsticks are :mod:`curation`'s own
(``--start new-task --datasets demo``, LoRA off; this driver reuses its functions); only the rows are new.

* **base** = ``quality-base-new-task``: its model pass over the demo pool is ``signals/base`` (ℓ_base).
* **reference** ("a copy warmed on a trusted subset"): the base fine-tuned briefly on the 200 clean
  examples of the new task that curation writes as DV4LLM's targets (``dv4llm_targets.jsonl``, a draw
  disjoint from the pool and the test set): ``REF_EPOCHS`` epochs, curation's lr and batch. A user teaching
  a task has such examples; the paper warms on 10k high-quality rows.
* **tc_fixed**: ``token_cleaning`` with rho = 0.6, level = global, trained ``steps`` steps.
* **tc_self_evolving**: ``token_cleaning_rounds`` with T = 4, rho = 0.6: five rounds of ``steps / 5`` steps
  each (each round a fresh warmup and cosine, as each of the authors' rounds is its own fine-tune).
* **random~X**: curation's random pairing at X's kept samples and weighted tokens (per seed for the
  self-evolving row, whose selection depends on the trained models); **full**: every supervised token.

Usage: ``python benchmarks/curation_token_cleaning.py [--seeds 3] [--steps 600] [--workers 2]
[--max-minutes M] [--report]``; results land in ``benchmarks/out/curation-token-cleaning/results.jsonl``
(a rerun skips what is there) and the table in ``table.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import curation as cu  # noqa: E402  (benchmarks/ on sys.path first)

RHO, ROUNDS, REF_EPOCHS = 0.6, 4, 3
ROWS = ("full", "tc_fixed", "random~tc_fixed", "tc_self_evolving", "random~tc_self_evolving")


def prepare(workdir: Path, n_test: int = 500) -> dict[str, Any]:
    """Pool run (base and reference passes, the fixed selection), the test run, the warmed reference."""
    from quality_models import HELD_OUT_TEMPLATES, NEW_TASK_BASE

    from winnow.pipeline.builtin.demo_data import DEMO_SIZE, generate_demo
    from winnow.pipeline.builtin.tiny_model import build_model

    workdir.mkdir(parents=True, exist_ok=True)
    base = build_model(NEW_TASK_BASE)
    pool = {r["messages"][0]["content"] for r in generate_demo(DEMO_SIZE)}
    task, draw = HELD_OUT_TEMPLATES, 4  # exactly curation.prepare_demo(start="new-task")'s draws
    test = cu._write_jsonl(
        workdir / "test.jsonl", cu._demo_rows(3 * draw * n_test, cu.TEST_SEED, pool, task)[:n_test]
    )
    targets = cu._write_jsonl(
        workdir / "dv4llm_targets.jsonl", cu._demo_rows(400 * draw, cu.TARGET_SEED, pool, task)[:200]
    )
    cu._run_steps(workdir / "test_run", [("ingest", {"inputs": [str(test)], "model": str(base)})])
    ref_run = workdir / "reference_run"
    cu._run_steps(
        ref_run,
        [
            ("ingest", {"inputs": [str(targets)], "model": str(base)}),
            ("select", {"policy": "all"}),
            ("train", _train_values(base, "all", epochs=REF_EPOCHS, eval_fraction=0.0)),
        ],
    )
    run = workdir / "run"
    cu._run_steps(
        run,
        [
            ("ingest", {"inputs": ["builtin:demo"], "model": str(base), "shard_rows": 500}),
            ("model_pass", {"model": str(base), "alias": "base", "signals": ["logprob"]}),
            (
                "model_pass",
                {"model": str(ref_run / "train" / "all"), "alias": "reference", "signals": ["logprob"]},
            ),
            ("token_cleaning", {"rho": RHO, "level": "global"}),
            ("select", {"policy": "token_cleaning", "name": "tc_fixed"}),
            ("select", {"policy": "all", "name": "all"}),
        ],
    )
    return {"base": base, "run": run, "test_run": workdir / "test_run"}


def _train_values(base: Path, selection: str, **over: Any) -> dict[str, Any]:
    cfg = cu.TrainCfg()
    values = {
        "model": str(base),
        "selection": selection,
        "tokens_per_batch": cfg.tokens_per_batch,
        "max_seq_len": cfg.max_seq_len,
        "lr": cfg.lr,
        "warmup_steps": cfg.warmup,
        "save_every": 0,
        "keep_checkpoints": 1,
        "progress": False,
        "threads": 1,
    }
    return values | over


def rounds_job(job: dict[str, Any]) -> dict[str, Any]:
    """Self-evolving Token Cleaning on this worker's copy of the run, then curation's evaluation."""
    from winnow.core.params import build_params
    from winnow.core.store import RunDir
    from winnow.pipeline.token_cleaning_rounds import STEP, RoundsParams

    cfg = cu.TrainCfg(**job["cfg"])
    run_dir = cu._run_copy(job["run"])
    train = _train_values(Path(job["base_model"]), "", max_steps=cfg.steps // (ROUNDS + 1), epochs=1000)
    train |= {"eval_fraction": 0.0, "seed": job["seed"]}
    del train["model"], train["selection"]
    p = build_params(
        RoundsParams,
        {
            "model": job["base_model"],
            "rounds": ROUNDS,
            "rho": RHO,
            "name": f"tc_se_s{job['seed']}",
            "train": train,
        },
        "token_cleaning_rounds",
    )
    t0 = time.time()
    entry = STEP.run(RunDir(run_dir, create=False), p)
    train_s = time.time() - t0
    ev = cu.evaluate(
        Path(entry["model"]), Path(job["test_run"]), True, cfg.max_new_tokens, Path(job["base_model"])
    )
    per_round = [{k: r[k] for k in ("round", "kept", "weighted_tokens")} for r in entry["rounds"]]
    kept = _kept_samples(run_dir, p.name)
    return {
        **{k: job[k] for k in ("dataset", "row", "policy", "budget", "seed", "gt", "lora", "paired")},
        "train_s": train_s,
        "train_samples": kept,
        "weighted_tokens": entry["counts"]["weighted_tokens"],
        "kept_share": entry["counts"]["kept_share"],
        "rounds": per_round,
        **ev,
    }


def _kept_samples(run_dir: Path, name: str) -> int:
    from winnow.core.store import RunDir

    run = RunDir(run_dir)
    return sum(
        int(sum(run.table(t).read(columns=["keep"]).to_pydict()["keep"]))
        for t in run.tables()
        if t.startswith(f"selection/{name}-round")
    )


def _job(job: dict[str, Any]) -> dict[str, Any]:
    return rounds_job(job) if job["row"] == "tc_self_evolving" else cu.run_job(job)


def jobs_for(
    seed: int, prep: dict[str, Any], workdir: Path, cfg: cu.TrainCfg, journal: list[dict]
) -> list[dict]:
    common = {
        "dataset": "demo-new-task",
        "budget": RHO,
        "seed": seed,
        "gt": False,
        "lora": False,
        "paired": "",
        "base_model": str(prep["base"]),
        "run": str(prep["run"]),
        "test_run": str(prep["test_run"]),
        "accuracy": True,
        "cfg": dataclasses.asdict(cfg),
    }
    out = workdir / "train" / f"s{seed}"
    jobs = [
        common | {"row": "full", "policy": "full", "selection": "all", "out": str(out / "full")},
        common
        | {"row": "tc_fixed", "policy": "tc_fixed", "selection": "tc_fixed", "out": str(out / "tc_fixed")},
        common | {"row": "tc_self_evolving", "policy": "tc_self_evolving", "out": str(out / "se")},
    ]
    stats = {"tc_fixed": cu._selection_stats(prep["run"], "tc_fixed")}
    se = next((r for r in journal if r["row"] == "tc_self_evolving" and r["seed"] == seed), None)
    if se is not None:  # its random pair needs what its rounds kept
        stats["tc_self_evolving"] = {"samples": se["train_samples"], "tokens": se["weighted_tokens"]}
    for name, st in stats.items():
        data = workdir / "random" / f"{name}-s{seed}.parquet"
        cu.write_random(prep["run"], data, st["samples"], st["tokens"], seed)
        jobs.append(
            common
            | {
                "row": f"random~{name}",
                "policy": "random",
                "paired": name,
                "data": str(data),
                "out": str(out / f"random-{name}"),
            }
        )
    return jobs


def run_all(args, prep: dict[str, Any], cfg: cu.TrainCfg, log) -> None:
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=args.workers, mp_context=mp.get_context("spawn")) as ex:
        pending: dict[Any, str] = {}
        while True:
            journal = cu.read_journal(args.journal)
            done = {cu._key(r) for r in journal} | set(pending.values())
            todo = [
                j
                for s in range(args.seeds)
                for j in jobs_for(s, prep, args.workdir, cfg, journal)
                if cu._key(j) not in done
            ]
            todo.sort(key=lambda j: (j["seed"], j["row"] != "tc_self_evolving"))
            while todo and len(pending) < args.workers and time.time() < args.deadline:
                j = todo.pop(0)
                pending[ex.submit(_job, j)] = cu._key(j)
            if not pending:
                return
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                del pending[f]
                r = f.result()
                cu._append(args.journal, r)
                log(
                    f"{r['row']} s{r['seed']}: loss {r['eval_loss']:.4f} acc {r['accuracy']:.3f} ({r['train_s']:.0f}s train)"
                )


def table(results: list[dict[str, Any]]) -> str:
    rows = []
    for name in ("base (no training)", *ROWS):
        rs = [r for r in results if r["row"] == name]
        if not rs:
            continue
        loss, loss_sd = cu._mean_std([r["eval_loss"] for r in rs])
        acc, acc_sd = cu._mean_std([r.get("accuracy") for r in rs])
        tokens = cu._mean_std([r.get("weighted_tokens") for r in rs])[0]
        rows.append(
            f"| {name} | {len(rs)} | {tokens:,.0f} | {loss:.4f} ± {loss_sd:.4f} | {acc:.3f} ± {acc_sd:.3f} |"
        )
    head = "| row | seeds | weighted tokens | held-out loss | exact match |\n|---|---|---|---|---|"
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=HERE / "out" / "curation-token-cleaning")
    ap.add_argument("--max-minutes", type=float, default=None, help="start no training after this")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.journal = args.workdir / "results.jsonl"
    args.deadline = t0 + 60 * args.max_minutes if args.max_minutes else float("inf")

    def log(msg: str) -> None:
        print(f"[tc {time.time() - t0:6.0f}s] {msg}", flush=True)

    if not args.report:
        cfg = cu.TrainCfg(steps=args.steps)
        prep = prepare(args.workdir)
        log(f"prepared: fixed selection {cu._selection_stats(prep['run'], 'tc_fixed')}")
        if not any(r["row"] == "base (no training)" for r in cu.read_journal(args.journal)):
            ev = cu.evaluate(prep["base"], prep["test_run"], True, cfg.max_new_tokens)
            cu._append(args.journal, cu._base_result("demo-new-task", ev))
        run_all(args, prep, cfg, log)
    results = cu.read_journal(args.journal)
    md = table(results)
    print(md)
    (args.workdir / "table.md").write_text(md + "\n")
    (args.workdir / "results.json").write_text(
        json.dumps({"results": results, "wall_s": time.time() - t0}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
