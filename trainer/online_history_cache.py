"""ssToken's history losses under ``sstoken.history=start``, computed once per sample, not once per epoch.

With ``history=start`` the history model is the frozen model training started from, and a sample's
token weights never change, so its per-token history NLL is a fixed function of the sample. The trainer
computes it the first time the sample is drawn (epoch 1, a no-grad forward of the history model) and
reads it here in every later epoch, in both scoring modes (``online_scoring=separate`` and ``reuse``).
An EMA history (``history=ema``) moves every step and is never cached. ``--set
sstoken.cache_history=false`` turns the cache off; with one epoch (or ``max_steps`` within the first)
it is never built, since no sample would be read back.

Layout and memory: one float32 value per supervised target (the positions ``i >= 1`` whose weight is
> 0, i.e. the online mask), all samples in one flat buffer with int64 offsets per sample: **4 bytes per
supervised token** plus 8 bytes per sample (e.g. 1M samples of 200 supervised tokens: 800 MB). Values are
rounded to float32 when stored and the policy reads the rounded value in epoch 1 too, so a sample's
history NLL is the same number in every epoch, whether it came from the forward or from the cache.

Resume: a recomputed score can differ from the cached one in its last bits (a different mini-batch pads
the sample to a different width), so the filled entries go into every checkpoint
(``history_cache.safetensors``: ``index`` int64 sample indices, ``offsets`` int64, ``values`` float32;
no pickle) and are loaded on resume: a resumed run reads the very values an uninterrupted one would.
Several ranks: each rank fills the samples of its own mini-batches; at every checkpoint and at the end of
every epoch the entries filled since the last exchange are gathered onto every rank (the lowest rank that
filled a sample gives its values, so the exchange is exact), so from epoch 2 on every rank reads every
sample from the cache, and rank 0's checkpoint holds all of them.

Measured side by side against the mini-batch control (``benchmarks/bench_train.py --interleaved
--samples 64 --epochs 2``, loaded 2-core VM, benchmarks/RESULTS.md): epoch 1 is unchanged by design
(1.46-1.71x with the separate scoring forward, 1.34-1.37x with ``online_scoring=reuse``); epoch 2, all
history losses from the cache: 1.08-1.24x separate, 0.94-1.13x reuse (the issue's target: <= 1.3x). The
test-sized model (vocabulary 802) gives cached values within 1e-5 of a float64 forward of the start model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from winnow.core.errors import UserError

FILE = "history_cache.safetensors"


def supervised_counts(weights: list[np.ndarray]) -> np.ndarray:
    """Per sample, the number of targets the online mask holds (index 0 has no predecessor)."""
    return np.array([int(np.count_nonzero(np.asarray(w)[1:] > 0)) for w in weights], np.int64)


class HistoryCache:
    """Sample index (of the training set) -> float32 history NLL at its supervised targets."""

    def __init__(self, counts: np.ndarray):
        self.counts = np.asarray(counts, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.values = np.zeros(int(self.offsets[-1]), np.float32)
        self.filled = np.zeros(len(self.counts), bool)
        self.fresh = np.zeros(len(self.counts), bool)  # filled here since the last exchange between ranks

    def __len__(self) -> int:
        return int(self.filled.sum())

    def get(self, k: int) -> np.ndarray | None:
        if not self.filled[k]:
            return None
        return self.values[self.offsets[k] : self.offsets[k + 1]]

    def put(self, k: int, values: np.ndarray) -> None:
        if len(values) != self.counts[k]:
            raise ValueError(
                f"sample {k}: {len(values)} history values for {self.counts[k]} supervised targets"
            )
        self.values[self.offsets[k] : self.offsets[k + 1]] = values
        self.filled[k] = self.fresh[k] = True

    # ------------------------------------------------------------------------------ (B, T) frames
    def read(self, idx: np.ndarray, mask: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The mini-batch's ``(B, T)`` float64 history NLL from the cache (NaN off the mask and in rows not
        cached) and the rows not cached."""
        out = torch.full(mask.shape, float("nan"), dtype=torch.float64)
        missing = []
        for r, k in enumerate(idx):
            got = self.get(int(k))
            if got is None:
                missing.append(r)
            else:
                out[r, mask[r]] = torch.from_numpy(got).double()
        return out, missing

    def write(self, idx: np.ndarray, rows: list[int], mask: torch.Tensor, nll: torch.Tensor) -> None:
        """Store rows ``rows`` of a freshly computed ``(B, T)`` history NLL (``mask`` the same frame)."""
        for r in rows:
            self.put(int(idx[r]), nll[r, mask[r]].to(torch.float32).numpy())

    # ------------------------------------------------------------------------------ ranks and checkpoints
    def exchange(self, rank: int, world: int, device) -> None:
        """Every rank gets the entries any rank filled since the last exchange (a collective)."""
        import torch.distributed as dist

        if world > 1 and dist.is_available() and dist.is_initialized():
            claim = torch.from_numpy(np.where(self.fresh, rank, world).astype(np.int64)).to(device)
            dist.all_reduce(claim, op=dist.ReduceOp.MIN)
            owner = claim.cpu().numpy()
            give = np.repeat(owner == rank, self.counts)
            contrib = torch.from_numpy(np.where(give, self.values, np.float32(0.0))).to(device)
            dist.all_reduce(contrib)
            take = np.repeat(owner < world, self.counts)  # a sample two ranks filled: the owner's values
            self.values[take] = contrib.cpu().numpy()[take]
            self.filled |= owner < world
        self.fresh[:] = False

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        index = np.flatnonzero(self.filled).astype(np.int64)
        lengths = self.counts[index]
        segments = [self.values[self.offsets[k] : self.offsets[k + 1]] for k in index]
        values = np.concatenate(segments) if segments else np.zeros(0, np.float32)
        tensors = {
            "index": torch.from_numpy(index),
            "offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)),
            "values": torch.from_numpy(np.ascontiguousarray(values, np.float32)),
        }
        save_file(tensors, str(folder / FILE))

    def load(self, folder: Path) -> None:
        """Entries of a checkpoint; none when it has no cache file (written with the cache off)."""
        from safetensors.torch import load_file

        self.filled[:] = self.fresh[:] = False
        if not (folder / FILE).is_file():
            return
        got = {k: v.numpy() for k, v in load_file(str(folder / FILE)).items()}
        index, offsets, values = got["index"], got["offsets"], got["values"]
        if len(index) and (index.max() >= len(self.counts) or np.any(np.diff(offsets) != self.counts[index])):
            raise UserError(
                f"{folder / FILE} does not match the training samples (other data or trimming than the run "
                "that wrote it): resume with the same data, or start a new --out"
            )
        for j, k in enumerate(index):
            self.put(int(k), values[offsets[j] : offsets[j + 1]])
        self.fresh[:] = False
