"""The one module the trainer calls through DDP/FSDP2: body -> gather weighted positions -> LM-head loss.

Calling ``lm_head.weight`` outside the wrapped module would skip DDP's gradient hooks and, under FSDP2,
see a shard of the weight; so the body, the gather, the head and the loss all live in
:meth:`WeightedLMLoss.forward`, which returns the *unnormalised* ``Σ w·ℓ`` of a micro-batch (the loop
divides the gradients by the step's ``Σ w`` once, after accumulation). Tied embeddings stay tied: the
head weight is read from the model at every call, never copied.

The head reproduces the model's logit post-processing as :class:`winnow.kernels.chunked_head.LMHead`
does: ``scale * (W h + b)`` is computed as ``W (scale h) + scale b``, then the soft-cap, inside
:func:`winnow.kernels.switch.linear_cross_entropy` (the chunked PyTorch reference on CPU, the Triton
kernel on CUDA), so full ``(tokens, vocab)`` logits never exist and weight-0 positions never reach it.

A ``peft``-wrapped model works unchanged: :func:`unwrap` finds the causal LM underneath (its layers hold
the adapters), and its body and head are called as for a plain model. Under prompt tuning
(:mod:`winnow.trainer.prompt_tuning`, padded rows only) the body runs on ``[prompt; embed(ids)]`` and the
gather index skips the virtual positions, which therefore never carry loss.

**Loss terms** (the loss seam of :mod:`winnow.trainer.method`): :class:`LossTerm` modules given to
:class:`WeightedLMLoss` run inside its forward after the body, see every input of the micro-batch
(:class:`TermInput`: the body's hidden states, the gathered and scaled states, the head, targets,
weights) and add their unnormalised ``Σ w·term`` to the loss (``replaces_ce``: instead of the
cross-entropy). They run in training only unless ``in_eval``, so ``eval_loss`` stays the plain
cross-entropy. Without terms the forward is the one above, bit for bit. :func:`per_token_in_head` is
the helper for a term of each position's logits (DFT's, OTR's): chunk by chunk, each chunk's logits
recomputed in the backward (activation checkpointing), so no ``[N, V]`` array exists beyond a chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from winnow.kernels.switch import linear_cross_entropy
from winnow.trainer.prompt_tuning import prompted_embeds, shift_gather, virtual_tokens


def unwrap(model: Any) -> Any:
    """The ``*ForCausalLM`` module of a model (a ``PeftModel`` keeps it behind ``get_base_model``)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def body_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    lm = unwrap(model)
    body, head = lm.base_model, lm.get_output_embeddings()
    if body is lm or head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(lm).__name__} has no separable body and linear LM head")
    return body, head


@dataclass(kw_only=True)
class TermInput:
    """Everything a :class:`LossTerm` sees of one micro-batch (the padded or packed layout's frame)."""

    input_ids: torch.Tensor  # (R, W)
    position_ids: torch.Tensor | None  # (R, W) packed rows (restarting per sample), else None
    hidden: torch.Tensor  # (R, W, D) the body's last hidden states (virtual prompt positions dropped)
    gather: torch.Tensor  # (M,) flat positions into R*W of the states that predict weighted targets
    h: torch.Tensor  # (M, D) those states, times the model's logit scale
    head_weight: torch.Tensor  # (V, D) the LM head (tied to the embedding where the model ties it)
    bias: torch.Tensor | None  # (V,) times the logit scale, or None
    softcap: float | None
    targets: torch.Tensor  # (M,)
    weights: torch.Tensor  # (M,) float32: the selection's token weights


class LossTerm(torch.nn.Module):
    """One addend of the micro-batch loss: ``forward(x: TermInput) -> scalar`` (unnormalised, weighted like
    the cross-entropy: the loop divides the step's gradients by ``Σ w`` once)."""

    replaces_ce: bool = False  # the term is the loss (e.g. OTR, DFT): the cross-entropy is not added
    in_eval: bool = False  # also counted in eval_loss (by default eval_loss is the plain cross-entropy)

    def forward(self, x: TermInput) -> torch.Tensor:
        raise NotImplementedError


