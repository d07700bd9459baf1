"""`winnow train`: the entry point (:func:`train`, one function a run lock can wrap) and the `train` step.

Order of work, so that bad input leaves nothing behind: parameters, model directory, data (selection
checks, held-out split), tokenizer and vocabulary checks, ``--out`` writability; only then is ``--out``
created. ``--out`` holds ``winnow_train.json`` (the run's identity: model fingerprint, data digest,
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
from pathlib import Path
from typing import Any

from winnow.pipeline.steps import Step
from winnow.pipeline.store import (
    RunDir,
    UserError,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    fsync_tree,
    stable_hash,
)
from winnow.pipeline.write_guard import check_name, check_train_out, out_lock
from winnow.trainer.ckpt_integrity import clean_leftovers
from winnow.trainer.config import TrainParams

IDENTITY_FILE = "winnow_train.json"
RESULT_FILE = "train_result.json"


def _out_dir(p: TrainParams, run_dir: str | Path | None) -> tuple[Path, str]:
    if p.name:
        try:
            check_name(p.name, "--name")
        except ValueError as e:
            raise UserError(str(e)) from None
    name = p.name or p.selection or ("all" if not p.data else Path(p.data).stem)
    if p.out:
        return Path(p.out).expanduser(), name
    if run_dir is None:
        raise UserError("winnow train --data needs --out DIR (the directory the trained model is saved to)")
    return Path(run_dir) / "train" / name, name


def _check_writable(out: Path) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {probe} is not a writable directory; choose another --out")


def _check_model(p: TrainParams, run_dir, model_dir: Path, max_token_id: int) -> dict[str, Any]:
    from transformers import AutoConfig

    from winnow.pipeline.models import check_tokenizer, weights_fingerprint

    if not p.data:
        check_tokenizer(RunDir(run_dir), model_dir, what="model")
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
    from winnow.pipeline.always_keep import always_keep_ids
    from winnow.pipeline.models import load_tokenizer

    return tuple(always_keep_ids(load_tokenizer(model_dir), p.online.always_keep, "train always_keep"))


def _claim_out(out: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """Create ``out`` for this run; the finished result when an identical run already completed."""
    out.mkdir(parents=True, exist_ok=True)
    ident_path = out / IDENTITY_FILE
    if ident_path.exists():
        have = json.loads(ident_path.read_text())
        if have.get("hash") != identity["hash"]:
            diff = sorted(
                k for k in set(have) | set(identity) if have.get(k) != identity.get(k) and k != "hash"
            )
            raise UserError(
                f"--out {out} holds another training run (differs in {diff}); choose another --out or remove it"
            )
        if (out / RESULT_FILE).exists():
            return json.loads((out / RESULT_FILE).read_text())
    else:
        atomic_write_json(ident_path, identity)
    return None


def _load_model(model_dir: Path, device, dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from winnow.kernels.chunked_head import LMHead
    from winnow.stages.passes.model_io import check_head, flash_attention_available

    hf_logging.disable_progress_bar()  # the trainer reports its own progress; no per-file bars
    kwargs: dict[str, Any] = {"dtype": torch.float32, "use_safetensors": True}
    if device.type == "cuda":  # varlen attention for packed rows, never a padded full mask
        kwargs["attn_implementation"] = (
            "flash_attention_2" if flash_attention_available(device) else "flex_attention"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {model_dir} as a causal LM: {e}") from None
    model.winnow_use_cache = getattr(model.config, "use_cache", True)  # restored in the saved config
    model.config.use_cache = False  # a KV cache would make packed samples attend to each other
    out_emb = model.get_output_embeddings()
    with torch.no_grad():
        head = check_head(
            model,
            model.base_model,
            LMHead(out_emb.weight, getattr(out_emb, "bias", None)),
            device=torch.device("cpu"),
            dtype=torch.float32,
            where=str(model_dir),
        )
    return model, head


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
    for step in range(start, loop.total_steps):
        rec = loop.train_step(step)
        done = step + 1
        if done % p.log_every == 0 or done == loop.total_steps:
            metrics.write(rec)
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


def _reference(p: TrainParams, run_dir, device):
    """Online Rho-1's reference model: ``rho1.reference``, else the model of the run's `reference` signals."""
    if p.online.policy != "rho1":
        return None
    if p.online.rho1.reference == "base":
        return "base"
    spec = p.online.rho1.reference
    if not spec:
        records = RunDir(run_dir).table("signals/reference").records() if run_dir is not None else []
        spec = next((r.extra.get("model") for r in records if r.extra.get("model")), "")
        if not spec:
            raise UserError(
                "online=rho1 needs a reference model: --set rho1.reference=MODEL_DIR (or builtin:NAME), or "
                "score the run with `winnow score RUN --model REF --alias reference` first"
            )
    from winnow.pipeline.models import resolve_model

    ref, _ = _load_model(resolve_model(spec), device, p.dtype)
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


def train(p: TrainParams, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train ``p.model`` on a run's selection (or an export) into ``--out``; resume or skip as needed."""
    from winnow.pipeline.models import resolve_model
    from winnow.trainer import data as data_mod

    t0 = time.time()
    if not p.model:
        raise UserError("winnow train needs --model (builtin:<name> or a local model directory)")
    if not p.data and run_dir is None:
        raise UserError("winnow train needs a RUN directory with --selection, or --data EXPORT.parquet")
    out, name = _out_dir(p, run_dir)
    model_dir = resolve_model(p.model)
    check_train_out(out, run_dir, model_dir, IDENTITY_FILE)
    data = data_mod.load(p, run_dir)
    model_info = _check_model(p, run_dir, model_dir, data.max_token_id)
    model_info["always_keep_ids"] = _always_keep_ids(p, model_dir)
    _check_writable(out)
    ident = {
        "model": p.model,
        "model_fingerprint": model_info["fingerprint"],
        "data": data.digest,
        "config": p.identity(),
        "out": str(out.resolve()),
    }
    ident["hash"] = stable_hash(ident)
    with out_lock(out, f"train:{name}"):  # a second training into this --out is refused, not interleaved
        return _train_claimed(p, run_dir, out, name, model_dir, data, model_info, ident, t0)


