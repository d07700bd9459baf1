"""LeMo / JENGA contextual token sparsity in training (``--set lemo.predictors=DIR``; Wang et al., USENIX
ATC'25, arXiv 2501.09767). The arrays and the reading of the authors' code: :mod:`winnow.trainer.lemo_math`;
the predictors come from ``winnow lemo-fit`` (:mod:`winnow.trainer.lemo_fit`).

In each chosen decoder layer (``lemo.layers``; default the predictors' layers, which ``lemo-fit`` chooses
like the code: of 32 layers 15..30, in general ``n//2 - 1 .. n - 2``), per training micro-batch:

* **Attention on the kept blocks only.** The layer's predictor scores the 64-token blocks (``lemo.block``)
  of the normed input under ``no_grad`` and keeps the top ``lemo.keep`` of them (0.4, the code's
  ``--thresh``); the attention module runs on the gathered kept tokens, RoPE taken at their *original*
  positions (the model's cos/sin gathered), causal among the kept tokens (gathering keeps position
  order); its output is added to the residual at those tokens, and every other token's residual passes
  the attention unchanged. Only the kept tokens' q, k, v, attention and LoRA activations are saved.
* **MLP partial backward** (``lemo.mlp_keep`` = 0.2, the code's prune ratio 0.8): dense forward, backward
  through the top neurons only (:class:`~winnow.trainer.lemo_math.PrunedSwiGLU`). It gives no weight
  gradients, so the chosen layers' MLP must be frozen: LoRA on ``q_proj,k_proj,v_proj,o_proj`` (the
  paper's setting) or ``lemo.mlp_keep=1`` (a dense MLP) — anything else is refused with that fix.
* **Documents.** Blocks never straddle documents: a row's documents start where its ``position_ids`` are
  0 (a padded row is one document; a packed row restarts per sample), each document is cut into blocks
  from its own first token (its last block may be short: zero-padded for the predictor only), and each
  document keeps its own top ``max(1, ⌊nb·keep⌋)`` blocks, scored among its own blocks. Kept tokens of
  different documents never attend to each other: under SDPA/eager/flex an explicit causal
  same-document mask, under FlashAttention-2 ``position_ids`` restarting per document among the kept
  tokens (transformers' varlen path); a row with one document needs neither (plain causal).

Evaluation (``eval_loss``) runs the dense model: the forward change is entered around training
micro-batches only. Under activation checkpointing the recomputed forward reuses the first forward's
selection. Llama-like layers only (``input_layernorm``/``post_attention_layernorm`` around ``self_attn``
and a SiLU gate/up/down MLP): Llama, Mistral, Qwen2/3.
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from winnow.core.errors import UserError
from winnow.trainer.method import MethodContext, TrainingMethod

if TYPE_CHECKING:
    from winnow.core.layout import MicroBatch

PRED_FILE = "lemo_predictors.safetensors"
META_FILE = "lemo_predictors.json"
_LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}


def default_layers(n: int) -> list[int]:
    """The code's sparse layers scaled to ``n``: 15..30 of 32 (the first half and the last layer dense)."""
    return list(range(max(0, n // 2 - 1), max(1, n - 1)))


def parse_layers(spec: str, n: int, where: str) -> list[int]:
    """``"1,2"`` or ``"1-3"`` (inclusive) -> sorted layer indices, each in ``[0, n)``."""
    out: set[int] = set()
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        try:
            lo, _, hi = part.partition("-")
            out |= set(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise UserError(f"{where}={spec!r}: give layer numbers like 1,2 or 1-3") from None
    bad = sorted(i for i in out if not 0 <= i < n)
    if bad or not out:
        raise UserError(f"{where}={spec!r}: layers must lie in 0..{n - 1} (the model has {n})")
    return sorted(out)


def save_predictors(folder: Path, preds: dict[int, Any], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from winnow.core.store import atomic_write_json

    state = {
        f"{i}.{k}": v.detach().float().cpu().contiguous()
        for i, p in preds.items()
        for k, v in p.state_dict().items()
    }
    save_file(state, str(folder / PRED_FILE))
    atomic_write_json(folder / META_FILE, meta)


def load_predictors(folder: str | Path, device: Any) -> tuple[dict[int, Any], dict[str, Any]]:
    """The predictors of ``lemo-fit``'s output folder, and its JSON (geometry, layers, recall)."""
    from safetensors.torch import load_file

    from winnow.trainer.lemo_math import BlockPredictor

    folder = Path(folder).expanduser()
    if not (folder / PRED_FILE).exists() or not (folder / META_FILE).exists():
        raise UserError(
            f"lemo.predictors={folder}: no {PRED_FILE} and {META_FILE} there; make them with "
            "`winnow lemo-fit RUN --model M --out DIR`"
        )
    meta = json.loads((folder / META_FILE).read_text())
    state = load_file(str(folder / PRED_FILE))
    preds = {}
    for i in meta["layers"]:
        p = BlockPredictor(meta["n_heads"], meta["head_dim"], meta["block"], meta["h1"], meta["h2"])
        p.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(i)})
        preds[int(i)] = p.to(device).eval().requires_grad_(False)
    return preds, meta


@dataclass(kw_only=True)
class LemoParams(TrainingMethod):
    """``lemo.*``: ``predictors`` (a ``lemo-fit`` folder) turns it on."""

    predictors: str = ""  # folder of `winnow lemo-fit` (lemo_predictors.safetensors + .json)
    keep: float = 0.4  # share of each document's 64-token blocks that attend, per chosen layer
    layers: str = ""  # chosen decoder layers ("1,2" or "1-2"); empty: the predictors' layers
    block: int = 64  # tokens per block (must equal the predictors' block)
    mlp_keep: float = 0.2  # share of MLP neurons the backward runs through (1: dense MLP)

    def __post_init__(self) -> None:
        for key in ("keep", "mlp_keep"):
            v = getattr(self, key)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"lemo.{key}={v} must be in (0, 1]")
        if self.block < 1:
            raise ValueError(f"lemo.block={self.block} must be >= 1")
        self.state: LemoState | None = None

    @property
    def enabled(self) -> bool:  # type: ignore[override]
        return bool(self.predictors)

    def trainable(self, model: Any, ctx: MethodContext) -> Any:
        from winnow.trainer.loss import unwrap

        layers = unwrap(model).base_model.layers
        preds, meta = load_predictors(self.predictors, ctx.device)
        if meta["block"] != self.block:
            raise UserError(
                f"lemo.block={self.block} but {self.predictors} was fitted with block {meta['block']}: "
                f"set lemo.block={meta['block']} or refit"
            )
        chosen = parse_layers(self.layers, len(layers), "lemo.layers") if self.layers else sorted(preds)
        missing = [i for i in chosen if i not in preds]
        if missing:
            raise UserError(
                f"lemo.layers: {self.predictors} has no predictor for layers {missing}; refit with them"
            )
        for i in chosen:
            check_layer(layers[i], i, meta, self.mlp_keep)
        self.state = LemoState(self, {i: (layers[i], preds[i]) for i in chosen})
        return model

    def forward_change(self, batch: MicroBatch, model: Any) -> contextlib.AbstractContextManager:
        assert self.state is not None, "trainable() runs before the loop"
        return self.state.patched(batch)

    def metrics(self) -> dict[str, Any]:
        return self.state.take_metrics() if self.state is not None else {}

    def record(self) -> dict[str, Any]:
        s = self.state
        return (
            {}
            if s is None
            else {"lemo": {"layers": sorted(s.layers), "keep": self.keep, "mlp_keep": self.mlp_keep}}
        )


def check_layer(layer: Any, i: int, meta: dict[str, Any], mlp_keep: float) -> None:
    """A Llama-like layer the predictor fits; a frozen SiLU gate/up/down MLP when ``mlp_keep < 1``."""
    parts = {n for n, _ in layer.named_children()}
    attn = getattr(layer, "self_attn", None)
    if not _LAYER_PARTS <= parts or parts - _LAYER_PARTS:
        raise UserError(
            f"lemo: decoder layer {i} ({type(layer).__name__}: {sorted(parts)}) is not a Llama-like layer "
            "(input_layernorm, self_attn, post_attention_layernorm, mlp); LeMo supports Llama, Mistral, Qwen2/3"
        )
    hidden = layer.input_layernorm.weight.shape[0]
    if meta["n_heads"] * meta["head_dim"] != hidden or attn is None:
        raise UserError(
            f"lemo: the predictors expect hidden size {meta['n_heads'] * meta['head_dim']}, layer {i} has {hidden}"
        )
    if mlp_keep >= 1.0:
        return
    mlp = layer.mlp
    act = getattr(getattr(mlp, "config", None), "hidden_act", "silu")
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")) or act not in (
        "silu",
        "swish",
    ):
        raise UserError(
            f"lemo.mlp_keep={mlp_keep}: layer {i}'s MLP is not a SiLU gate/up/down MLP; set lemo.mlp_keep=1"
        )
    trained = [n for n, q in mlp.named_parameters() if q.requires_grad]
    if trained:
        raise UserError(
            f"lemo.mlp_keep={mlp_keep}: layer {i}'s MLP trains ({trained[0]}), but LeMo's MLP backward gives no "
            "weight gradients; use --set lora.target=q_proj,k_proj,v_proj,o_proj (the paper's setting) or "
            "lemo.mlp_keep=1"
        )


def _checkpointed(layer: Any, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, under the layer's activation checkpointing when the model enabled it: transformers
    wraps the layer class's ``forward``, which the instance's patched ``forward`` would otherwise skip."""
    import torch

    if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
        return layer._gradient_checkpointing_func(fn, *args)
    return fn(*args)


class LemoState:
    """The chosen layers and their predictors; patches their ``forward`` for one micro-batch."""

    def __init__(self, p: LemoParams, layers: dict[int, tuple[Any, Any]]):
        self.p, self.layers = p, layers
        self.kept, self.seen = 0, 0
        self.cache: dict[int, list] = {}

    @contextlib.contextmanager
    def patched(self, batch: MicroBatch):
        from winnow.trainer.lemo_layer import documents, lemo_forward

        docs = documents(batch.position_ids)
        self.cache = {}
        for i, (layer, pred) in self.layers.items():
            layer.forward = lambda *a, _i=i, _l=layer, _p=pred, **k: _checkpointed(
                _l, functools.partial(lemo_forward, self, _i, _l, _p, docs, **k), *a
            )
        try:
            yield
        finally:
            for layer, _ in self.layers.values():
                del layer.forward  # the class's forward again
            self.cache = {}

    def take_metrics(self) -> dict[str, Any]:
        out = {"lemo_kept": self.kept / self.seen} if self.seen else {}
        self.kept, self.seen = 0, 0
        return out
