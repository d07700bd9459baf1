"""Model pass end to end: exact against an unpacked Hugging Face fp32 forward, isolated, resumable.

Exactness tolerance: |ours - reference| <= 1e-5 + 1e-5 * |reference| for log-probs and entropies, where
the reference is one sample alone through ``model(...).logits`` (fp32) then ``log_softmax`` in float64.
The models use init range 0.8, so log-probs spread over tens of nats: a shifted or leaking variant
misses by whole nats and fails the same check (tested).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import winnow.stages.passes.model_pass as mp
import winnow.stages.passes.model_scoring as ms
from winnow.core.layout import plan_batches
from winnow.core.model_io import load_model
from winnow.core.models import weights_fingerprint
from winnow.core.store import UserError
from winnow.pipeline.steps import get_step, spec
from winnow.stages.passes.model_pass import ModelPassParams, run_model_pass, score_samples

from cli_runner import WINNOW
from model_pass_fixtures import make_model_dir, random_samples, reference, write_samples

RTOL = ATOL = 1e-5


def P(**kw) -> ModelPassParams:
    """Params for these tests: one thread (tiny matmuls on 2 shared, busy cores run ~40x slower with two
    spinning OpenMP threads than with one; the default uses every core, right for a real model)."""
    return ModelPassParams(**{"threads": 1, **kw})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: make_model_dir(root, arch) for arch in ("llama", "qwen2")}


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _as_np(lst):
    return np.array([np.nan if v is None else v for v in lst], dtype=np.float64)


def assert_matches_reference(tbl, model, seqs, masks, positions="supervised"):
    """Every per-token value equals the unpacked reference; nulls exactly where nothing is computed."""
    n_checked = 0
    for i, ids in enumerate(seqs):
        lp, ent = _as_np(tbl["logprob"][i].as_py()), _as_np(tbl["entropy"][i].as_py())
        assert len(lp) == len(ids) == len(ent)
        want = np.ones(len(ids), bool) if positions == "all" else masks[i] == 1
        want[0] = False  # index 0 has no predecessor: always null
        np.testing.assert_array_equal(~np.isnan(lp), want)
        np.testing.assert_array_equal(~np.isnan(ent), want)
        ref_lp, ref_ent = reference(model, ids)
        sel = want[1:]
        np.testing.assert_allclose(lp[1:][sel], ref_lp[sel], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(ent[1:][sel], ref_ent[sel], rtol=RTOL, atol=ATOL)
        n_checked += int(sel.sum())
    assert n_checked > 100


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_exact_against_unpacked_hf_forward(tmp_path, models, arch, layout):
    seqs, masks = random_samples(20, seed=1)
    run = write_samples(tmp_path / "run", seqs, masks, models[arch], shards=2)
    budget = 256
    plans = plan_batches([len(x) for x in seqs[:10]], budget, layout)
    assert max(len(p.samples) for p in plans) >= 3  # samples share batches
    p = P(
        model=str(models[arch]),
        signals=["logprob", "entropy", "embedding"],
        token_budget=budget,
        layout=layout,
    )
    entry = run_model_pass(run, p)
    assert entry["shards"]["computed"] == 2 and entry["layout"] == layout
    tbl = run.table("signals/current").read()
    assert tbl["sample_id"].to_pylist() == [f"s{i:04d}" for i in range(20)]
    model = _hf(models[arch])
    ref_lp, _ = reference(model, seqs[0])
    assert np.ptp(ref_lp) > 5.0 and ref_lp.mean() < -8.0  # far from uniform (-ln V = -5.95)
    assert_matches_reference(tbl, model, seqs, masks)
    emb = np.array(tbl["embedding"].to_pylist())
    assert emb.shape == (20, model.config.hidden_size)
    with torch.no_grad():
        for i in (0, 7, 19):
            h = model.model(input_ids=torch.as_tensor(seqs[i], dtype=torch.long)[None]).last_hidden_state[0]
            np.testing.assert_allclose(emb[i], h.mean(0).numpy(), rtol=1e-5, atol=1e-5)


def test_shifted_variant_fails_the_same_check(tmp_path, models, monkeypatch):
    seqs, masks = random_samples(12, seed=2)
    run = write_samples(tmp_path / "run", seqs, masks, models["llama"])
    orig = ms.gather_targets

    def no_shift(col, seqs_, masks_, positions, offsets):  # the classic bug: state i "predicts" token i
        src, tgt, dest = orig(col, seqs_, masks_, positions, offsets)
        return src + 1, tgt, dest

    monkeypatch.setattr(ms, "gather_targets", no_shift)
    run_model_pass(run, P(model=str(models["llama"]), token_budget=256))
    with pytest.raises(AssertionError):
        assert_matches_reference(run.table("signals/current").read(), _hf(models["llama"]), seqs, masks)


def _score(loaded, seqs, masks, use_cache=False):
    res = score_samples(
        loaded, seqs, masks, signals=["logprob", "entropy"], token_budget=10_000, use_cache=use_cache
    )
    return res.values["logprob"], res.valid


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_isolation_from_batch_mates_and_the_kv_cache_trap(models, layout):
    loaded = load_model(models["llama"], device=torch.device("cpu"), dtype=torch.float32, layout=layout)
    seqs, masks = random_samples(9, seed=4, lo=20, hi=60)
    ours, mates1, mates2 = slice(0, 3), slice(3, 6), slice(6, 9)
    a, valid = _score(loaded, seqs[ours], masks[ours])
    n_ours = len(a)

    def with_mates(mates, use_cache=False):  # batch-mates first: in a packed row they precede our samples
        lp, _ = _score(loaded, seqs[mates] + seqs[ours], masks[mates] + masks[ours], use_cache)
        return lp[-n_ours:]

    for mates in (mates1, mates2):
        np.testing.assert_allclose(with_mates(mates)[valid], a[valid], rtol=RTOL, atol=ATOL)
    leaky1, leaky2 = with_mates(mates1, use_cache=True), with_mates(mates2, use_cache=True)
    if layout == "packed":  # with a KV cache transformers drops the per-sample mask: the same check fails
        with pytest.raises(AssertionError):
            np.testing.assert_allclose(leaky2[valid], leaky1[valid], rtol=RTOL, atol=ATOL)
    else:  # one sample per row with right padding is immune: causality alone hides the padding
        np.testing.assert_allclose(leaky2[valid], a[valid], rtol=RTOL, atol=ATOL)


def test_positions_all_attention_and_schema(tmp_path, models):
    seqs, masks = random_samples(10, seed=5)
    run = write_samples(tmp_path / "run", seqs, masks, models["qwen2"])
    p = P(
        model=str(models["qwen2"]),
        alias="reference",
        positions="all",
        token_budget=200,
        signals=["attention", "entropy", "logprob"],
    )
    run_model_pass(run, p)
    t = run.table("signals/reference")
    tbl = t.read()
    assert tbl.column_names == ["sample_id", "logprob", "entropy", "attn_importance"]
    assert tbl.schema.field("attn_importance").metadata == {b"winnow.anchor": b"query"}
    assert_matches_reference(tbl, _hf(models["qwen2"]), seqs, masks, positions="all")
    for i, ids in enumerate(seqs):
        att = _as_np(tbl["attn_importance"][i].as_py())
        assert len(att) == len(ids) and np.isnan(att[0]) and not np.isnan(att[1:]).any()
        assert ((att[1:] >= -1e-6) & (att[1:] <= 1 + 1e-6)).all()
    rec = t.record(0)
    assert rec.extra["alias"] == "reference" and rec.extra["model_fingerprint"] == weights_fingerprint(
        models["qwen2"]
    )
    assert rec.inputs == {"samples/part-00000": run.table("samples").part_digest(0)}
    assert "model_pass:reference" in run.manifest()["steps"]


def test_attention_signal_is_query_anchored(tmp_path, models):
    from attention_reference import _eager_reference

    seqs, masks = random_samples(6, seed=6)
    run = write_samples(tmp_path / "run", seqs, masks, models["llama"])
    run_model_pass(run, P(model=str(models["llama"]), signals=["attention"], token_budget=128))
    tbl = run.table("signals/current").read()
    model = _hf(models["llama"])
    model.config._attn_implementation = "sdpa"
    for i in range(6):
        att = _as_np(tbl["attn_importance"][i].as_py())
        ref = _eager_reference(model, seqs[i], masks[i])  # row i = query i
        sel = masks[i] == 1
        sel[0] = False
        np.testing.assert_array_equal(~np.isnan(att), sel)
        np.testing.assert_allclose(att[sel], ref[sel], rtol=1e-5, atol=2e-6)


def _cli(run_dir, model_dir, env_extra=None, *sets):
    """`winnow score RUN --model M` in a subprocess (the roof: registry, run lock), as a user runs it."""
    env = {**os.environ, "WINNOW_PROGRESS": "0", **(env_extra or {})}
    cmd = [WINNOW, "score", str(run_dir), "--model", str(model_dir), "--set", "token_budget=256"]
    cmd += ["--set", "threads=1", *(a for s in sets for a in ("--set", s))]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def test_resume_after_kill_computes_only_missing_shards(tmp_path, models):
    seqs, masks = random_samples(40, seed=7)
    run = write_samples(tmp_path / "run", seqs, masks, models["llama"], shards=4)
    proc = _cli(run.root, models["llama"], {"WINNOW_FAULT_KILL_AFTER_SHARDS": "2"})
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL right after the 2nd commit
    out = run.table("signals/current")
    done = {r.part: (r.sha256, out.part_path(r.part).stat().st_mtime_ns) for r in out.records()}
    assert len(done) == 2
    entry = run_model_pass(run, P(model=str(models["llama"]), token_budget=256))
    assert entry["shards"] == {"total": 4, "computed": 2, "skipped": 2, "by_rank": [2]}
    for part, (sha, mtime) in done.items():  # earlier shards untouched
        assert out.record(part).sha256 == sha and out.part_path(part).stat().st_mtime_ns == mtime
    clean = write_samples(tmp_path / "clean", seqs, masks, models["llama"], shards=4)
    run_model_pass(clean, P(model=str(models["llama"]), token_budget=256))
    a, b = out.read(), clean.table("signals/current").read()
    assert a.column_names == b.column_names and a["sample_id"].equals(b["sample_id"])
    for col in ("logprob", "entropy"):
        x = np.concatenate([_as_np(v) for v in a[col].to_pylist()])
        y = np.concatenate([_as_np(v) for v in b[col].to_pylist()])
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)  # NaN (null) positions must agree too
    again = run_model_pass(run, P(model=str(models["llama"]), token_budget=512))  # batching only
    assert again["shards"]["computed"] == 0
    more = run_model_pass(run, P(model=str(models["llama"]), signals=["logprob"]))
    assert more["shards"]["computed"] == 4  # different outputs asked: a new fingerprint


def test_refuses_other_tokenizer_with_exit_2(tmp_path, models):
    seqs, masks = random_samples(4, seed=8)
    # samples from another vocabulary (same size, other words), scored by llama: a different tokenizer under
    # every transformers 5.x (models["qwen2"]'s same files fingerprint differently only from 5.8)
    other = make_model_dir(tmp_path, "qwen2", word="v")
    run = write_samples(tmp_path / "run", seqs, masks, other)
    with pytest.raises(UserError, match="different tokenizer"):
        run_model_pass(run, P(model=str(models["llama"])))
    proc = _cli(run.root, models["llama"])
    assert proc.returncode == 2 and "different tokenizer" in proc.stderr
    assert not run.table("signals/current").exists()


def test_params_validation_names_the_key():
    with pytest.raises(ValueError, match="signals"):
        ModelPassParams(model="m", signals=["logits"])
    with pytest.raises(ValueError, match="positions"):
        ModelPassParams(model="m", positions="prompt")
    with pytest.raises(ValueError, match="alias"):
        ModelPassParams(model="m", alias="../x")
    with pytest.raises(ValueError, match="token_budget"):
        ModelPassParams(model="m", token_budget=1)
    assert ModelPassParams(model="m", signals=["entropy", "logprob", "entropy"]).signals == [
        "logprob",
        "entropy",
    ]
    step = get_step("model_pass")
    assert (
        step.params is ModelPassParams
        and spec("model_pass").key(ModelPassParams(model="m", alias="history")) == "model_pass:history"
    )


def _full_hash_by_hand(model_dir) -> str:
    """The documented small-model fingerprint, recomputed from the tensors with safetensors and hashlib:
    per tensor in name order, json [name, dtype, shape] then its raw little-endian bytes; 32 hex digits."""
    import hashlib
    import json

    from safetensors import safe_open

    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            tensors |= {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no iteration)
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(json.dumps([name, names[t.dtype], list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def test_weights_fingerprint(tmp_path, models, monkeypatch):
    import winnow.core.models as wm

    full = weights_fingerprint(models["llama"])
    assert full == _full_hash_by_hand(models["llama"]) and full != weights_fingerprint(models["qwen2"])
    monkeypatch.setattr(wm, "FULL_HASH_BYTES", 0)  # the sampled mode used above 512 MiB
    sampled = weights_fingerprint(models["llama"])
    twin = make_model_dir(tmp_path, "llama", seed=0)
    assert weights_fingerprint(twin) == sampled
    from safetensors.torch import load_file, save_file

    f = twin / "model.safetensors"
    tensors = load_file(f)
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] * 1.001  # a fine-tune touching one tensor
    save_file(tensors, f, metadata={"format": "pt"})
    assert weights_fingerprint(twin) != sampled
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="safetensors"):
        weights_fingerprint(tmp_path / "bin")
    # Sampled mode reads each tensor's first and last 4 KiB only: a byte changed between them goes
    # unseen (the documented trade-off for >512 MiB models); the full hash of small models sees it.
    big = max(tensors, key=lambda k: tensors[k].numel())
    assert tensors[big].numel() * tensors[big].element_size() > 3 * 4096
    before = weights_fingerprint(twin)
    raw = bytearray(f.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    import json

    lo, hi = json.loads(raw[8 : 8 + header_len])[big]["data_offsets"]
    mid = 8 + header_len + (lo + hi) // 2
    raw[mid] ^= 0xFF
    f.write_bytes(bytes(raw))
    assert weights_fingerprint(twin) == before
    monkeypatch.setattr(wm, "FULL_HASH_BYTES", 512 * 1024 * 1024)
    assert weights_fingerprint(twin) == _full_hash_by_hand(twin) != full


def _mmapped_blocks_for(nbytes: int, count: int = 200) -> int:
    """How many of ``count`` live ``malloc(nbytes)`` blocks glibc serves with mmap (read with mallinfo2).

    glibc only consults the mmap threshold once the heap's free top chunk cannot serve a request, so
    one block says little; 200 x 512 KiB (100 MB) outgrow any top chunk: with the threshold at or below
    the block size most of them are mmapped, above it none is."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (*names, "keepcost")]

    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblks
    ptrs = [libc.malloc(nbytes) for _ in range(count)]
    during = libc.mallinfo2().hblks
    for ptr in ptrs:
        libc.free(ptr)
    return during - before


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc settings")
def test_pass_gives_back_threads_and_malloc_threshold(tmp_path, models):
    """During a CPU pass the mmap threshold is pinned at 1 MiB and threads are the pass's; afterwards a
    512 KiB block is mmapped again (threshold back at glibc's 128 KiB start) and threads are the caller's."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    assert libc.mallopt(-3, 128 * 1024)  # a known starting point: M_MMAP_THRESHOLD = glibc's initial value
    assert _mmapped_blocks_for(512 * 1024) > 100
    seen = {}

    def spy(*args, **kw):
        seen["threads"] = torch.get_num_threads()
        seen["mmapped"] = _mmapped_blocks_for(512 * 1024)
        return score(*args, **kw)

    score = mp.score_samples
    seqs, masks = random_samples(3, seed=12)
    run = write_samples(tmp_path / "run", seqs, masks, models["llama"])
    saved = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        mp.score_samples = spy
        run_model_pass(run, P(model=str(models["llama"]), threads=1))
        assert seen == {"threads": 1, "mmapped": 0}  # the pass's own settings were in force
        assert torch.get_num_threads() == 3
        assert _mmapped_blocks_for(512 * 1024) > 100
    finally:
        mp.score_samples = score
        torch.set_num_threads(saved)
