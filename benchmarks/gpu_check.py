"""The GPU check's measurements (run by ``benchmarks/gpu_check.sh``; see that script for the order).

Sections, each timed and written into ``OUTDIR/gpu_check.json`` as soon as it finishes (atomically:
a run cut off by the device's time limit still leaves every finished section), each wrapped so that a
failure is recorded and the next section still runs:

1. ``loss_step``: weighted linear CE forward + backward, materialized logits vs the chunked reference
   vs the Triton kernel (vs Liger / CCE if importable), at V = 32k and 128k, N = 16k rows, D = 2048,
   bf16: ms per step and peak memory beyond inputs and returned gradients.
2. ``head``: per-token log-prob + entropy over N = 16k rows, V = 128k, the passes' fp32 head: chunked
   reference vs Triton.
3. ``model_pass``: :func:`winnow.stages.passes.model_scoring.score_samples` (log-prob + entropy) on a
   random-init ~1B Llama, ``WINNOW_KERNELS=reference`` vs ``triton``.
4. ``train_step``: the same ~1B Llama (Llama-3.2-1B shape: hidden 2048, 16 layers, 32/8 heads, MLP 8192,
   V = 128256, tied), 4 x 4096 tokens, SDPA causal attention, fwd + bwd + fused AdamW, bf16, with the
   loss from materialized logits vs the fused kernel (and through the trainer's ``WeightedLMLoss`` when
   ``winnow.trainer.loss`` exists): tokens/s, MFU, peak memory.
5. ``lora``: ``winnow train``'s two setups side by side on the same ~1B config and batch, both through
   ``WeightedLMLoss`` under bf16 autocast with AdamW: full fine-tuning (fp32 weights, every parameter
   trained) vs LoRA r = 16 on every linear layer (``winnow.trainer.lora.apply_lora``: frozen bf16 base,
   fp32 adapters): tokens/s, trainable parameters and peak memory of the whole training state (weights,
   gradients, optimizer, activations), measured from an empty allocation; then the ratios.
6. ``packer``: one micro-batch of ragged samples packed by the torch reference on CPU, on the GPU, by the
   CuPy packer, and by the trainer's numpy packer when present (each including the host -> device
   copy), against the step time of section 4.

MFU = model FLOPs / time / peak, model FLOPs per token = 6 * (non-embedding parameters + head) +
12 * layers * hidden * seq (attention, no causal discount: the PaLM convention), against 989 TFLOP/s
(datasheet) and 780 TFLOP/s (a bf16 8192^3 matmul measured on this H200, ENVIRONMENT_NOTES).

``--cpu-smoke`` runs every section at toy sizes on the CPU (Triton under the interpreter), to check
the script itself where there is no GPU. Imports no polars, duckdb or datasets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_kernels  # noqa: E402

PEAK_DATASHEET, PEAK_MEASURED = 989e12, 780e12

FULL = dict(n=16384, d=2048, vocabs=[32768, 131072], head_n=16384, head_v=131072, layers=16, hidden=2048,
            inter=8192, heads=32, kv=8, vocab=128256, batch=4, seq=4096, reps=3, pass_samples=64,
            pass_len=1024, pack_samples=64, pack_len=2048)
SMOKE = dict(n=64, d=32, vocabs=[300], head_n=50, head_v=300, layers=2, hidden=64, inter=128, heads=4, kv=2,
             vocab=300, batch=2, seq=64, reps=1, pass_samples=6, pass_len=40, pack_samples=8, pack_len=50)


class Recorder:
    def __init__(self, out: Path, meta: dict):
        self.path = out / "gpu_check.json"
        self.data = {"meta": meta, "sections": {}}
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def section(self, name: str, fn, *args) -> None:
        t0 = time.time()
        print(f"== {name}", flush=True)
        try:
            result = {"ok": True, "result": fn(*args)}
        except Exception as e:  # noqa: BLE001 - record and go on to the next section
            traceback.print_exc()
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        result["seconds"] = round(time.time() - t0, 1)
        self.data["sections"][name] = result
        self.flush()


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: str, reps: int) -> float:
    fn()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(dev)
    return (time.perf_counter() - t0) / reps


def peak_of(fn, dev: str) -> float | None:
    if dev != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)


# ------------------------------------------------------------------------------------- sections
def loss_step(dev: str, c: dict) -> list[dict]:
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    rows = bench_kernels.run(dev, c["vocabs"], c["n"], c["d"], dtype, c["reps"], memory=dev == "cuda")
    if dev != "cuda":  # the interpreter: correctness of the call path only, not a timing
        from winnow.kernels.triton_linear_cross_entropy import linear_cross_entropy_triton

        inputs = bench_kernels.make_inputs(c["n"], c["vocabs"][0], c["d"], dtype, dev)
        rows.append({"contender": "triton(interpreted)", "loss": bench_kernels.step(linear_cross_entropy_triton, *inputs)})
    return rows


def head(dev: str, c: dict) -> dict:
    from winnow.kernels import chunked_head
    from winnow.kernels.chunked_head import LMHead

    g = torch.Generator().manual_seed(0)
    hd = LMHead((torch.randn(c["head_v"], c["d"], generator=g) / c["d"] ** 0.5).to(dev))
    h = torch.randn(c["head_n"], c["d"], generator=g).to(dev)
    t = torch.randint(0, c["head_v"], (c["head_n"],), generator=g).to(dev)
    from winnow.kernels.triton_linear_cross_entropy import logprob_entropy_triton

    out = {"N": c["head_n"], "V": c["head_v"], "D": c["d"]}
    lp_r, ent_r = chunked_head.logprob_entropy(hd, h, t)
    lp_t, ent_t = logprob_entropy_triton(hd, h, t)
    out["max_abs_diff"] = [float((lp_r - lp_t).abs().max()), float((ent_r - ent_t).abs().max())]
    if dev == "cuda":
        out["reference_ms"] = 1e3 * timed(lambda: chunked_head.logprob_entropy(hd, h, t), dev, c["reps"])
        out["triton_ms"] = 1e3 * timed(lambda: logprob_entropy_triton(hd, h, t), dev, c["reps"])
        out["reference_peak_GiB"] = peak_of(lambda: chunked_head.logprob_entropy(hd, h, t), dev)
        out["triton_peak_GiB"] = peak_of(lambda: logprob_entropy_triton(hd, h, t), dev)
    print(out, flush=True)
    return out


def build_llama(dev: str, c: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"],
                      num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv"],
                      tie_word_embeddings=True, max_position_embeddings=max(4096, c["seq"]), rope_theta=500000.0,
                      use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16 if dev == "cuda" else torch.float32)


def model_flops_per_token(model, c: dict) -> float:
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    n += model.get_output_embeddings().weight.numel()  # the tied head still runs as a matmul
    return 6.0 * n + 12.0 * c["layers"] * c["hidden"] * c["seq"]


def model_pass(dev: str, c: dict, model) -> dict:
    from winnow.kernels.chunked_head import LMHead
    from winnow.stages.passes.model_io import LoadedModel
    from winnow.stages.passes.model_scoring import score_samples

    model.eval()
    loaded = LoadedModel(model=model, body=model.base_model, head=LMHead(model.lm_head.weight).to_fp32(),
                         path=Path("."), fingerprint="gpu-check", device=torch.device(dev),
                         dtype=next(model.parameters()).dtype, layout="padded")
    rng = np.random.default_rng(0)
    lens = rng.integers(c["pass_len"] // 4, c["pass_len"], c["pass_samples"])
    seqs = [rng.integers(0, c["vocab"], n) for n in lens]
    masks = [np.r_[np.zeros(n // 3, bool), np.ones(n - n // 3, bool)] for n in lens]
    out = {"samples": len(seqs), "tokens": int(lens.sum())}
    results = {}
    for backend in ("reference", "triton"):
        os.environ["WINNOW_KERNELS"] = backend
        run = lambda: score_samples(loaded, seqs, masks, signals=["logprob", "entropy"])  # noqa: E731
        results[backend] = run()
        sec = timed(run, dev, 1)
        out[f"{backend}_s"] = round(sec, 3)
        out[f"{backend}_tokens_per_s"] = round(out["tokens"] / sec)
    os.environ.pop("WINNOW_KERNELS")
    a, b = (results[k].values["logprob"] for k in ("reference", "triton"))
    out["logprob_max_abs_diff"] = float(np.abs(a - b).max())
    print(out, flush=True)
    return out


def _batch(dev: str, c: dict):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, c["vocab"], (c["batch"], c["seq"]), generator=g)
    w = torch.rand(c["batch"], c["seq"] - 1, generator=g)
    w[torch.rand(w.shape, generator=g) < 0.3] = 0.0
    return ids.to(dev), ids[:, 1:].reshape(-1).to(dev), w.reshape(-1).to(dev)


def _trainer_loss(model, ids, weights):
    """The trainer's own loss module (body, gather, fused head) when this checkout has it, else None."""
    import importlib.util

    if importlib.util.find_spec("winnow.trainer.loss") is None:
        return None
    from winnow.trainer.loss import WeightedLMLoss

    module = WeightedLMLoss(model)
    b, s = ids.shape
    w2 = weights.view(b, s - 1)
    r, col = torch.nonzero(w2, as_tuple=True)  # position col of row r predicts token col + 1
    gather, targets, wt = r * s + col, ids[r, col + 1], w2[r, col]
    return lambda: module(ids, gather, targets, wt) / wt.sum()


