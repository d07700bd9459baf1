"""The GPU check's sections (run by ``gpu_check.py``, one process each; see its docstring for the rules).

1. ``self_check``: :mod:`winnow.kernels.self_check` on every Triton kernel for the keys the switch's
   ``auto`` meets (bf16, with and without bias + soft-cap; fp16 and fp32 for information).
2. ``loss_step``: weighted linear CE forward + backward at V = 32k and 128k, N = 16k, D = 2048, bf16:
   the chunked reference, materialized logits, the Triton kernel (then Liger / CCE when importable):
   ms per step, peak memory beyond inputs and gradients; loss and both gradients against the reference.
3. ``head``: per-token log-prob + entropy, N = 16k, V = 128k: the passes' fp32 head by the reference
   and by Triton (exact fp32), and Triton on a bf16 head (against the reference on the same bf16 values).
4. ``model_pass``: ``score_samples`` (log-prob + entropy) on a random-init ~1B Llama, reference vs Triton.
5. ``train_step``: that Llama (Llama-3.2-1B shape: hidden 2048, 16 layers, 32/8 heads, MLP 8192,
   V = 128256, tied) in bf16 at 2 x 4096 tokens (4 x 4096 needs ~65-70 GiB on the materialized path;
   2 x 4096 leaves room on an 80 GiB H100), SDPA, fwd + bwd + fused AdamW (lr 0: every path sees the
   same weights): the loss by the chunked reference, materialized logits, Triton.
6. ``trainer_step``: what ``winnow train`` runs on CUDA: fp32 master weights under bf16 autocast,
   ``WeightedLMLoss`` on one packed row (restarting ``position_ids``), ``flex_attention``, the head
   under ``WINNOW_KERNELS`` as set (``auto``: self-checked Triton). The reference is the same step with
   SDPA and the reference head. The first step's time, less a steady step, is reported as
   ``compile_s``; the first no-grad evaluation forward is timed apart (``first_eval_s``) and stays out
   of the MFU. On CPU FlexAttention has no backward: the flex path is ``skipped``.
7. ``packer``: one micro-batch packed by the torch reference on CPU, the trainer's numpy packer, the
   torch reference on the GPU, CuPy: ms each (host -> device copy included), outputs equal.
8. ``lora``: full fine-tuning vs LoRA r = 16 on every linear layer, both as ``winnow train`` sets them up
   on a GPU (fp32 weights + bf16 autocast; LoRA: bf16 frozen base, fp32 adapters): tokens/s, MFU,
   trainable parameters, peak memory of the whole training state. LoRA starts with B = 0, so its first
   loss must equal full fine-tuning's.

9. ``lemo``: LeMo / JENGA against dense LoRA (q, k, v, o) at 1 x 8192 tokens (``gpu_lemo.py``).

MFU everywhere is :func:`winnow.trainer.mfu.step_flops` over the step time, against 989 TFLOP/s
(datasheet) and 780 TFLOP/s (a bf16 8192³ matmul measured on the lent H200, ENVIRONMENT_NOTES).
Tolerances (bf16; fp32 in brackets, the CPU smoke): loss relative 5e-3 [1e-5]; log-probs absolute 1e-3
(fp32 heads) and 5e-3 (bf16 heads); gradients: max difference relative to the reference's largest entry
3e-2 [1e-4] for one head, relative L2 error 5e-2 [1e-4] over sampled model gradients (whole models in
bf16 differ by accumulation order everywhere).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

PEAK_DATASHEET, PEAK_MEASURED = 989.0, 780.0  # TFLOP/s


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


# ------------------------------------------------------------------------------------- plumbing
class Section:
    """One section's context: device, sizes, and :meth:`path`, which records one path's outcome."""

    def __init__(self, rec, name: str, dev: str, c: dict):
        self.rec, self.name, self.dev, self.c = rec, name, dev, c
        self.bf16 = dev == "cuda"  # on this CPU bf16 is ~27x slower: the smoke runs fp32
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32

    def path(self, name: str, fn, triton: bool = False, optional: bool = False, **fixed) -> dict:
        self.rec.running(self.name, {"path": name, "triton": triton, "optional": optional})
        entry = (
            {"path": name, "ok": True, "triton": triton} | ({"optional": True} if optional else {}) | fixed
        )
        t0 = time.time()
        try:
            entry |= fn() or {}
        except Exception as e:  # noqa: BLE001 - this path failed; the section goes on
            traceback.print_exc()
            entry |= {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        entry["seconds"] = round(time.time() - t0, 2)
        print(f"  {self.name}/{name}: {'ok' if entry['ok'] else 'FAILED'} {_brief(entry)}", flush=True)
        self.rec.add(self.name, entry)
        if self.dev == "cuda":
            torch.cuda.empty_cache()
        return entry

    def skip(self, name: str, reason: str, triton: bool = False) -> None:
        self.rec.add(self.name, {"path": name, "ok": True, "triton": triton, "skipped": reason})


def _brief(entry: dict) -> str:
    keep = {k: v for k, v in entry.items() if k not in ("path", "ok", "triton", "optional")}
    return str(keep)[:300]


def check(out: dict, what: str, diff: float, tol: float) -> None:
    """Record ``diff`` against ``tol`` under ``out["checks"]``; a miss (or NaN) makes the path fail."""
    ok = bool(math.isfinite(diff) and diff <= tol)
    out.setdefault("checks", {})[what] = {"diff": float(f"{diff:.3g}"), "tol": tol, "ok": ok}
    if not ok:
        out["ok"] = False
        out["error"] = f"{what} differs from the reference by {diff:.3g} > {tol:g}"


def rel_loss(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def rel_l2(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x.float() - y.float()).square().sum()) for x, y in zip(a, b, strict=True))
    den = sum(float(y.float().square().sum()) for y in b)
    return math.sqrt(num / max(den, 1e-30))


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: str, reps: int) -> tuple[float, float]:
    """(seconds of the first call, mean seconds of ``reps`` calls after it)."""
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(dev)
    return first, (time.perf_counter() - t0) / max(reps, 1)


def peak_gib(fn, dev: str) -> float | None:
    if dev != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)


def mfu_fields(flops: float, sec: float) -> dict:
    return {
        "tflops": round(flops / sec / 1e12, 2),
        "mfu_datasheet": round(flops / sec / PEAK_DATASHEET / 1e12, 4),
        "mfu_measured_peak": round(flops / sec / PEAK_MEASURED / 1e12, 4),
    }


def tolerances(bf16: bool) -> dict:
    return (
        {"loss": 5e-3, "grad_max": 3e-2, "grad_l2": 5e-2}
        if bf16
        else {"loss": 1e-5, "grad_max": 1e-4, "grad_l2": 1e-4}
    )


# ------------------------------------------------------------------------------------- 1. self-check
def self_check(s: Section) -> None:
    from winnow.kernels import self_check as sc

    shape, sc.SHAPE = sc.SHAPE, tuple(s.c["check_shape"])  # restored: the in-process test shares the module
    keys = [(op, torch.bfloat16, b, b) for op in sc.OPS for b in (False, True)]
    if s.dev == "cuda":
        keys += [("linear_ce", torch.float16, False, False), ("logprob_entropy", torch.float32, False, False)]
    else:  # the interpreter costs seconds per key: the three kernels, each with bias and soft-cap
        keys = [(op, torch.bfloat16, True, True) for op in sc.OPS]
    try:
        for op, dtype, bias, cap in keys:
            name = f"triton:{op}/{str(dtype).removeprefix('torch.')}/bias={bias}/softcap={cap}"

            def run(op=op, dtype=dtype, bias=bias, cap=cap):
                failure = sc.run_check(op, torch.device(s.dev), dtype, bias, cap)
                return {"ok": failure is None, **({"error": failure} if failure else {})}

            s.path(name, run, triton=True)
    finally:
        sc.SHAPE = shape


# ------------------------------------------------------------------------------------- 2. loss step
def _lce_step(fn, h, w, y, wt):
    hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(hh, ww, y, wt)
    loss.backward()
    return float(loss.detach()), hh.grad, ww.grad


def loss_step(s: Section) -> None:
    import bench_kernels

    try:  # on CUDA this imports the Triton module: its failure is the triton path's, not the section's
        fns = bench_kernels.contenders(s.dev)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        from winnow.kernels.linear_cross_entropy import linear_cross_entropy_reference

        fns = {"materialized": bench_kernels._materialized, "reference": linear_cross_entropy_reference}

    def triton_fn(*a):  # imported at first use: an import failure is the triton path's, not the section's
        from winnow.kernels.triton_linear_cross_entropy import linear_cross_entropy_triton

        return linear_cross_entropy_triton(*a)

    order = [("reference", False, False), ("materialized", False, False), ("triton", True, False)]
    order += [(k, False, True) for k in fns if k not in ("reference", "materialized", "triton")]
    for v in s.c["vocabs"]:
        _loss_step_at(s, v, [(n, fns.get(n) or triton_fn, t, o) for n, t, o in order])


def _loss_step_at(s: Section, v: int, order: list) -> None:
    import bench_kernels

    c, tol = s.c, tolerances(s.bf16)
    inputs = bench_kernels.make_inputs(c["n"], v, c["d"], s.dtype, s.dev, seed=v)
    ref = {}
    for name, fn, triton, optional in order:

        def run(fn=fn, name=name):
            loss, gh, gw = _lce_step(fn, *inputs)
            first, sec = timed(lambda: _lce_step(fn, *inputs), s.dev, c["reps"])
            out = {"loss": loss, "ms": round(sec * 1e3, 3), "first_ms": round(first * 1e3, 1)}
            if s.dev == "cuda":
                out["peak_extra_MiB"] = round(bench_kernels.cuda_peak_extra(fn, inputs) / 2**20, 1)
            if name == "reference":
                ref.update(loss=loss, gh=gh, gw=gw)
            elif not ref:
                out |= {"ok": False, "error": "no reference to compare with"}
            else:
                check(out, "loss", rel_loss(loss, ref["loss"]), tol["loss"])
                check(out, "grad_h", rel_max(gh, ref["gh"]), tol["grad_max"])
                check(out, "grad_W", rel_max(gw, ref["gw"]), tol["grad_max"])
            return out

        s.path(name, run, triton=triton, optional=optional, V=v, N=c["n"], D=c["d"], dtype=str(s.dtype))


# ------------------------------------------------------------------------------------- 3. head
def head(s: Section) -> None:
    from winnow.kernels import chunked_head
    from winnow.kernels.chunked_head import LMHead

    c = s.c
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(c["head_v"], c["d"], generator=g) * (2.0 / c["d"] ** 0.5)).to(s.dev)
    h = torch.randn(c["head_n"], c["d"], generator=g).to(s.dev)
    t = torch.randint(0, c["head_v"], (c["head_n"],), generator=g).to(s.dev)
    hd32 = LMHead(w)
    ref = {}

    def reference():
        lp, ent = chunked_head.logprob_entropy(hd32, h, t)
        ref.update(lp=lp, ent=ent)
        _, sec = timed(lambda: chunked_head.logprob_entropy(hd32, h, t), s.dev, c["reps"])
        return {
            "ms": round(sec * 1e3, 3),
            "peak_GiB": peak_gib(lambda: chunked_head.logprob_entropy(hd32, h, t), s.dev),
        }

    def triton_on(hd, want, tol):
        from winnow.kernels.triton_linear_cross_entropy import logprob_entropy_triton

        lp, ent = logprob_entropy_triton(hd, h, t)
        first, sec = timed(lambda: logprob_entropy_triton(hd, h, t), s.dev, c["reps"])
        out = {
            "ms": round(sec * 1e3, 3),
            "first_ms": round(first * 1e3, 1),
            "peak_GiB": peak_gib(lambda: logprob_entropy_triton(hd, h, t), s.dev),
        }
        check(out, "logprob", float((lp - want[0]).abs().max()), tol)
        check(out, "entropy", float((ent - want[1]).abs().max()), tol)
        return out

    fixed = {"N": c["head_n"], "V": c["head_v"], "D": c["d"]}
    s.path("reference", reference, head="fp32", **fixed)
    if ref:
        s.path(
            "triton",
            lambda: triton_on(hd32, (ref["lp"], ref["ent"]), 1e-3),
            triton=True,
            head="fp32",
            **fixed,
        )
    hd16 = LMHead(w.to(torch.bfloat16))  # its exact values in fp32 are the reference's input
    want16 = chunked_head.logprob_entropy(hd16, h.to(torch.bfloat16), t)
    s.path("triton_bf16", lambda: triton_on(hd16, want16, 5e-3), triton=True, head="bf16", **fixed)


# ------------------------------------------------------------------------------------- 4. model pass
def build_llama(s: Section, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = s.c
    cfg = LlamaConfig(
        vocab_size=c["vocab"],
        hidden_size=c["hidden"],
        intermediate_size=c["inter"],
        num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"],
        num_key_value_heads=c["kv"],
        tie_word_embeddings=True,
        max_position_embeddings=max(4096, c["seq"]),
        rope_theta=500000.0,
        use_cache=False,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    with torch.device(s.dev):
        return LlamaForCausalLM(cfg)


def model_pass(s: Section) -> None:
    from gpu_check import kernels

    from winnow.core.model_io import LoadedModel
    from winnow.kernels.chunked_head import LMHead
    from winnow.stages.passes.model_scoring import score_samples

    c = s.c
    model = build_llama(s).to(s.dtype).eval()
    loaded = LoadedModel(
        model=model,
        body=model.base_model,
        head=LMHead(model.lm_head.weight).to_fp32(),
        path=Path("."),
        fingerprint="gpu-check",
        device=torch.device(s.dev),
        dtype=s.dtype,
        layout="padded",
    )
    rng = np.random.default_rng(0)
    lens = rng.integers(c["pass_len"] // 4, c["pass_len"], c["pass_samples"])
    seqs = [rng.integers(0, c["vocab"], n) for n in lens]
    masks = [np.r_[np.zeros(n // 3, bool), np.ones(n - n // 3, bool)] for n in lens]
    ref = {}

    def run(backend: str):
        with kernels(backend):
            go = lambda: score_samples(loaded, seqs, masks, signals=["logprob", "entropy"])  # noqa: E731
            res = go()
            _, sec = timed(go, s.dev, 1)
        out = {"s": round(sec, 3), "tokens_per_s": round(int(lens.sum()) / sec)}
        lp, ent = res.values["logprob"], res.values["entropy"]
        if backend == "reference":
            ref.update(lp=lp, ent=ent)
        else:
            check(out, "logprob", float(np.abs(lp - ref["lp"]).max()), 1e-3)
            check(out, "entropy", float(np.abs(ent - ref["ent"]).max()), 1e-3)
        return out

    fixed = {"samples": len(seqs), "tokens": int(lens.sum())}
    if s.path("reference", lambda: run("reference"), **fixed)["ok"]:
        s.path("triton", lambda: run("triton"), triton=True, **fixed)


# ------------------------------------------------------------------------------------- 5. train step
def _batch(s: Section):
    c = s.c
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, c["vocab"], (c["batch"], c["seq"]), generator=g)
    w = torch.rand(c["batch"], c["seq"] - 1, generator=g)
    w[torch.rand(w.shape, generator=g) < 0.3] = 0.0
    return ids.to(s.dev), ids[:, 1:].reshape(-1).to(s.dev), w.reshape(-1).to(s.dev)


def _grad_sample(model) -> list[torch.Tensor]:
    """The gradients compared across paths: the (tied) head and the last layer's MLP down projection."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [p.grad.detach().clone() for p in (lm.lm_head.weight, lm.model.layers[-1].mlp.down_proj.weight)]


