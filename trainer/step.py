"""The trainer's entry point (:func:`train`): a model directory and a dataset in, a trained model out.

A leaf: it knows nothing of runs, recipes, ``builtin:`` specs or the step registry. The roof's `train`
step (:mod:`winnow.pipeline.train`) resolves the model spec and the reference model, reads a run's
selection (or an export) into a :class:`~winnow.trainer.data.Dataset`, takes the run lock and records the
manifest entry through ``on_done``; the tiny-model builder calls :func:`train` directly.

Order of work, so that bad input leaves nothing behind: (the roof: parameters, model directory, data and
selection checks, tokenizer check) the held-out split, vocabulary check, ``--out`` writability; only then
is ``--out`` created. ``--out`` holds ``winnow_train.json`` (the run's identity: model fingerprint, data digest,
parameters, the out path) from the first step on; a rerun with the same identity resumes from the newest
checkpoint, or does nothing once ``train_result.json`` (written last) exists; another identity in the
same ``--out`` is refused. The final weights, tokenizer and model card are written into a temporary
folder and renamed into ``--out`` file by file before ``train_result.json``.

On CUDA the model loads with ``flash_attention_2`` when installed, else ``flex_attention`` (transformers
turns the restarting ``position_ids`` of a packed row into a document mask). That GPU path, bf16
autocast and the MFU estimate are measured by ``benchmarks/gpu_check.sh``; they have not run on a GPU yet.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from winnow.core.store import (
    UserError,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    fsync_tree,
    stable_hash,
)
from winnow.core.write_guard import out_lock
from winnow.trainer.ckpt_integrity import clean_leftovers
from winnow.trainer.config import TrainParams
from winnow.trainer.data import Dataset

IDENTITY_FILE = "winnow_train.json"
RESULT_FILE = "train_result.json"


def _check_writable(out: Path) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {probe} is not a writable directory; choose another --out")


def _check_model(p: TrainParams, model_dir: Path, max_token_id: int) -> dict[str, Any]:
    from transformers import AutoConfig

    from winnow.core.models import weights_fingerprint

    cfg = AutoConfig.from_pretrained(str(model_dir))
    vocab = int(
        getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "vocab_size", 0) or 0
    )
    if max_token_id >= vocab:
        raise UserError(
            f"model {p.model}: vocabulary of {vocab} does not cover token id {max_token_id} in the data; train "
            "with the model whose tokenizer made the samples"
        )
    return {"vocab_size": vocab, "fingerprint": weights_fingerprint(model_dir)}


def _always_keep_ids(p: TrainParams, model_dir: Path) -> tuple[int, ...]:
    """``always_keep`` as token ids of the model's tokenizer (the samples' one: checked by _check_model)."""
    if not p.online.always_keep:
        return ()
    from winnow.core.always_keep import always_keep_ids
    from winnow.core.models import load_tokenizer

    return tuple(always_keep_ids(load_tokenizer(model_dir), p.online.always_keep, "train always_keep"))


_IDENTITY_KEYS = ("model", "model_fingerprint", "data", "config")  # what `hash` covers


def _legacy_hash(have: dict[str, Any], identity: dict[str, Any]) -> str:
    """The hash an ``--out`` trained before issue 28 recorded for this identity (``out``, its absolute path
    as then recorded, was in it): such an ``--out`` resumes too, moved or not."""
    old = {k: identity[k] for k in _IDENTITY_KEYS}
    return stable_hash(old | {"out": have.get("out")})


def _differences(have: dict[str, Any], identity: dict[str, Any]) -> str:
    """``model_fingerprint, config.lr``: what differs between two identities, named, no reprs."""
    out = [k for k in _IDENTITY_KEYS if k != "config" and have.get(k) != identity.get(k)]
    a, b = have.get("config") or {}, identity.get("config") or {}
    out += [f"config.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "out"]
    return ", ".join(out) or "its hash"


def _claim_out(out: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """Create ``out`` for this run; the finished result when an identical run already completed."""
    out.mkdir(parents=True, exist_ok=True)
    ident_path = out / IDENTITY_FILE
    if ident_path.exists():
        have = json.loads(ident_path.read_text())
        if have.get("hash") not in (identity["hash"], _legacy_hash(have, identity)):
            raise UserError(
                f"--out {out} holds another training run (differs in {_differences(have, identity)}); "
                "choose another --out or remove it"
            )
        if (out / RESULT_FILE).exists():
            return json.loads((out / RESULT_FILE).read_text())
    else:
        atomic_write_json(ident_path, identity)
    return None


def recorded_out(out: Path, source: dict[str, Any]) -> str:
    """``out`` as ``winnow_train.json`` and the run's manifest record it: relative to the run it trains
    from when inside it (``train/NAME``: the run stays valid when copied or moved), else absolute."""
    target = out.resolve()
    run = source.get("run")
    if run and target.is_relative_to(Path(run).resolve()):
        return str(target.relative_to(Path(run).resolve()))
    return str(target)


def _apply_methods(p: TrainParams, model, ctx, out: Path):
    """The training methods' trainable choice (LoRA, prompt tuning: the seeded adapter init) and what they
    chose (HFT's trained tensors) into ``winnow_train.json`` (its hash unchanged)."""
    from winnow.trainer.method import apply_trainable

    methods = p.methods()
    model = apply_trainable(methods, model, ctx)
    extra: dict[str, Any] = {}
    for m in methods:
        extra |= m.record()
    if ctx.rank == 0 and extra:
        path = out / IDENTITY_FILE
        atomic_write_json(path, json.loads(path.read_text()) | extra)
    return model, methods


def _drive(loop, metrics, out: Path) -> int:
    p, ckpt = loop.p, out / "checkpoints"
    if loop.d.main:
        clean_leftovers(out)  # of killed saves; the --out lock says no live writer owns them
    start = loop.resume(ckpt)
    metrics.truncate_after(start if start else -1)  # lines past the checkpoint are redone
    if start == 0:
        loop.evals[0] = loop.evaluate()
        metrics.write({"step": 0, "eval_loss": loop.evals[0]})
    bar = _progress(loop, start)
    from winnow.trainer.trackers import PlainLog

    plain = PlainLog(start, loop.total_steps) if loop.d.main and not sys.stdout.isatty() else None
    for step in range(start, loop.total_steps):
        rec = loop.train_step(step)
        done = step + 1
        if done % p.log_every == 0 or done == loop.total_steps:
            metrics.write(rec)
            if plain is not None:  # a piped run: the rich bar (stderr, a terminal only) never shows
                print(plain.line(rec), flush=True)
        if bar:
            bar[0].update(bar[1], completed=done, description=f"loss {rec['loss']:.4f}")
        if p.eval_every and done % p.eval_every == 0 and done < loop.total_steps:
            loop.evals[done] = loop.evaluate()
            metrics.write({"step": done, "eval_loss": loop.evals[done]})
        if p.save_every and done % p.save_every == 0 and done < loop.total_steps:
            loop.save(ckpt, done)
    if bar:
        bar[0].stop()
    if loop.total_steps not in loop.evals:
        loop.evals[loop.total_steps] = loop.evaluate()
        metrics.write({"step": loop.total_steps, "eval_loss": loop.evals[loop.total_steps]})
        loop.save(ckpt, loop.total_steps)
    return loop.total_steps


def _progress(loop, start: int):
    if not (loop.p.progress and loop.d.main and sys.stderr.isatty()):
        return None
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.start()
    return bar, bar.add_task("train", total=loop.total_steps, completed=start)


def _reference(p: TrainParams, reference: Path | str | None, device):
    """Online Rho-1's reference model: ``"base"`` (the model being trained, frozen) or a model directory
    (the roof resolves ``rho1.reference`` or the run's `reference` signals to one)."""
    if p.online.policy != "rho1":
        return None
    if reference == "base":
        return "base"
    if reference is None:
        raise UserError("online=rho1 needs a reference model: --set rho1.reference=MODEL_DIR")
    from winnow.core.model_io import load_for_training

    ref, _ = load_for_training(Path(reference), device)
    return ref.to(device).eval().requires_grad_(False)


def _without_tied_copy(lm, state: dict) -> dict:
    """Drop the output embedding when it is the input embedding: the gathered state holds two separate
    copies, so ``save_pretrained`` cannot see the tie and wrote both (+26% file size for the tiny models);
    ``from_pretrained`` re-ties it from the config, as for a model saved from its own state dict."""
    out, inp = lm.get_output_embeddings(), lm.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return state
    name = next(n for n, m in lm.named_modules(remove_duplicate=False) if m is out)
    return {k: v for k, v in state.items() if k != f"{name}.weight"}


def _save_model(loop, tmp: Path, model_dir: Path, state: dict) -> None:
    from winnow.trainer.lora import is_peft, save_adapter, save_merged

    lm = loop.loss_mod.model
    if is_peft(lm):  # the adapter (pointing at the resolved base) and, asked for, the merged model
        save_adapter(lm, tmp, model_dir)
        if loop.p.lora.merge:
            save_merged(lm, tmp / "merged")
        return
    state = _without_tied_copy(lm, state)
    # the KV cache was switched off for packed training only: the saved model generates with it again
    use_cache = lm.config.use_cache
    lm.config.use_cache = getattr(lm, "winnow_use_cache", True)
    try:
        lm.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    finally:
        lm.config.use_cache = use_cache


def _finish(loop, out: Path, tokenizer_dir: Path, info: dict[str, Any]) -> None:
    """Weights, tokenizer and model card into ``out`` (rank 0), file by file from a temporary folder."""
    from transformers import AutoTokenizer

    from winnow.trainer.card import model_card
    from winnow.trainer.checkpoint import full_model_state

    # the model's own tensors (a training method's loss terms may hold more, saved by the method)
    state = {k[6:]: v for k, v in full_model_state(loop.loss_mod).items() if k.startswith("model.")}
    if not loop.d.main:
        return
    tmp = out / f".final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _save_model(loop, tmp, tokenizer_dir, state)
    try:
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(tmp))
    except (OSError, ValueError):
        pass  # a model directory without a tokenizer: the weights are still usable
    (tmp / "README.md").write_text(model_card(info))
    for f in sorted(tmp.iterdir()):
        if f.is_dir():  # merged/: a complete model folder of its own
            fsync_tree(f)
            shutil.rmtree(out / f.name, ignore_errors=True)
            os.replace(f, out / f.name)
            continue
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(f, out / f.name)
    fsync_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)


