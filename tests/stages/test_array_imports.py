"""The stage array functions import and run with torch and numpy only: the trainer's online policies call
them on GPU machines that have no pyarrow, polars, duckdb or datasets (and no run store)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("pyarrow", "polars", "duckdb", "datasets", "pandas")

SCRIPT = textwrap.dedent(
    f"""
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ImportError("blocked in this test: " + name)
            return None

    sys.meta_path.insert(0, Block())
    import torch

    from winnow.stages import topk
    from winnow.stages.critical_tokens_math import critical_token_scores
    from winnow.stages.eu_plane_math import Q2, eu_plane_select, eu_quadrants, eu_token_scores
    from winnow.stages.excess_loss_math import excess_loss_select
    from winnow.stages.sstoken_math import sstoken_scores, sstoken_select
    from winnow.stages.token_cleaning_math import token_cleaning_select

    g = torch.Generator().manual_seed(0)
    nll = torch.rand(8, 6, generator=g, dtype=torch.float64) * 3
    ent = torch.rand(8, 6, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(8, 6, generator=g) < 0.7
    mask[:, 0] = True
    res = eu_plane_select(nll, ent, mask, 0.25, 0.5)
    assert int(res.keep_sample.sum()) == res.target == 2
    eu_quadrants(res.error, res.uncertainty, 0.5)
    eu_token_scores(nll, mask)
    _, keep = excess_loss_select(nll, nll / 2, mask, 0.6)
    assert int(keep.sum()) == topk.floor_count(0.6, int(mask.sum()))
    sstoken_select(nll, nll / 2, ent / 2, mask)
    assert int(token_cleaning_select(nll, nll / 2, mask, 0.6, "sample")[1].sum()) <= int(keep.sum())
    sstoken_scores(nll, None, mask, gamma=1.0)
    critical_token_scores(ent / 2, mask, torch.arange(8) % 2 == 0)
    assert [len(b) for b in topk.minibatches(20, 8, 0)] == [8, 8, 4]
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
    assert not leaked, leaked
    assert "winnow.core.store" not in sys.modules
    print("ok", Q2)
    """
)


def test_array_functions_import_without_pyarrow_or_the_store():
    out = subprocess.run([sys.executable, "-P", "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok 2"