def train_step(dev: str, c: dict, model) -> dict:
    from winnow.kernels.switch import linear_cross_entropy

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=dev == "cuda")
    ids, targets, weights = _batch(dev, c)
    d = c["hidden"]

    def loss_fused():
        h = model.model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, d)
        return linear_cross_entropy(h, model.lm_head.weight, targets, weights) / weights.sum()

    def loss_materialized():
        logits = model(input_ids=ids).logits[:, :-1].reshape(-1, c["vocab"]).float()
        per = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        return (weights * per).sum() / weights.sum()

    tokens = ids.numel()
    flops = model_flops_per_token(model, c) * tokens
    out = {"params": sum(p.numel() for p in model.parameters()), "tokens_per_step": tokens}
    paths = [("materialized", loss_materialized), ("fused", loss_fused)]
    trainer_loss = _trainer_loss(model, ids, weights)
    if trainer_loss is not None:
        paths.append(("trainer_module", trainer_loss))
    for name, loss_fn in paths:
        def one(loss_fn=loss_fn):
            opt.zero_grad(set_to_none=True)
            loss_fn().backward()
            opt.step()

        sec = timed(one, dev, c["reps"])
        out[name] = {"step_s": round(sec, 4), "tokens_per_s": round(tokens / sec),
                     "mfu_datasheet": round(flops / sec / PEAK_DATASHEET, 4),
                     "mfu_measured_peak": round(flops / sec / PEAK_MEASURED, 4), "peak_GiB": peak_of(one, dev)}
        print(name, out[name], flush=True)
    return out


