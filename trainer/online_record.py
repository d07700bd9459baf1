"""``record_weights=true``: the token weights online training actually used, one selection table per epoch.

With an online policy the weights a sample trains with are decided at the step that draws it, by the
model of that step; they exist nowhere else. The recorder keeps them as the policy returns them (after
trimming, exactly what reaches the loss: index 0 and every dropped token at 0) and, at the end of each
epoch, writes ``selection/online-<name>-epoch<E>`` into the run (``<name>`` is the training run's name,
``E`` counts from 1) with the offline selections' contract (docs/CONTRACTS.md, "Selections"): one row per
sample of ``samples/``, shard by shard, ``sample_id``, ``keep``, ``reason``, ``policy``
(``online:<policy>``), ``n_supervised``, ``n_weighted``, ``weight_sum``, ``token_weight`` (``n_tokens``
entries) and ``epoch``. So ``winnow inspect`` and the card show it as any selection, and ``winnow export``
/ ``winnow train --selection`` can reuse it. Reasons: the policy's own (Q-Tuning's ``kept_q2``,
``dropped_q1``, ...; ``kept`` / ``no_token_kept`` for the token-level policies; ``all`` for
``online=all``), ``not_reached`` (``max_steps`` ended the epoch first), ``held_out`` (a scored held-out
sample) and ``not_trained`` (dropped by the offline selection, skipped as too long, or held out beyond
``eval_max_samples``).

Memory: 4 bytes per token of the training samples, on each rank. Several ranks: each fills the rows of
its own mini-batches; at every checkpoint and at the end of an epoch the buffers are summed onto rank 0
(each sample is drawn by exactly one rank per epoch, so the sum adds zeros: exact) and the other ranks
clear theirs. Rank 0 saves its buffer with every checkpoint, so a resumed run neither loses the rows of
the steps before the checkpoint nor records the redone steps twice; the table of an epoch is (re)written
only once its last step has run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

CODE_VERSION = "online-record/1"
FILE = "online_weights.safetensors"
_EU = [f"{h}_{q}" for h in ("kept", "topup", "dropped") for q in ("q1", "q2", "q3", "q4", "middle")]
# numeric codes (summed across ranks, so 0 must mean "not drawn")
REASONS = ("not_reached", "kept", "no_token_kept", "all", "no_supervised_tokens", *_EU)


def table_name(name: str, epoch: int) -> str:
    """``epoch`` 0-based, as the loop counts; the table's name counts from 1."""
    return f"selection/online-{name}-epoch{epoch + 1}"


class WeightRecorder:
    """``p``: the training parameters; ``data``: the loaded :class:`winnow.trainer.data.TrainData`;
    ``device``/``main``: this rank's device and whether it is rank 0."""

    def __init__(self, p: Any, data: Any, policy: str, device: Any = "cpu", main: bool = True):
        self.p, self.data, self.policy, self.device, self.main = p, data, policy, device, main
        self.name = p.name or p.selection or "all"
        self.run_root = Path(data.source["run"])
        tr = data.train
        self.index = {sid: k for k, sid in enumerate(tr.sample_ids)}
        self.offsets = np.concatenate([[0], np.cumsum(tr.lengths)]).astype(np.int64)
        self.weights = np.zeros(int(self.offsets[-1]), np.float32)
        self.code = np.zeros(len(tr.sample_ids), np.int64)

    def note(self, k: int, weight: np.ndarray | None, reason: str) -> None:
        """Sample ``k`` of the training set trained with ``weight`` (its trimmed frame; None: dropped)."""
        lo, hi = self.offsets[k], self.offsets[k + 1]
        self.weights[lo:hi] = 0.0
        if weight is not None:
            self.weights[lo : lo + len(weight)] = weight
            self.weights[lo] = 0.0  # index 0 is never a target
        self.code[k] = REASONS.index(reason)

    # ------------------------------------------------------------------------ ranks and checkpoints
    def reduce(self) -> None:
        """Sum every rank's rows onto rank 0; the other ranks start afresh (a collective)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for arr in (self.weights, self.code):
            t = torch.from_numpy(arr).to(self.device)
            dist.all_reduce(t)
            arr[:] = t.cpu().numpy() if self.main else 0

    def reset(self) -> None:
        self.weights[:] = 0.0
        self.code[:] = 0

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file(
            {"weights": torch.from_numpy(self.weights), "code": torch.from_numpy(self.code)},
            str(folder / FILE),
        )

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        if not self.main or not (folder / FILE).is_file():
            return
        got = load_file(str(folder / FILE))
        self.weights[:] = got["weights"].numpy()
        self.code[:] = got["code"].numpy()

    # ------------------------------------------------------------------------ the table
    def write(self, epoch: int) -> str:
        """``selection/online-<name>-epoch<E>`` from the rows so far (rank 0, after :meth:`reduce`)."""
        from winnow.pipeline.store import RunDir, stable_hash

        run = RunDir(self.run_root)
        samples = run.table("samples")
        name = table_name(self.name, epoch)
        inputs = {"samples": samples.digest()}
        if self.p.selection:
            sel = f"selection/{self.p.selection}"
            inputs[sel] = run.table(sel).digest()
        fp = stable_hash([CODE_VERSION, self.p.identity(), epoch])
        held = set(self.data.eval.sample_ids)
        out = run.table(name)
        for rec in samples.records():
            cols = samples.read_part(rec.part, columns=["sample_id", "n_tokens", "loss_mask"]).to_pydict()
            part = self._part(cols, held, epoch)
            out.write(rec.part, part, fingerprint=fp, inputs=inputs, extra={"epoch": epoch + 1})
        return name

    def _part(self, cols: dict[str, list], held: set[str], epoch: int):
        import pyarrow as pa

        rows_w, reasons = [], []
        for sid, n in zip(cols["sample_id"], cols["n_tokens"], strict=True):
            w = np.zeros(int(n), np.float32)
            k = self.index.get(sid)
            if k is None:
                reasons.append("held_out" if sid in held else "not_trained")
            else:
                lo, hi = self.offsets[k], self.offsets[k + 1]
                w[: hi - lo] = self.weights[lo:hi]
                reasons.append(REASONS[int(self.code[k])])
            rows_w.append(w)
        n_tokens = np.array([len(w) for w in rows_w], np.int64)
        flat = np.concatenate(rows_w) if rows_w else np.zeros(0, np.float32)
        offsets = np.concatenate([[0], np.cumsum(n_tokens)]).astype(np.int32)
        n_weighted = np.array([int(np.count_nonzero(w)) for w in rows_w], np.int32)
        n_sup = np.array([int(np.count_nonzero(m)) for m in cols["loss_mask"]], np.int32)
        return pa.table(
            {
                "sample_id": pa.array(cols["sample_id"], pa.string()),
                "keep": pa.array(n_weighted > 0, pa.bool_()),
                "reason": pa.array(reasons, pa.string()),
                "policy": pa.array([f"online:{self.policy}"] * len(rows_w), pa.string()),
                "n_supervised": pa.array(n_sup),
                "n_weighted": pa.array(n_weighted),
                "weight_sum": pa.array([float(w.sum(dtype=np.float64)) for w in rows_w], pa.float64()),
                "token_weight": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32())),
                "epoch": pa.array([epoch + 1] * len(rows_w), pa.int32()),
            }
        )