def _chunk_term(h, weight, bias, softcap, targets, w, fn) -> torch.Tensor:
    logits = torch.nn.functional.linear(h.float(), weight.float(), None if bias is None else bias.float())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return (w * fn(logits, targets)).sum()


def per_token_in_head(
    x: TermInput, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], chunk: int = 1024
) -> torch.Tensor:
    """``Σ_i w_i · fn(logits_i, target_i)`` over the gathered positions; ``fn`` maps fp32 logits ``(n, V)``
    (scale and soft-cap applied, as the head computes them) and targets ``(n,)`` to ``(n,)``. Chunks of
    ``chunk`` positions, each recomputed in the backward: peak ``chunk × V`` floats, not ``M × V``."""
    from torch.utils.checkpoint import checkpoint

    total = x.h.new_zeros((), dtype=torch.float32)
    for lo in range(0, x.h.shape[0], chunk):
        hi = lo + chunk
        args = (x.h[lo:hi], x.head_weight, x.bias, x.softcap, x.targets[lo:hi], x.weights[lo:hi], fn)
        total = total + checkpoint(_chunk_term, *args, use_reentrant=False)
    return total


class WeightedLMLoss(torch.nn.Module):
    """``Σ_i w_i · CE(head(h[gather_i]), targets_i)`` of one micro-batch, differentiable in every weight."""

    def __init__(
        self,
        model: torch.nn.Module,
        scale: float = 1.0,
        softcap: float | None = None,
        terms: Sequence[LossTerm] = (),
    ):
        super().__init__()
        self.model = model  # registered: DDP/FSDP2 see (and sync) every parameter, head included
        self.scale = float(scale)
        self.softcap = softcap
        self.terms = torch.nn.ModuleList(terms)  # registered too: a term may own parameters (extra heads)

    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """Hidden states aligned with ``input_ids`` (a prompt's virtual positions dropped)."""
        h = self._hidden(input_ids, position_ids)
        return h[:, h.shape[1] - input_ids.shape[1] :]

    def _hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        body, _ = body_and_head(self.model)
        # use_cache=False: with a cache transformers lets packed samples attend to each other
        kwargs: dict[str, Any] = {"use_cache": False}
        if virtual_tokens(self.model):
            if position_ids is not None:  # peft would drop them: packed samples would run into each other
                raise ValueError("prompt tuning runs on the padded layout only (no position_ids)")
            kwargs["inputs_embeds"] = prompted_embeds(self.model, input_ids)
        else:
            kwargs["input_ids"] = input_ids
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        return body(**kwargs).last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,  # (R, W)
        gather: torch.Tensor,  # (M,) flat positions into R*W
        targets: torch.Tensor,  # (M,)
        weights: torch.Tensor,  # (M,) float
        position_ids: torch.Tensor | None = None,  # packed rows: restarting per sample
    ) -> torch.Tensor:
        full = self._hidden(input_ids, position_ids)
        n_virtual = full.shape[1] - input_ids.shape[1]
        at = shift_gather(gather, input_ids.shape[1], n_virtual) if n_virtual else gather
        h = full.reshape(-1, full.shape[-1]).index_select(0, at)
        _, head = body_and_head(self.model)
        bias = getattr(head, "bias", None)
        if self.scale != 1.0:
            h = h * self.scale
            bias = None if bias is None else bias * self.scale
        terms = [t for t in self.terms if self.training or t.in_eval]
        if not terms:
            return linear_cross_entropy(
                h, head.weight, targets, weights.to(torch.float32), bias, self.softcap
            )
        x = TermInput(
            input_ids=input_ids, position_ids=position_ids, hidden=full[:, n_virtual:], gather=gather, h=h,
            head_weight=head.weight, bias=bias, softcap=self.softcap, targets=targets,
            weights=weights.to(torch.float32),
        )  # fmt: skip
        total = sum((t(x) for t in terms), start=torch.zeros((), dtype=torch.float32, device=h.device))
        if any(t.replaces_ce for t in terms):
            return total
        return linear_cross_entropy(h, head.weight, targets, x.weights, bias, self.softcap) + total
