"""A toy scoring stage: everything a stage module holds, declared once (``STAGE``).

``tests/pipeline/test_steps.py`` registers it in-process and also copies this file into a temporary
folder with a ``toy-0.0.dist-info/entry_points.txt`` (group ``winnow.stages``), as a plugin would ship.
By hand: a sample is kept when its length is odd; its supervised tokens at positions divisible by
``every`` are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from winnow.core.shards import Computed
from winnow.stages import stage_io as io
from winnow.stages.stage import Stage


@dataclass(kw_only=True)
class ToyParams:
    every: int = 2  # keep supervised tokens at positions divisible by this

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every={self.every} must be >= 1; e.g. --set every=2")


def compute(ctx, part: int, state: None) -> Computed:
    shard = ctx.shard(part)
    pos = np.arange(shard.loss_mask.shape[1])[None, :]
    keep_tok = shard.loss_mask & (pos % ctx.params.every == 0)
    keep = shard.n_tokens % 2 == 1  # odd-length samples are kept
    table = pa.table(
        {
            "sample_id": shard.sample_id,
            "keep": pa.array(keep),
            "reason": pa.array(["odd" if k else "even" for k in keep]),
            "token_keep": io.to_list_array(keep_tok, shard.loss_mask, shard.n_tokens, pa.bool_()),
        }
    )
    return Computed([table], counts={"kept_tokens": int(keep_tok.sum())})


STAGE = Stage(
    name="toy",
    help="toy stage: every other supervised token",
    params=ToyParams,
    code_version="toy/1",
    reads=("samples",),
    columns=("keep", "reason", "token_keep"),
    compute=compute,
)