def _train_setup(dev: str, c: dict, lora_r: int, batch) -> dict:
    """One of winnow train's GPU setups from scratch: steps/s and the peak of its whole training state."""
    from winnow.trainer.lora import LoraParams, apply_lora

    if dev == "cuda":
        torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated() if dev == "cuda" else 0
    model = build_llama(dev, c).float()  # the trainer loads fp32 weights and trains under autocast
    if lora_r:
        model = apply_lora(model, LoraParams(lora_r=lora_r), torch.device(dev))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, fused=dev == "cuda")
    loss_fn = _trainer_loss(model, batch[0], batch[2])
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else None
    if dev == "cuda":  # leave out the transient copies of building the model; keep what it holds
        torch.cuda.reset_peak_memory_stats()

    def one():
        opt.zero_grad(set_to_none=True)
        if amp is None:
            loss_fn().backward()
        else:
            with amp:
                loss = loss_fn()
            loss.backward()
        opt.step()

    sec = timed(one, dev, c["reps"])
    tokens = batch[0].numel()
    out = {"trainable_params": sum(p.numel() for p in params), "step_s": round(sec, 4),
           "tokens_per_s": round(tokens / sec)}
    if dev == "cuda":
        out["peak_GiB"] = round((torch.cuda.max_memory_allocated() - before) / 2**30, 3)
    return out


