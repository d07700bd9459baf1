"""Half fine-tuning (HFT, Hui et al., ACL 2025, arXiv 2404.18466): train a random half of each decoder
layer's matrices, freeze the rest (``--set hft=true``, i.e. ``hft.enabled=true``; ``hft.seed``).

The draw (ALGORITHMS_TRAINING.md §5, the reading of a third-party re-implementation): per decoder layer,
2 of the 4 attention projections (``q/k/v/o_proj``) and, in a random half of the layers, 2 of the 3 MLP
projections (``gate/up/down_proj``), 1 in the other half; 1 of the 2 layer norms (the note's "LayerNorm:
also half"). A projection trains or freezes with its bias. Outside the decoder layers (embeddings, LM
head, final norm) everything trains: the note says embeddings and head are "updated by default"; the final
norm is unconfirmed and trains here. Any other tensor inside a layer (Qwen3's ``q_norm``) trains too.
Drawn once per training stage (``winnow train`` run) with ``random.Random(seed)`` from the architecture
alone, so every rank draws the same half without a broadcast and a resumed run redraws it exactly; the
list of trained tensors goes into ``winnow_train.json``. Frozen tensors have ``requires_grad=False``: no
gradient, no optimizer state (the source of the paper's ≈30% time saving). Not with LoRA or prompt
tuning (they freeze the whole base already). Under FSDP2 the frozen tensors are sharded like the others and get
no gradient (tested: 2 gloo ranks give one process's gradients, tests/trainer/test_method_distributed.py).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from winnow.trainer.method import MethodContext, TrainingMethod

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(kw_only=True)
class HftParams(TrainingMethod):
    """``hft.*`` (``hft=true`` is ``hft.enabled=true``)."""

    enabled: bool = False  # train a random half of each decoder layer, freeze the rest
    seed: int = -1  # the draw's seed; -1: the run's seed

    def __post_init__(self) -> None:
        self.trained: list[str] = []
        self.drawn_seed = self.seed

    def trainable(self, model: Any, ctx: MethodContext) -> Any:
        self.drawn_seed = ctx.seed if self.seed < 0 else self.seed
        self.trained = hft_freeze(model, self.drawn_seed)
        return model

    def record(self) -> dict[str, Any]:
        """What ``winnow_train.json`` keeps of the draw."""
        return {"hft": {"seed": self.drawn_seed, "trained": self.trained}}


def hft_draw(n_layers: int, seed: int) -> list[set[str]]:
    """Per layer, the module names (of ATTENTION, MLP, NORMS) that train."""
    rng = random.Random(seed)
    two = set(rng.sample(range(n_layers), n_layers // 2))
    out = []
    for layer in range(n_layers):
        chosen = set(rng.sample(ATTENTION, 2))
        chosen |= set(rng.sample(MLP, 2 if layer in two else 1))
        chosen |= set(rng.sample(NORMS, 1))
        out.append(chosen)
    return out


def _category(name: str) -> tuple[int, str] | None:
    """(layer, module) of a drawn category's parameter, or None for a tensor that always trains."""
    m = _LAYER.search(name)
    if m is None:
        return None
    parts = name[m.end() :].split(".")
    module = next((p for p in parts if p in ATTENTION + MLP + NORMS), None)
    return None if module is None else (int(m.group(1)), module)


def hft_freeze(model: Any, seed: int) -> list[str]:
    """Freeze the half not drawn; the names of the parameters that train (sorted)."""
    params = dict(model.named_parameters())
    cats = {n: _category(n) for n in params}
    layers = sorted({c[0] for c in cats.values() if c is not None})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(
            f"hft=true: {type(model).__name__} has no decoder layers named layers.N.(self_attn|mlp).*_proj; "
            "half fine-tuning needs a Llama-like layer (q/k/v/o_proj, gate/up/down_proj, two layer norms)"
        )
    for layer in layers:
        have = {c[1] for c in cats.values() if c is not None and c[0] == layer}
        if have != set(ATTENTION + MLP + NORMS):
            missing = sorted(set(ATTENTION + MLP + NORMS) - have)
            raise ValueError(f"hft=true: layer {layer} of {type(model).__name__} lacks {missing}")
    draw = hft_draw(len(layers), seed)
    for name, q in params.items():
        c = cats[name]
        q.requires_grad_(c is None or c[1] in draw[c[0]])
    return sorted(n for n, q in params.items() if q.requires_grad)
