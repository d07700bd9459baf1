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
"""

from __future__ import annotations

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


class WeightedLMLoss(torch.nn.Module):
    """``Σ_i w_i · CE(head(h[gather_i]), targets_i)`` of one micro-batch, differentiable in every weight."""

    def __init__(self, model: torch.nn.Module, scale: float = 1.0, softcap: float | None = None):
        super().__init__()
        self.model = model  # registered: DDP/FSDP2 see (and sync) every parameter, head included
        self.scale = float(scale)
        self.softcap = softcap

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
        h = self._hidden(input_ids, position_ids)
        n_virtual = h.shape[1] - input_ids.shape[1]
        if n_virtual:
            gather = shift_gather(gather, input_ids.shape[1], n_virtual)
        h = h.reshape(-1, h.shape[-1]).index_select(0, gather)
        _, head = body_and_head(self.model)
        bias = getattr(head, "bias", None)
        if self.scale != 1.0:
            h = h * self.scale
            bias = None if bias is None else bias * self.scale
        return linear_cross_entropy(h, head.weight, targets, weights.to(torch.float32), bias, self.softcap)
