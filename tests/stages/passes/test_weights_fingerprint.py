"""The weights fingerprint is a hash of the tensors: re-saved identical weights (other shard split, header
metadata, config.json) fingerprint equal, and a change to one tensor's data, dtype or name does not."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import winnow.core.models as mio


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed.weight": torch.randn(40, 16, generator=g),
        "model.layers.0.w": torch.randn(16, 2000, generator=g),  # > 2 x 4 KiB: sampled mode reads its ends
        "lm_head.weight": torch.randn(40, 16, generator=g),
    }


def _save(path, shards: list[dict[str, torch.Tensor]], meta: dict, config: dict):
    path.mkdir()
    for i, shard in enumerate(shards):
        save_file(shard, str(path / f"model-{i:05d}-of-{len(shards):05d}.safetensors"), metadata=meta)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("full", [True, False])
def test_resaved_identical_weights_fingerprint_equal(tmp_path, monkeypatch, full):
    if not full:
        monkeypatch.setattr(mio, "FULL_HASH_BYTES", 0)
    t = _tensors()
    one = _save(tmp_path / "one", [t], {"format": "pt"}, {"model_type": "llama"})
    names = sorted(t)
    two = _save(
        tmp_path / "two",
        [{k: t[k] for k in names[:1]}, {k: t[k] for k in names[1:]}],
        {"format": "pt", "saved_by": "transformers 9"},
        {"model_type": "llama", "transformers_version": "9"},
    )
    fp = mio.weights_fingerprint(one)
    assert fp == mio.weights_fingerprint(two)
    assert mio.config_fingerprint(one) != mio.config_fingerprint(two)  # the pass is still redone
    changed = dict(t)
    changed["model.layers.0.w"] = t["model.layers.0.w"].clone()
    changed["model.layers.0.w"][0, 0] += 1.0  # within the first 4 KiB: seen in both modes
    assert mio.weights_fingerprint(_save(tmp_path / "data", [changed], {}, {})) != fp
    half = {k: v.half() for k, v in t.items()}
    assert mio.weights_fingerprint(_save(tmp_path / "dtype", [half], {}, {})) != fp
    renamed = {("model.embed.other" if k == "model.embed.weight" else k): v for k, v in t.items()}
    assert mio.weights_fingerprint(_save(tmp_path / "name", [renamed], {}, {})) != fp