def train(
    p: TrainParams,
    model_dir: Path,
    dataset: Dataset,
    out: Path,
    name: str,
    reference: Path | str | None = None,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the model in ``model_dir`` on ``dataset`` into ``out``; resume or skip as needed.

    ``reference``: online Rho-1's reference model directory (or ``"base"``); ``on_done(result)`` runs
    on the main rank once ``train_result.json`` is written, or with the finished result of a run that
    is already done (the roof records the manifest entry there). ``p.model`` is only a label here (the
    identity keeps the spec the user gave).
    """
    from winnow.trainer.data import prepare_data

    t0 = time.time()
    data = prepare_data(p, dataset)
    model_info = _check_model(p, model_dir, data.max_token_id)
    model_info["always_keep_ids"] = _always_keep_ids(p, model_dir)
    _check_writable(out)
    from winnow.trainer.trackers import check_available

    check_available(p.report_to)  # before --out is created
    ident = {
        "model": p.model,
        "model_fingerprint": model_info["fingerprint"],
        "data": data.digest,
        "config": p.identity(),
    }
    # where the run lives is not what it computes: neither --out nor its path enter the hash, so a copied or
    # moved --out (a copied run directory) resumes (issue 28; before, `out` and `config.out` did)
    ident["hash"] = stable_hash(ident | {"config": {k: v for k, v in ident["config"].items() if k != "out"}})
    ident["out"] = recorded_out(out, data.source)  # recorded, not part of the identity
    ident["base_model_dir"] = str(model_dir)  # recorded, not part of the identity (machines differ)
    run = _Run(p, out, name, model_dir, data, model_info, ident, t0, reference, on_done)
    with out_lock(out, f"train:{name}"):  # a second training into this --out is refused, not interleaved
        return _train_claimed(run)


@dataclass
class _Run:
    """One claimed training run: what :func:`train` checked, handed to the steps after the claim."""

    p: TrainParams
    out: Path
    name: str
    model_dir: Path
    data: Any
    model_info: dict[str, Any]
    ident: dict[str, Any]
    t0: float
    reference: Path | str | None
    on_done: Callable[[dict[str, Any]], None] | None


def _build(r: _Run, device, d):
    """The model to train (a training method's trainable choice applied: LoRA, prompt tuning) and the
    loop's environment."""
    from winnow.core.model_io import load_for_training
    from winnow.trainer.loop import Env
    from winnow.trainer.method import MethodContext

    p = r.p
    model, head = load_for_training(r.model_dir, device)
    ctx = MethodContext(device=device, model_dir=r.model_dir, seed=p.seed, rank=d.rank, world=d.world)
    model, methods = _apply_methods(p, model, ctx, r.out)
    pad = getattr(model.config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and 0 <= pad < r.model_info["vocab_size"] else 0  # the loss's filler
    keep = r.model_info["always_keep_ids"]
    env = Env(
        device, d, r.out, pad_id=pad, scale=head.scale, softcap=head.softcap, always_keep_ids=keep,
        model_dir=r.model_dir,
    )  # fmt: skip
    return model, env, methods


def _train_claimed(r: _Run) -> dict[str, Any]:
    import torch

    from winnow.core.model_io import resolve_device
    from winnow.trainer.distributed import all_reduce_sum, setup, teardown
    from winnow.trainer.loop import Loop, Metrics

    p, out = r.p, r.out
    device = resolve_device(p.device)
    d = setup(device.type)
    done = _claim_out(out, r.ident) if d.main else None
    if all_reduce_sum([1.0 if done is not None else 0.0], device)[0] > 0:  # every rank learns it is done
        teardown()
        if done and r.on_done is not None:  # rank 0: the roof rewrites its record from the finished result
            r.on_done(done)
        return (done or {}) | {"skipped": True}
    torch.set_num_threads(p.threads)
    torch.manual_seed(p.seed + d.rank)
    model, env, methods = _build(r, device, d)
    loop = Loop(p, r.data, model, env, _reference(p, r.reference, device), methods=methods)
    from winnow.trainer.trackers import open_tracker

    tracker = open_tracker(p.report_to, out, r.name, p.identity()) if d.main else None
    metrics = Metrics(out / "metrics.jsonl", d.main, tracker)
    try:
        steps = _drive(loop, metrics, out)
    finally:
        metrics.close()
    info = {
        "name": r.name,
        "base_model": p.model,
        "adapter": hasattr(loop.loss_mod.model, "peft_config"),  # LoRA, prompt tuning: library_name peft
        "base_fingerprint": r.model_info["fingerprint"],
        "source": r.data.source,
        "evals": loop.evals,
        "steps": steps,
        "config": p.identity(),
    }
    _finish(loop, out, r.model_dir, info)
    result = _result(r, loop, steps, d.world)
    if d.main:
        atomic_write_bytes(out / RESULT_FILE, (json.dumps(result, indent=2) + "\n").encode())
        if r.on_done is not None:
            r.on_done(result)
    teardown()
    return result


def _result(r: _Run, loop, steps: int, world: int) -> dict[str, Any]:
    from winnow.core.shards import shards_block, step_entry

    out, data = str(r.out.resolve()), r.data
    return step_entry(
        "train",
        config=r.p.identity(),
        fingerprint=r.ident["hash"],
        outputs=[out],
        shards=shards_block(0, 0, 0),  # training has no shards; the block keeps the one entry shape
        counts={k: data.source[k] for k in ("train_samples", "eval_samples", "weighted_tokens")},
        started=r.t0,
        out=out,
        steps=steps,
        eval_loss_before=loop.evals.get(0),
        eval_loss=loop.evals.get(steps),
        layout=loop.layout,
        world_size=world,
        train_skipped=data.source["train_skipped"],
    )
