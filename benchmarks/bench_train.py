"""Benchmark: `winnow train` against the HF Trainer and TRL's SFTTrainer, one epoch over the same samples.

Contenders, each in its own process (peak RSS is its own), same model, same samples, fp32 on CPU,
AdamW at lr 1e-4, one epoch, the same thread count:

* ``hf_trainer``: ``transformers.Trainer``, batches of 8 samples right-padded with an attention mask, a
  custom ``compute_loss``: full logits, ``log_softmax`` in fp32, ``Σ w·nll / Σ w`` per batch.
* ``trl_packed``: TRL ``SFTTrainer`` with ``packing=True`` (``bfd``, padding-free rows of
  ``--tokens`` tokens), ``bf16=False`` (TRL's default bf16 is ~10x slower on this CPU), the weights as
  a binary ``completion_mask`` (TRL has no float weights).
* ``trl_padded``: the same without packing, batches of 8 samples.
* ``winnow``: ``winnow train --data export.parquet`` (trimmed, length-bucketed rows of ``--tokens``
  tokens on CPU, gathered chunked LM head), no held-out split.

Data: ``--samples`` samples, lengths log-normal (median 200) clipped to 16..1024, the first ~45% of
each sample a prompt (weight 0), random token ids. Two weightings, run side by side: ``ones`` (every
response token at 1) and ``half`` (the trailing half of every response at 0: winnow trims it away).
Model: Llama, hidden 256, 4 layers, 4 heads, SwiGLU 688, tied embeddings, vocabulary 32000.

Reported: weighted (supervised) target tokens per second of training (the same numerator for everyone:
the weighted targets of one epoch), peak RSS, and the mean training loss of the epoch (random ids: every
contender should sit near ln V = 10.37 and agree to ~0.05).

Run: ``python benchmarks/bench_train.py [--samples 192] [--threads 1] [--out benchmarks/out/train.json]``
(needs ``pip install 'winnow[bench]'`` for TRL and accelerate).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONTENDERS = ("hf_trainer", "trl_packed", "trl_padded", "winnow")
# winnow variants (``--contenders winnow,q_tuning,...``): the same epoch with an online policy or LoRA;
# their table compares epoch time and peak RSS with plain weighted training on the same samples
VARIANTS = {
    "minibatch": {"online": "all"},  # the policies' control: the same 8-sample mini-batches, no scoring
    "q_tuning": {"online": "q_tuning"},  # r_sample 0.25: a no-grad scoring forward + a quarter trained
    "rho1": {"online": "rho1"},  # + a reference forward (rho1.reference = a second copy of the model)
    "sstoken": {
        "online": "sstoken",
        "online_scoring": "separate",
    },  # history = start (a frozen copy), gamma 0.5: attention recomputed
    "lora": {"lora_r": 16},
    "prompt_tuning": {"prompt_tuning.num_virtual_tokens": 20},  # padded rows, 20 more positions each
    # the current model's scores from the training forward instead of a separate no-grad one (online_reuse)
    "q_tuning_reuse": {"online": "q_tuning", "online_scoring": "reuse"},
    "rho1_reuse": {"online": "rho1", "online_scoring": "reuse"},
    "sstoken_reuse": {"online": "sstoken", "online_scoring": "reuse"},
    # training methods of issue 26 (defaults: OTR K = 256, CAFT 4 heads; GreenTrainer re-selects every 2 epochs)
    "otr": {"loss": "otr"},
    "dft": {"loss": "dft"},
    "caft": {"caft.heads": 4},
    "hft": {"hft": "true"},
    "greentrainer": {
        "greentrainer.rho": 0.7
    },  # 0.5 fits no tensor here: the tied head (V 32000, D 256) costs 25%
}


# ----------------------------------------------------------------------------------------- setup
def build(root: Path, a) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    mdir = root / "model"
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        use_cache=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    )
    LlamaForCausalLM(cfg).save_pretrained(mdir, safe_serialization=True)
    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(a.vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1").save_pretrained(mdir)
    rng = np.random.default_rng(a.seed)
    lens = np.clip(np.exp(rng.normal(np.log(200), 0.9, a.samples)), 16, 1024).astype(int)
    ids = [rng.integers(2, a.vocab, n).tolist() for n in lens]
    starts = [int(n * rng.uniform(0.3, 0.6)) for n in lens]  # ~45% prompt tokens on average
    for mode in ("ones", "half"):
        rows = []
        for n, start in zip(lens, starts, strict=True):
            w = np.zeros(n, np.float32)
            w[start:] = 1.0
            if mode == "half":  # the trailing half of the response weighs 0
                w[start + (n - start + 1) // 2 :] = 0.0
            rows.append(w)
        t = pa.table(
            {
                "sample_id": [f"s{i}" for i in range(a.samples)],
                "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
                "token_weight": pa.array([w.tolist() for w in rows], type=pa.list_(pa.float32())),
                "loss_mask": pa.array(
                    [(w > 0).astype(np.uint8).tolist() for w in rows], type=pa.list_(pa.uint8())
                ),
            }
        )
        pq.write_table(t, root / f"{mode}.parquet")
    return mdir


def _read(path: str):
    import pyarrow.parquet as pq

    d = pq.read_table(path).to_pydict()
    return d["input_ids"], [np.asarray(w, np.float32) for w in d["token_weight"]]


def weighted_targets(path: str) -> int:
    _, ws = _read(path)
    return int(sum(np.count_nonzero(w[1:]) for w in ws))


# ----------------------------------------------------------------------------------------- workers
def _hf_args(a, out: str, batch: int):
    from transformers import TrainingArguments

    return dict(
        output_dir=out,
        per_device_train_batch_size=batch,
        num_train_epochs=1,
        learning_rate=1e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    ), TrainingArguments


def worker_hf(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer

    ids, ws = _read(a.data)
    ds = Dataset.from_dict({"input_ids": ids, "w": [w.tolist() for w in ws]})

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        x = torch.zeros(len(rows), width, dtype=torch.long)
        att = torch.zeros(len(rows), width, dtype=torch.long)
        w = torch.zeros(len(rows), width)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            x[i, :n], att[i, :n], w[i, :n] = torch.tensor(r["input_ids"]), 1, torch.tensor(r["w"])
        return {"input_ids": x, "attention_mask": att, "w": w}

    class Weighted(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            w = inputs.pop("w")
            out = model(**inputs, use_cache=False)
            logp = out.logits.float().log_softmax(-1)[:, :-1]
            nll = -logp.gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
            ww = w[:, 1:]
            loss = (nll * ww).sum() / ww.sum().clamp_min(1e-9)
            return (loss, out) if return_outputs else loss

    kw, TA = _hf_args(a, a.tmp, 8)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    tr = Weighted(model=model, args=TA(**kw), train_dataset=ds, data_collator=collate)
    t0 = time.perf_counter()
    m = tr.train().metrics
    return {"train_s": time.perf_counter() - t0, "loss": m["train_loss"]}


def worker_trl(a, packing: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    ids, ws = _read(a.data)
    ds = Dataset.from_dict({"input_ids": ids, "completion_mask": [(w > 0).astype(int).tolist() for w in ws]})
    kw, _ = _hf_args(a, a.tmp, 1 if packing else 8)
    cfg = SFTConfig(
        **kw,
        packing=packing,
        max_length=a.tokens if packing else 1024,
        completion_only_loss=True,
        **({"packing_strategy": "bfd", "padding_free": True} if packing else {}),
    )
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    tr = SFTTrainer(
        model=model, args=cfg, train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(a.model)
    )
    t0 = time.perf_counter()
    m = tr.train().metrics
    return {"train_s": time.perf_counter() - t0, "loss": m["train_loss"]}


def worker_winnow(a, variant: str = "") -> dict:
    from winnow.core.params import build_params
    from winnow.pipeline.train import train
    from winnow.trainer.config import TrainParams

    extra = dict(VARIANTS.get(variant, {}))
    if extra.get("online") == "rho1":
        extra["rho1.reference"] = a.model  # the same weights: the cost is what is measured here
    base = dict(
        model=a.model,
        data=a.data,
        out=str(Path(a.tmp) / "out"),
        epochs=1,
        lr=1e-4,
        tokens_per_batch=a.tokens,
        max_seq_len=1024,
        eval_fraction=0.0,
        save_every=0,
        threads=a.threads,
        progress=False,
    )
    p = build_params(TrainParams, {**base, **extra}, "bench_train")
    res = train(p)
    rows = [json.loads(x) for x in (Path(p.out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    wsum = sum(r["weight_sum"] for r in steps)
    return {
        "train_s": sum(r["step_s"] for r in steps),
        "loss": sum(r["loss"] * r["weight_sum"] for r in steps) / wsum,
        "wall_s": res["wall_s"],
    }


# ----------------------------------------------------------------------------------------- driver
def spawn(kind: str, a, model: Path, data: Path, more: list[str] | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            kind,
            "--threads",
            str(a.threads),
            "--tokens",
            str(a.tokens),
            "--model",
            str(model),
            "--data",
            str(data),
            "--tmp",
            tmp,
            *(more or []),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict, targets: dict) -> list[str]:
    lines = [
        "| weights | contender | weighted tok/s | vs hf_trainer | vs best TRL | peak RSS MB | RSS vs hf | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, rows in results.items():
        tps = {k: targets[mode] / r["train_s"] for k, r in rows.items()}
        best_trl = max(tps.get("trl_packed", 0.0), tps.get("trl_padded", 0.0)) or float("nan")
        for k, r in rows.items():
            lines.append(
                f"| {mode} | {k} | {tps[k]:,.0f} | {tps[k] / tps['hf_trainer']:.2f}x | {tps[k] / best_trl:.2f}x | "
                f"{r['max_rss_mb']:,.0f} | {r['max_rss_mb'] / rows['hf_trainer']['max_rss_mb']:.2f}x | {r['loss']:.4f} |"
            )
    if "ones" in results and "half" in results:
        w = (
            targets["half"]
            / results["half"]["winnow"]["train_s"]
            / (targets["ones"] / results["ones"]["winnow"]["train_s"])
        )
        t_ratio = results["ones"]["winnow"]["train_s"] / results["half"]["winnow"]["train_s"]
        lines.append(
            f"\nwinnow, trailing half at weight 0: {t_ratio:.2f}x faster per epoch "
            f"({w:.2f}x the weighted tok/s of `ones`, with half the weighted targets)"
        )
    return lines


def variant_table(results: dict) -> list[str]:
    """Online policies and LoRA against plain winnow on the same epoch (same samples, same process setup)."""
    out = [
        "",
        "| weights | variant | epoch train s | vs plain winnow | peak RSS MB | RSS vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for mode, rows in results.items():
        if "winnow" not in rows:
            continue
        plain = rows["winnow"]
        for k, r in rows.items():
            if k in VARIANTS:
                same = rows.get("minibatch") if VARIANTS[k].get("online") not in (None, "all") else None
                vs = f" ({r['train_s'] / same['train_s']:.2f}x mini-batch control)" if same else ""
                out.append(
                    f"| {mode} | {k} | {r['train_s']:.1f} | {r['train_s'] / plain['train_s']:.2f}x{vs} | "
                    f"{r['max_rss_mb']:,.0f} | {r['max_rss_mb'] / plain['max_rss_mb']:.2f}x |"
                )
    return out if len(out) > 3 else []


# ----------------------------------------------------------------------------------------- interleaved
# ``--interleaved``: one process, one Loop per variant (own model copy, same seed: the same mini-batches at
# every step), their train_step calls interleaved step by step in a rotating order, so every variant
# meets the same machine load; the per-step ratio to the mini-batch control is the number to quote on a
# loaded VM (whole-epoch runs in separate processes differed by up to 1.5x between identical runs here).
# ``--epochs N``: N epochs over the same mini-batches, the table per epoch (ssToken's history=start losses
# are cached per sample from epoch 2 on: its epoch 1 and later epochs cost differently).
INTERLEAVED = {
    "minibatch": {"online": "all"},
    "q_tuning": {"online": "q_tuning"},
    "q_tuning_reuse": {"online": "q_tuning", "online_scoring": "reuse"},
    "rho1": {"online": "rho1"},
    "rho1_reuse": {"online": "rho1", "online_scoring": "reuse"},
    "sstoken": {"online": "sstoken", "online_scoring": "separate"},
    "sstoken_reuse": {"online": "sstoken", "online_scoring": "reuse"},
}


def _loop(a, extra: dict):
    import torch
    from transformers import AutoModelForCausalLM

    from winnow.core.params import build_params
    from winnow.pipeline import train as data_mod
    from winnow.trainer.config import TrainParams
    from winnow.trainer.distributed import Dist
    from winnow.trainer.loop import Env, Loop

    base = dict(
        model=a.model, data=a.data, out=a.tmp, tokens_per_batch=a.tokens, max_seq_len=1024, epochs=a.epochs
    )
    p = build_params(TrainParams, {**base, "eval_fraction": 0.0, "progress": False, **extra}, "bench")
    load = lambda: AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)  # noqa: E731
    ref = load().eval().requires_grad_(False) if extra.get("online") == "rho1" else None
    env = Env(torch.device("cpu"), Dist(), Path(a.tmp))
    return Loop(p, data_mod.load_data(p, None), load(), env, ref)


def worker_interleaved(a) -> dict:
    names = a.variants.split(",")
    loops = {k: _loop(a, INTERLEAVED[k]) for k in names}
    steps = min(lp.total_steps for lp in loops.values())
    times: dict[str, list[float]] = {k: [] for k in names}
    for s in range(steps):
        for k in names[s % len(names) :] + names[: s % len(names)]:
            t0 = time.perf_counter()
            loops[k].train_step(s)
            times[k].append(time.perf_counter() - t0)
    per_epoch = min(lp.steps_per_epoch for lp in loops.values())
    return {"steps": steps, "steps_per_epoch": per_epoch, "times": times}


def interleaved_table(res: dict, control: str = "minibatch") -> list[str]:
    """Per epoch: each variant's summed step time, its ratio to the control's sum, the median per-step
    ratio (epoch 2 on differs from epoch 1 where a variant caches per-sample work, e.g. ssToken's history)."""
    t, spe = res["times"], res.get("steps_per_epoch") or res["steps"]
    out = [
        "| epoch | variant | step s (sum) | vs control (sum) | median per-step ratio |",
        "|---|---|---|---|---|",
    ]
    for e in range(-(-res["steps"] // spe)):
        span = slice(e * spe, (e + 1) * spe)
        c = t[control][span]
        for k, v in t.items():
            v = v[span]
            ratios = sorted(x / y for x, y in zip(v, c, strict=True))
            out.append(
                f"| {e + 1} | {k} | {sum(v):.1f} | {sum(v) / sum(c):.2f}x | {ratios[len(ratios) // 2]:.2f}x |"
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=192)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per micro-batch (winnow, TRL packing)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--out", default="benchmarks/out/train.json")
    ap.add_argument("--interleaved", action="store_true", help="online policies step by step in one process")
    ap.add_argument("--variants", default=",".join(INTERLEAVED), help="with --interleaved")
    ap.add_argument(
        "--epochs", type=int, default=1, help="with --interleaved: epochs over the same mini-batches"
    )
    for hidden in ("--worker", "--model", "--data", "--tmp"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        fn = {
            "hf_trainer": worker_hf,
            "trl_packed": lambda x: worker_trl(x, True),
            "trl_padded": lambda x: worker_trl(x, False),
            "winnow": worker_winnow,
            "interleaved": worker_interleaved,
            **{v: (lambda x, v=v: worker_winnow(x, v)) for v in VARIANTS},
        }[a.worker]
        res = fn(a)
        res["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    if a.interleaved:
        return main_interleaved(a)
    results: dict[str, dict] = {}
    targets: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = build(Path(tmp), a)
        for mode in ("ones", "half"):
            data = Path(tmp) / f"{mode}.parquet"
            targets[mode] = weighted_targets(str(data))
            results[mode] = {}
            for kind in a.contenders.split(","):
                results[mode][kind] = spawn(kind, a, model, data)
                print(mode, kind, json.dumps(results[mode][kind]), flush=True)
    lines = table(results, targets) if "hf_trainer" in a.contenders.split(",") else []
    lines += variant_table(results)
    print("\n".join(lines))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "targets": targets, "results": results}, indent=2))


def main_interleaved(a) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = build(Path(tmp), a)
        res = {}
        for mode in ("ones", "half"):
            res[mode] = spawn(
                "interleaved",
                a,
                model,
                Path(tmp) / f"{mode}.parquet",
                ["--variants", a.variants, "--epochs", str(a.epochs)],
            )
            print(mode, f"({res[mode]['steps']} steps)", flush=True)
            print("\n".join(interleaved_table(res[mode])), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "interleaved": res}, indent=2))


if __name__ == "__main__":
    main()
