"""Benchmark: LeMo / JENGA (``--set lemo.predictors``) against dense LoRA on long documents, on CPU.

Data: synthetic long documents, multi-turn chats whose turns are clean demo math/facts chats of a fresh
draw (seed 4242; the builtin tiny model learned this style), or with ``--source gsm8k`` GSM8K train
problems and their reference solutions (``/work/shared/data/gsm8k/train.jsonl``: the tiny model's loss on
them is near chance, 6.9 nats at 2k), rendered with the builtin tokenizer's chat template. A run of ``--docs`` chats of just under
2,048 tokens is ingested; ``winnow lemo-fit`` fits the predictors on it (block 64, layers 1-2 of 4: the
code's ``n//2-1 .. n-2``), twice: at winnow's lr 1e-3 and at the code's 2e-5 (held-out recall of both).

Model: ``builtin:tiny`` (Llama, hidden 128, 4 layers, 4/2 heads, MLP 352, vocabulary 2048), LoRA r 8,
α 16 on q, k, v, o (the paper's setting: the MLP frozen, which LeMo's MLP backward requires), fp32, one
thread. LeMo: keep 0.4 of the blocks in layers 1-2, MLP backward through 20% of the neurons.

1. **Memory and time per step** at ``--lens`` (2k, 4k, 8k tokens; one document per step, cut from a
   longer chain): *activation memory* = bytes of the distinct tensors autograd saves for the backward
   during one training forward (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded, each
   storage counted once) — the part of peak memory LeMo changes; weights, adapters and optimizer state
   are the same in both. Step time = forward + backward + AdamW on the adapters, median of ``--reps``
   steps after one warm-up, dense and LeMo interleaved so load changes hit both.
2. **Quality**: ``winnow train`` dense LoRA vs LeMo LoRA, the same ``--train-steps`` steps (one 2k
   document per step, lr 1e-3), held-out loss (``eval_loss``, the dense model on 10% of the chats).

Run: ``nice -n 5 python -P benchmarks/bench_lemo.py --out /tmp/bench_lemo`` (prints a Markdown table and
writes ``bench_lemo.json``). Imports polars/duckdb only through the winnow CLI it calls (CPU-only bench).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

GSM8K = Path("/work/shared/data/gsm8k/train.jsonl")
WINNOW = str(Path(sys.executable).parent / "winnow")
LORA = ["lora.r=8", "lora.alpha=16", "lora.target=q_proj,k_proj,v_proj,o_proj"]


def problems(source: str) -> list[tuple[str, str]]:
    """(question, answer) turns: clean demo rows of a draw the tiny model was not trained on, or GSM8K train."""
    if source == "gsm8k":
        rows = [json.loads(line) for line in GSM8K.read_text().splitlines() if line.strip()]
        return [(r["question"], r["answer"]) for r in rows]
    from winnow.pipeline.builtin.demo_data import generate_demo

    rows = [
        r for r in generate_demo(3000, seed=4242) if r["corruption"] == "none" and len(r["messages"]) == 2
    ]
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]


def chain(tok, probs, start: int, limit: int) -> tuple[list[dict], int]:
    """Turns from ``probs[start:]`` while the rendered chat stays within ``limit`` tokens."""
    msgs: list[dict] = []
    i = start
    while True:
        q, a = probs[i % len(probs)]
        more = msgs + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        m = len(tok.apply_chat_template(more, tokenize=True, return_dict=True)["input_ids"])
        if m > limit:
            return msgs, i
        msgs, i = more, i + 1


def write_docs(path: Path, tok, probs, n_docs: int, limit: int) -> int:
    at = 0
    with path.open("w") as f:
        for _ in range(n_docs):
            msgs, at = chain(tok, probs, at, limit)
            f.write(json.dumps({"messages": msgs}) + "\n")
    return at


def cli(*args: str) -> str:
    r = subprocess.run([WINNOW, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"winnow {' '.join(map(str, args[:2]))} failed: {r.stderr[-2000:]}")
    return r.stdout


def sets(items: list[str]) -> list[str]:
    return [x for s in items for x in ("--set", s)]


def fit(run: Path, out: Path, lr: float, steps: int) -> dict:
    t0 = time.perf_counter()
    cli("lemo-fit", run, "--model", "builtin:tiny", "--out", out, *sets([f"lr={lr}", f"steps={steps}"]))
    meta = json.loads((out / "lemo_predictors.json").read_text())
    return {"lr": lr, "recall": meta["recall"], "recall_mean": meta["recall_mean"],
            "recall_untrained": meta["recall_untrained"], "seconds": time.perf_counter() - t0}  # fmt: skip


def saved_bytes(fn) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves while ``fn`` runs a forward."""
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def build(model_dir: Path, predictors: Path | None, keep: float = 0.4, mlp_keep: float = 0.2):
    from transformers import AutoModelForCausalLM

    from winnow.trainer.lemo import LemoParams
    from winnow.trainer.lora import LoraParams, apply_lora
    from winnow.trainer.loss import WeightedLMLoss
    from winnow.trainer.method import MethodContext

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.config.use_cache = False
    model = apply_lora(
        model, LoraParams(r=8, alpha=16, target="q_proj,k_proj,v_proj,o_proj"), torch.device("cpu")
    )
    method = None
    if predictors is not None:
        method = LemoParams(predictors=str(predictors), keep=keep, mlp_keep=mlp_keep)
        method.trainable(model, MethodContext(device=torch.device("cpu")))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return WeightedLMLoss(model).train(), method, opt