def _train_claimed(p, run_dir, out, name, model_dir, data, model_info, ident, t0) -> dict[str, Any]:
    import torch

    from winnow.stages.passes.model_io import resolve_device
    from winnow.trainer.distributed import all_reduce_sum, setup, teardown
    from winnow.trainer.loop import Env, Loop, Metrics
    from winnow.trainer.method import MethodContext, apply_trainable

    device = resolve_device(p.device)
    d = setup(device.type)
    done = _claim_out(out, ident) if d.main else None
    if all_reduce_sum([1.0 if done is not None else 0.0], device)[0] > 0:  # every rank learns it is done
        teardown()
        return _already_trained(done, p, run_dir, name)
    torch.set_num_threads(p.threads)
    torch.manual_seed(p.seed + d.rank)
    model, head = _load_model(model_dir, device, p.dtype)
    ctx = MethodContext(device=device, model_dir=model_dir, seed=p.seed, rank=d.rank, world=d.world)
    model = apply_trainable(p.methods(), model, ctx)  # LoRA, prompt tuning: the seeded adapter init
    pad = getattr(model.config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and 0 <= pad < model_info["vocab_size"] else 0  # the loss's filler
    keep = model_info["always_keep_ids"]
    env = Env(device, d, out, pad_id=pad, scale=head.scale, softcap=head.softcap, always_keep_ids=keep)
    loop = Loop(p, data, model, env, _reference(p, run_dir, device))
    steps = _drive(loop, Metrics(out / "metrics.jsonl", d.main), out)
    info = {
        "name": name,
        "base_model": p.model,
        "base_path": str(model_dir),
        "base_fingerprint": model_info["fingerprint"],
        "source": data.source,
        "evals": loop.evals,
        "steps": steps,
        "config": p.identity(),
    }
    _finish(loop, out, model_dir, info)
    from winnow.pipeline.shards import shards_block, step_entry

    result = step_entry(
        "train",
        config=p.identity(),
        fingerprint=ident["hash"],
        outputs=[str(out.resolve())],
        shards=shards_block(0, 0, 0),  # training has no shards; the block keeps the one entry shape
        counts={k: data.source[k] for k in ("train_samples", "eval_samples", "weighted_tokens")},
        started=t0,
        out=str(out.resolve()),
        steps=steps,
        eval_loss_before=loop.evals.get(0),
        eval_loss=loop.evals.get(steps),
        layout=loop.layout,
        world_size=d.world,
        train_skipped=data.source["train_skipped"],
    )
    if d.main:
        atomic_write_bytes(out / RESULT_FILE, (json.dumps(result, indent=2) + "\n").encode())
        if run_dir is not None and not p.data:
            RunDir(run_dir).update_manifest(f"train:{name}", result)
    teardown()
    return result


def _already_trained(done: dict[str, Any] | None, p: TrainParams, run_dir, name: str) -> dict[str, Any]:
    """The finished result; rank 0 rewrites the run's manifest entry from it (so a rerun repairs an
    edited ``eval_loss`` that `winnow verify` reported)."""
    if done and run_dir is not None and not p.data:
        RunDir(run_dir).update_manifest(f"train:{name}", done)
    return (done or {}) | {"skipped": True}


def _run_step(run: RunDir, p: TrainParams) -> dict[str, Any]:
    res = train(p, run.root)
    before, after = res.get("eval_loss_before"), res.get("eval_loss")
    if before is not None and after is not None:
        print(
            f"[winnow] train: eval_loss {before:.4f} -> {after:.4f} after {res['steps']} steps ({res['out']})"
        )
    return res


STEP = Step(
    name="train",
    params=TrainParams,
    run=_run_step,
    help="train a model on a selection (token-weighted, trimmed, packed; resumable; torchrun)",
)