def train_step(s: Section) -> None:
    from gpu_check import kernels

    from winnow.kernels.switch import linear_cross_entropy
    from winnow.trainer.mfu import step_flops

    c, tol = s.c, tolerances(s.bf16)
    model = build_llama(s).to(s.dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, fused=s.dev == "cuda")  # lr 0: weights never move
    ids, targets, weights = _batch(s)

    def fused():
        h = model.model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, c["hidden"])
        return linear_cross_entropy(h, model.lm_head.weight, targets, weights) / weights.sum()

    def materialized():
        logits = model(input_ids=ids).logits[:, :-1].reshape(-1, c["vocab"]).float()
        return (
            weights * torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        ).sum() / weights.sum()

    flops = step_flops(model, ids.numel(), float((weights != 0).sum()), c["batch"] * c["seq"] ** 2)
    ref = {}

    def run(name: str, loss_fn, backend: str | None):
        def one():
            opt.zero_grad(set_to_none=True)
            loss_fn().backward()
            opt.step()

        with kernels(backend):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            grads = _grad_sample(model)
            first, sec = timed(one, s.dev, c["reps"])
            peak = peak_gib(one, s.dev)
        out = {
            "loss": float(loss.detach()),
            "step_s": round(sec, 4),
            "first_step_s": round(first, 3),
            "tokens_per_s": round(ids.numel() / sec),
            "peak_GiB": peak,
        } | mfu_fields(flops, sec)
        if name == "reference":
            ref.update(loss=float(loss.detach()), grads=grads)
        else:
            check(out, "loss", rel_loss(float(loss.detach()), ref["loss"]), tol["loss"])
            check(out, "grads", rel_l2(grads, ref["grads"]), tol["grad_l2"])
        return out

    fixed = {"tokens_per_step": ids.numel(), "params": sum(p.numel() for p in model.parameters())}
    if s.path("reference", lambda: run("reference", fused, "reference"), head="chunked reference", **fixed)[
        "ok"
    ]:
        s.path("materialized", lambda: run("materialized", materialized, None), **fixed)
        s.path("triton", lambda: run("triton", fused, "triton"), triton=True, head="triton", **fixed)


