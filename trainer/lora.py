"""Parameter-efficient training through ``peft``: LoRA adapters on the model ``winnow train`` fine-tunes.

Q-Tuning, ssToken and cDPO report their results with LoRA, and a 7B model fits one GPU only that way,
so ``--set lora.r=16`` (or the alias ``lora_r=16``) turns it on. The library does the work (``peft.LoraConfig`` /
``get_peft_model``; never a hand-written LoRA); this module chooses the defaults and keeps what winnow
promises around it:

* ``lora.alpha`` defaults to ``2 * lora.r``; ``lora.target`` defaults to every linear layer of the body
  (peft's ``all-linear``, which leaves the LM head alone), or a comma list such as ``q_proj,v_proj``.
* On GPU the frozen base is cast to bf16 and the adapters kept in fp32 (updates of size lr·grad vanish
  in bf16); on CPU everything stays fp32 (bf16 is ~27x slower on this CPU, ENVIRONMENT_NOTES).
* The trainer's loss module reaches the body and LM head through :func:`base_causal_lm`: peft injects
  its layers into the wrapped model in place, so the gathered-head loss runs unchanged.
* Saving writes the adapter with ``base_model_name_or_path`` set to the *resolved local directory* of
  the base (never ``builtin:...``), so ``AutoPeftModelForCausalLM.from_pretrained(out)`` loads it on a
  machine that has that directory; ``merge=true`` also writes the merged full model to ``out/merged``.
* A model pass given an adapter directory loads its base, applies the adapter and merges it
  (:func:`load_causal_lm`), so users score data with the model they are fine-tuning.

``peft`` is the optional extra ``winnow[peft]`` (in ``dev``); without it ``lora.r > 0`` is a user error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from winnow.core.errors import UserError
from winnow.core.models import ADAPTER_CONFIG, adapter_base, load_causal_lm  # noqa: F401  (re-exported)
from winnow.trainer.method import MethodContext, TrainingMethod

if TYPE_CHECKING:
    import torch


@dataclass(kw_only=True)
class LoraParams(TrainingMethod):
    """``lora.*`` (pre-group names ``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_target``, ``merge``)."""

    r: int = 0  # adapter rank; 0 = full fine-tuning
    alpha: int = 0  # scaling numerator; 0 = 2 * r
    dropout: float = 0.0  # dropout on the adapter input
    target: str = "all-linear"  # peft's every-linear-layer default, or a comma list of module names
    merge: bool = False  # also save the merged full model under OUT/merged

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"lora.r={self.r} must be >= 0 (0 turns LoRA off)")
        if self.alpha < 0:
            raise ValueError(f"lora.alpha={self.alpha} must be >= 0 (0 = 2 * lora.r)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if self.merge and self.r == 0:
            raise ValueError("lora.merge=true only applies with LoRA: set lora.r > 0")

    @property
    def enabled(self) -> bool:
        return self.r > 0

    @property
    def targets(self) -> str | list[str]:
        names = [t.strip() for t in self.target.split(",") if t.strip()]
        return "all-linear" if names in ([], ["all-linear"]) else names

    def trainable(self, model: torch.nn.Module, ctx: MethodContext) -> torch.nn.Module:
        """The trainable-parameter seam (winnow.trainer.method): only the adapters train."""
        return apply_lora(model, self, ctx.device)


def require_peft():
    try:
        import peft
    except ModuleNotFoundError:
        raise UserError("LoRA needs the peft library: pip install 'winnow[peft]'") from None
    return peft


def apply_lora(model: torch.nn.Module, p: LoraParams, device: torch.device) -> torch.nn.Module:
    """Wrap ``model`` in LoRA adapters (only they train); bf16 base + fp32 adapters on GPU."""
    import torch

    peft = require_peft()
    if device.type == "cuda":
        model.to(torch.bfloat16)
    config = peft.LoraConfig(
        r=p.r,
        lora_alpha=p.alpha or 2 * p.r,
        lora_dropout=p.dropout,
        target_modules=p.targets,
        task_type="CAUSAL_LM",
    )
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as e:  # peft names the modules it could not find
        raise UserError(f"lora.target={p.target!r}: {e}") from None
    return trainable_in_fp32(wrapped)


def trainable_in_fp32(wrapped: torch.nn.Module) -> torch.nn.Module:
    """Cast the trainable (adapter) parameters to fp32: updates of size lr·grad vanish in bf16."""
    import torch

    for param in wrapped.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return wrapped


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def base_causal_lm(model: Any) -> Any:
    """The ``*ForCausalLM`` module whose body and head the loss uses (peft's layers live inside it)."""
    return model.get_base_model() if is_peft(model) else model


def save_adapter(model: Any, out: Path, base_dir: Path, state_dict: dict | None = None) -> None:
    """``save_pretrained`` of the adapter into ``out``, pointing at the resolved base directory;
    ``state_dict``: the gathered tensors (a checkpoint's), else the live model's."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = str(Path(base_dir).resolve())
    extra = {} if state_dict is None else {"state_dict": state_dict}
    model.save_pretrained(str(out), safe_serialization=True, **extra)


def save_merged(model: Any, out: Path) -> None:
    """The merged full model (base + adapters folded in) as a plain ``save_pretrained`` directory."""
    import copy

    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