def step_fn(module, method, opt, ids: torch.Tensor):
    """One training step on one row; returns (saved activation bytes, seconds)."""
    n = ids.shape[1]
    gather = torch.arange(n - 1)
    args = (ids, gather, ids[0, 1:], torch.ones(n - 1))
    batch = types.SimpleNamespace(position_ids=np.arange(n)[None])

    def one():
        import contextlib

        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with method.forward_change(batch, module.model) if method else contextlib.nullcontext():
            nbytes, loss = saved_bytes(lambda: module(*args))
            loss.backward()
        opt.step()
        return nbytes, time.perf_counter() - t0

    return one


def measure(model_dir: Path, predictors: Path, ids_long: list[int], lens: list[int], reps: int) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for n in lens:
        ids = torch.tensor(ids_long[:n])[None]
        fns = {k: step_fn(*build(model_dir, p), ids) for k, p in (("dense", None), ("lemo", predictors))}
        res: dict[str, list] = {k: [] for k in fns}
        for f in fns.values():
            f()  # warm-up
        for _ in range(reps):
            for k, f in fns.items():
                res[k].append(f())
        row = {"tokens": n}
        for k, r in res.items():
            row[f"{k}_act_MiB"] = r[0][0] / 2**20
            row[f"{k}_step_s"] = statistics.median(x[1] for x in r)
        row["mem_ratio"] = row["dense_act_MiB"] / row["lemo_act_MiB"]
        row["speedup"] = row["dense_step_s"] / row["lemo_step_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _rss_bytes() -> int:
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_child(work: Path, mode: str, n: int) -> None:
    """In a fresh process: peak RSS of one training step beyond the RSS before it (model, adapters loaded)."""
    import resource

    from winnow.core.models import resolve_model
    from winnow.pipeline import steps  # noqa: F401  (registers builtin:tiny)

    torch.set_num_threads(1)
    ids = torch.tensor(json.loads((work / "ids_long.json").read_text())[:n])[None]
    pred = None if mode == "dense" else work / "pred_2e-05"
    one = step_fn(*build(resolve_model("builtin:tiny"), pred), ids)
    before, peak_before = _rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    one()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    valid = peak > peak_before  # the step set the process's high-water mark
    print(
        json.dumps({"mode": mode, "tokens": n, "step_peak_MiB": (peak - before) / 2**20 if valid else None})
    )


def rss(work: Path, lens: list[int]) -> list[dict]:
    out = []
    for n in lens:
        row = {"tokens": n}
        for mode in ("dense", "lemo"):
            args = [sys.executable, "-P", __file__, "--out", str(work), "--rss-child", f"{mode}:{n}"]
            r = subprocess.run(args, capture_output=True, text=True, check=True)
            row[f"{mode}_rss_MiB"] = json.loads(r.stdout.strip().splitlines()[-1])["step_peak_MiB"]
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def parts(model_dir: Path, predictors: Path, ids_long: list[int], n: int) -> dict:
    """Activation MiB at ``n`` tokens with only the attention sparsity, only the MLP's, both (one step each)."""
    ids = torch.tensor(ids_long[:n])[None]
    out = {}
    for name, keep, mlp in (("attention only", 0.4, 1.0), ("MLP only", 1.0, 0.2), ("both", 0.4, 0.2)):
        out[name] = step_fn(*build(model_dir, predictors, keep, mlp), ids)()[0] / 2**20
    print(json.dumps(out), flush=True)
    return out


def quality(run: Path, work: Path, predictors: Path, steps: int) -> dict:
    base = [*LORA, f"max_steps={steps}", "lr=1e-3", "tokens_per_batch=2048", "max_seq_len=2048",
            "eval_fraction=0.1", "warmup_steps=2", "save_every=0"]  # fmt: skip
    out = {}
    for name, extra in (("dense", []), ("lemo", [f"lemo.predictors={predictors}"])):
        t0 = time.perf_counter()
        dest = work / f"train_{name}"
        cli("train", run, "--selection", "all", "--model", "builtin:tiny", "--out", dest, *sets(base + extra))
        res = json.loads((dest / "train_result.json").read_text())
        out[name] = {"eval_before": res.get("eval_loss_before"), "eval_after": res.get("eval_loss"),
                     "seconds": time.perf_counter() - t0}  # fmt: skip
        print(name, json.dumps(out[name]), flush=True)
    return out


def table(mem: list[dict], fits: list[dict], q: dict) -> str:
    lines = ["| tokens | dense LoRA act. MiB | LeMo act. MiB | memory ratio | dense step s | LeMo step s | speed-up |",
             "|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in mem:
        lines.append(
            f"| {r['tokens']} | {r['dense_act_MiB']:.1f} | {r['lemo_act_MiB']:.1f} | {r['mem_ratio']:.2f}x | "
            f"{r['dense_step_s']:.2f} | {r['lemo_step_s']:.2f} | {r['speedup']:.2f}x |"
        )
    lines += [
        "",
        "| predictors (lr) | held-out recall per layer | mean | untrained | fit s |",
        "|---|---|---:|---:|---:|",
    ]
    for f in fits:
        un = sum(f["recall_untrained"].values()) / len(f["recall_untrained"])
        per = ", ".join(f"{k}: {v:.3f}" for k, v in f["recall"].items())
        lines.append(f"| {f['lr']:g} | {per} | {f['recall_mean']:.3f} | {un:.3f} | {f['seconds']:.0f} |")
    lines += ["", "| training | eval loss before | after | seconds |", "|---|---:|---:|---:|"]
    for k, v in q.items():
        lines.append(f"| {k} LoRA | {v['eval_before']:.4f} | {v['eval_after']:.4f} | {v['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--docs", type=int, default=60)
    ap.add_argument("--lens", default="2048,4096,8192")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fit-steps", type=int, default=400)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--source", choices=["demo", "gsm8k"], default="demo")
    ap.add_argument("--rss-child", default="", help=argparse.SUPPRESS)  # mode:tokens, in a fresh process
    a = ap.parse_args()
    work = a.out or Path(tempfile.mkdtemp(prefix="bench_lemo_"))
    work.mkdir(parents=True, exist_ok=True)
    if a.rss_child:
        mode, n = a.rss_child.split(":")
        return rss_child(work, mode, int(n))
    from winnow.core.models import load_tokenizer, resolve_model
    from winnow.pipeline import steps  # noqa: F401  (registers builtin:tiny)

    model_dir = resolve_model("builtin:tiny")
    tok = load_tokenizer(model_dir)
    probs = problems(a.source)
    at = write_docs(work / "docs.jsonl", tok, probs, a.docs, 2047)
    long_msgs, _ = chain(tok, probs, at, max(int(x) for x in a.lens.split(",")) + 64)
    ids_long = tok.apply_chat_template(long_msgs, tokenize=True, return_dict=True)["input_ids"]
    (work / "ids_long.json").write_text(json.dumps(list(ids_long)))
    run = work / "run"
    if not (run / "samples").exists():
        cli(
            "ingest", work / "docs.jsonl", "--run", run, "--model", "builtin:tiny", "--set", "max_tokens=4096"
        )
    fits = [fit(run, work / f"pred_{lr:g}", lr, a.fit_steps) for lr in (1e-3, 2e-5)]
    print(json.dumps(fits), flush=True)
    pred = work / "pred_2e-05"  # the default rate (the RESULTS run of 2026-12-08 used pred_0.001)
    mem = measure(model_dir, pred, ids_long, [int(x) for x in a.lens.split(",")], a.reps)
    lens = [int(x) for x in a.lens.split(",")]
    split = parts(model_dir, pred, ids_long, max(lens))
    peaks = rss(work, lens)
    q = quality(run, work, pred, a.train_steps)
    res = {"memory_time": mem, "parts": split, "rss": peaks, "fits": fits, "quality": q}
    (work / "bench_lemo.json").write_text(json.dumps(res, indent=1))
    print(table(mem, fits, q))
    print(
        f"\nactivation MiB at {max(lens)} tokens: {json.dumps(split)}\npeak RSS of one step: {json.dumps(peaks)}"
    )


if __name__ == "__main__":
    main()