# ------------------------------------------------------------------------------------- 6. trainer step
def _packed_batch(s: Section):
    """One packed micro-batch as the trainer lays it out: ragged samples, one row, restarting positions."""
    from winnow.core.layout import layout_batch

    c = s.c
    rng = np.random.default_rng(3)
    total, seqs = c["batch"] * c["seq"], []
    while sum(map(len, seqs)) < total - c["seq"] // 4:
        seqs.append(rng.integers(0, c["vocab"], int(rng.integers(c["seq"] // 8, c["seq"] // 2))))
    weights = [np.where(rng.random(len(q)) < 0.7, 1.0, 0.0).astype(np.float32) for q in seqs]
    for w in weights:
        w[0] = 0.0  # a sample's first token is no target
    b = layout_batch(seqs, weights, "packed", 0)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(s.dev)  # noqa: E731
    return b, (t(b.input_ids), t(b.gather), t(b.targets), t(b.weights), t(b.position_ids))


def trainer_step(s: Section) -> None:
    from contextlib import nullcontext

    from gpu_check import kernels

    from winnow.kernels import self_check
    from winnow.trainer.loss import WeightedLMLoss
    from winnow.trainer.mfu import step_flops

    c, tol = s.c, tolerances(s.bf16)
    model = build_llama(s, "sdpa").float().train()  # the trainer loads fp32 weights
    module = WeightedLMLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, fused=s.dev == "cuda")
    b, args = _packed_batch(s)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if s.bf16 else nullcontext
    flops = step_flops(model, b.real_tokens, float((b.weights != 0).sum()), b.len_sq)
    ref = {}

    def one():
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = module(*args)
        loss.backward()
        opt.step()
        return loss

    def run(name: str, backend: str | None):
        with kernels(backend):
            opt.zero_grad(set_to_none=True)
            with amp():
                loss = module(*args)
            loss.backward()
            grads = _grad_sample(model)
            first, sec = timed(one, s.dev, c["reps"])  # the first includes compilation (flex)
            with torch.no_grad(), amp():
                ev, _ = timed(lambda: module(*args), s.dev, 0)  # the first eval: compiles again, not in MFU
        out = {
            "loss": float(loss.detach()),
            "step_s": round(sec, 4),
            "compile_s": round(max(first - sec, 0.0), 2),
            "first_eval_s": round(ev, 3),
            "tokens_per_s": round(b.real_tokens / sec),
            "peak_GiB": peak_gib(one, s.dev),
            "head_backends": self_check.report(),
        } | mfu_fields(flops, sec)
        if name == "reference":
            ref.update(loss=float(loss.detach()) / b.weight_sum, grads=grads)
        else:
            check(out, "loss", rel_loss(float(loss.detach()) / b.weight_sum, ref["loss"]), tol["loss"])
            check(out, "grads", rel_l2(grads, ref["grads"]), tol["grad_l2"])
        return out

    fixed = {
        "samples": b.n_samples,
        "tokens": b.real_tokens,
        "weighted": int((b.weights != 0).sum()),
        "autocast": "bf16" if s.bf16 else "off (fp32 on CPU)",
    }
    ok = s.path(
        "reference", lambda: run("reference", "reference"), attention="sdpa", head="reference", **fixed
    )["ok"]
    if s.dev != "cuda":
        s.skip("flex", "FlexAttention has no backward on CPU", triton=True)
    elif ok:
        model.set_attn_implementation("flex_attention")
        s.path("flex", lambda: run("flex", None), triton=True, attention="flex_attention", **fixed)


# ------------------------------------------------------------------------------------- 7. packer
def packer(s: Section) -> None:
    from winnow.core.layout import pack_varlen, stage

    c = s.c
    rng = np.random.default_rng(2)
    lens = rng.integers(c["pack_len"] // 8, c["pack_len"], c["pack_samples"])
    offsets = np.r_[0, np.cumsum(lens)].astype(np.int64)
    ids = rng.integers(0, c["vocab"], int(offsets[-1]))
    w = np.where(rng.random(ids.size) < 0.6, 1.0, 0.0).astype(np.float32)
    ref = {}
    fixed = {"samples": len(lens), "tokens": int(offsets[-1])}

    def run(name: str, pack, dev: str):
        got = [torch.as_tensor(x).cpu() for x in pack()]
        _, sec = timed(pack, dev, 5)
        out = {"ms": round(sec * 1e3, 3)}
        if name == "torch_cpu":
            ref["arrays"] = got
        else:
            same = all(torch.equal(a, b) for a, b in zip(got, ref["arrays"], strict=True))
            check(out, "packed arrays", 0.0 if same else 1.0, 0.0)
        return out

    def torch_pack(dev: str):
        p = pack_varlen(*stage(offsets, ids, w, dev))
        return p.input_ids, p.position_ids, p.gather, p.targets, p.weights

    def numpy_pack():  # the trainer's path: trim on the host, lay out (the one packer on CPU), copy
        from winnow.core.layout import layout_batch
        from winnow.trainer import packing as tp

        kept = [
            t
            for t in (tp.trim(ids[a:b], w[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True))
            if t
        ]
        b = layout_batch([k[0] for k in kept], [k[1] for k in kept], "packed")
        x, pos, g, tg, wt = b.input_ids[0], b.position_ids[0], b.gather, b.targets, b.weights
        return [torch.from_numpy(a).to(s.dev) for a in (x, pos, g, tg, wt)]

    if not s.path("torch_cpu", lambda: run("torch_cpu", lambda: torch_pack("cpu"), "cpu"), **fixed)["ok"]:
        return
    s.path("trainer_numpy", lambda: run("trainer_numpy", numpy_pack, s.dev), **fixed)
    if s.dev == "cuda":
        s.path("torch_gpu", lambda: run("torch_gpu", lambda: torch_pack(s.dev), s.dev), **fixed)
        if importlib.util.find_spec("cupy") is not None:
            from winnow.kernels.cupy_packing import pack_cupy

            def cupy_pack():
                p = pack_cupy(*stage(offsets, ids, w, s.dev))
                return p.input_ids, p.position_ids, p.gather, p.targets, p.weights

            s.path("cupy", lambda: run("cupy", cupy_pack, s.dev), optional=True, **fixed)


# ------------------------------------------------------------------------------------- 8. LoRA vs full
def lora(s: Section) -> None:
    from contextlib import nullcontext

    loaded = set(sys.modules)  # in a section process: what the script itself imported (none of the three)

    from winnow.trainer.lora import LoraParams, apply_lora
    from winnow.trainer.loss import WeightedLMLoss
    from winnow.trainer.mfu import step_flops

    c = s.c
    ids, targets, weights = _batch(s)
    bsz, seq = ids.shape
    w2 = weights.view(bsz, seq - 1)
    r, col = torch.nonzero(w2, as_tuple=True)  # position col of row r predicts token col + 1
    args = (ids, r * seq + col, ids[r, col + 1], w2[r, col])
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if s.bf16 else nullcontext
    ref = {}

    def run(name: str, rank: int):
        if s.dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if s.dev == "cuda" else 0
        model = build_llama(s).float()
        if rank:
            model = apply_lora(model, LoraParams(r=rank), torch.device(s.dev))
        module = WeightedLMLoss(model).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-6, fused=s.dev == "cuda")
        with torch.no_grad(), amp():
            first_loss = float(module(*args)) / float(args[3].sum())

        def one():
            opt.zero_grad(set_to_none=True)
            with amp():
                loss = module(*args)
            loss.backward()
            opt.step()

        _, sec = timed(one, s.dev, c["reps"])
        flops = step_flops(model, ids.numel(), float(r.numel()), bsz * seq**2)
        out = {
            "trainable_params": sum(p.numel() for p in params),
            "step_s": round(sec, 4),
            "tokens_per_s": round(ids.numel() / sec),
            "loss": first_loss,
        } | mfu_fields(flops, sec)
        if s.dev == "cuda":
            out["peak_GiB"] = round((torch.cuda.max_memory_allocated() - before) / 2**30, 3)
        if name == "full":
            ref["loss"] = first_loss
        else:  # B = 0 at the start: the same function as the full model
            check(out, "first loss vs full", rel_loss(first_loss, ref["loss"]), 1e-3 if s.bf16 else 1e-6)
        return out

    fixed = {"tokens_per_step": ids.numel(), "lora_r": 16, "lora_target": "all-linear"}
    full = s.path("full", lambda: run("full", 0), **fixed)
    if full["ok"]:
        lo = s.path("lora", lambda: run("lora", 16), **fixed)
        if lo["ok"]:
            s.rec.update(
                lambda d: d["sections"][s.name].__setitem__(
                    "ratios",
                    {
                        "lora_over_full_tokens_per_s": round(lo["tokens_per_s"] / full["tokens_per_s"], 3),
                        **(
                            {"lora_over_full_peak": round(lo["peak_GiB"] / full["peak_GiB"], 3)}
                            if "peak_GiB" in lo
                            else {}
                        ),
                    },
                )
            )
    # the GPU machine lacks these: the trainer's GPU path must not have pulled them in (modules loaded
    # before the section, e.g. by other tests when the check runs in-process, are not its doing)
    heavy = [m for m in ("polars", "duckdb", "datasets") if m in sys.modules and m not in loaded]
    s.path("no_heavy_imports", lambda: {"ok": not heavy, "imported": heavy})


def lemo(s: Section) -> None:
    from gpu_lemo import lemo as section  # its own module (issue 27): LeMo against dense LoRA

    section(s)


SECTIONS = {
    "self_check": self_check,
    "loss_step": loss_step,
    "head": head,
    "model_pass": model_pass,
    "train_step": train_step,
    "trainer_step": trainer_step,
    "packer": packer,
    "lora": lora,
    "lemo": lemo,
}