def lora_vs_full(dev: str, c: dict) -> dict:
    batch = _batch(dev, c)
    out = {"tokens_per_step": batch[0].numel(), "lora_r": 16, "lora_target": "all-linear"}
    for name, r in (("full", 0), ("lora", 16)):
        out[name] = _train_setup(dev, c, r, batch)
        print(name, out[name], flush=True)
    full, lora = out["full"], out["lora"]
    out["lora_over_full_tokens_per_s"] = round(lora["tokens_per_s"] / full["tokens_per_s"], 3)
    if "peak_GiB" in full:
        out["lora_over_full_peak"] = round(lora["peak_GiB"] / full["peak_GiB"], 3)
    # the GPU machine lacks these: the trainer's GPU path must not have pulled them in
    out["heavy_modules_imported"] = [m for m in ("polars", "duckdb", "datasets") if m in sys.modules]
    return out


def packer(dev: str, c: dict, step_s: float | None) -> dict:
    import importlib.util

    from winnow.kernels.packing_reference import pack_reference, stage

    rng = np.random.default_rng(2)
    lens = rng.integers(c["pack_len"] // 8, c["pack_len"], c["pack_samples"])
    offsets = np.r_[0, np.cumsum(lens)].astype(np.int64)
    ids = rng.integers(0, c["vocab"], int(offsets[-1]))
    w = np.where(rng.random(ids.size) < 0.6, 1.0, 0.0).astype(np.float32)
    out = {"samples": len(lens), "tokens": int(offsets[-1]), "train_step_s": step_s}
    out["torch_cpu_ms"] = 1e3 * timed(lambda: pack_reference(*stage(offsets, ids, w, "cpu")), "cpu", 5)
    if importlib.util.find_spec("winnow.trainer.packing") is not None:  # the trainer's numpy packer + copy
        from winnow.trainer import packing as tp

        def numpy_pack():
            pairs = zip(offsets[:-1], offsets[1:], strict=True)
            kept = [t for t in (tp.trim(ids[a:b], w[a:b]) for a, b in pairs) if t is not None]
            return [torch.from_numpy(x).to(dev) for x in tp.pack_varlen([k[0] for k in kept], [k[1] for k in kept])]

        out["trainer_numpy_ms"] = 1e3 * timed(numpy_pack, dev, 5)
    if dev == "cuda":
        out["torch_gpu_ms"] = 1e3 * timed(lambda: pack_reference(*stage(offsets, ids, w, dev)), dev, 5)
        if importlib.util.find_spec("cupy") is not None:
            from winnow.kernels.cupy_packing import pack_cupy

            out["cupy_ms"] = 1e3 * timed(lambda: pack_cupy(*stage(offsets, ids, w, dev)), dev, 5)
    print(out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--cpu-smoke", action="store_true")
    a = ap.parse_args()
    a.outdir.mkdir(parents=True, exist_ok=True)
    dev = "cpu" if a.cpu_smoke else "cuda"
    c = SMOKE if a.cpu_smoke else FULL
    meta = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)", "torch": torch.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "config": c}
    rec = Recorder(a.outdir, meta)
    rec.section("loss_step", loss_step, dev, c)
    rec.section("head", head, dev, c)
    model = build_llama(dev, c)
    rec.section("model_pass", model_pass, dev, c, model)
    rec.section("train_step", train_step, dev, c, model)
    ts = rec.data["sections"]["train_step"].get("result", {}).get("fused", {}).get("step_s")
    rec.section("packer", packer, dev, c, ts)
    del model
    rec.section("lora", lora_vs_full, dev, c)
    print(f"wrote {rec.path}", flush=True)


if __name__ == "__main__":
    main()
