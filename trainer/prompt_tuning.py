"""Prompt tuning through ``peft`` (``PromptTuningConfig``): learned virtual tokens before every row.

Several papers in the field compare against prompt tuning, so ``--set prompt_tuning.num_virtual_tokens=N``
(N > 0 turns it on, as ``lora_r > 0`` does for LoRA; one switch per method, so no key can name a method
whose size is 0) trains ``N`` virtual token embeddings and nothing else. The library does the work
(``peft.get_peft_model`` builds the prompt encoder, ``PeftModel.get_prompt`` gives its output); this
module keeps winnow's loss exact around it:

* **Padded layout only.** peft prepends the ``N`` virtual tokens to each *row* and drops
  ``position_ids``, so in a packed row only the first sample would see the prompt and no sample could
  restart its positions. Prompt tuning therefore runs on the padded layout (one sample per row, right
  padding), ``layout=auto`` picks it on GPU too, and ``layout=packed`` is refused. With right padding
  and causal attention no real position ever attends to a pad, so no attention mask is needed: the
  tests compare against peft's own forward *with* the mask and agree to float32 rounding.
* **Virtual tokens carry no loss.** The body runs on ``[prompt; embed(input_ids)]`` (peft's order); the
  gather index of the padded layout, ``r·W + c``, moves to ``r·(N+W) + N + c``, so the LM head still
  sees only the states that predict weighted targets (:func:`shift_gather`).
* **Token budget.** Each row costs ``N`` more positions: the batch plan counts ``length + N`` per sample
  and ``max_seq_len + N`` must fit ``tokens_per_batch``.
* **Not combined** with LoRA, FSDP2 (DDP works: only the prompt embedding is trainable), online
  policies (their scoring forward would run without the prompt) or ``merge`` (there is nothing to fold
  into the weights).
* **Init.** ``sample_vocab`` (default) copies ``N`` random rows of the model's own embedding matrix,
  the scale the body expects; peft's ``random`` draws N(0, 1) entries, far larger than a trained
  embedding's (Lester et al. 2021 found sampled-vocabulary init better than random); ``text`` repeats the
  tokens of ``init_text`` (tokenized by the base model's tokenizer).
* The adapter is saved as for LoRA (``save_pretrained`` with ``base_model_name_or_path`` set to the
  resolved base directory), so ``AutoPeftModelForCausalLM.from_pretrained(out)`` loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from winnow.trainer.method import MethodContext, TrainingMethod

if TYPE_CHECKING:
    import torch

INITS = ("sample_vocab", "random", "text")


@dataclass(kw_only=True)
class PromptTuningParams(TrainingMethod):
    num_virtual_tokens: int = 0  # learned tokens prepended to every row; 0 = off
    init: Literal["sample_vocab", "random", "text"] = "sample_vocab"  # how the virtual tokens start
    init_text: str = ""  # with init=text: the text whose tokens start the prompt

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 0:
            raise ValueError(
                f"prompt_tuning.num_virtual_tokens={self.num_virtual_tokens} must be >= 0 (0 = off)"
            )
        if self.init not in INITS:
            raise ValueError(f"prompt_tuning.init={self.init!r}: use one of {', '.join(INITS)}")
        if (self.init == "text") != bool(self.init_text):
            raise ValueError(
                "prompt_tuning.init=text needs prompt_tuning.init_text (and init_text needs init=text)"
            )

    @property
    def enabled(self) -> bool:
        return self.num_virtual_tokens > 0

    def trainable(self, model: torch.nn.Module, ctx: MethodContext) -> torch.nn.Module:
        """The trainable-parameter seam (winnow.trainer.method): only the virtual tokens train."""
        return apply_prompt_tuning(model, self, ctx.device, ctx.model_dir)


def apply_prompt_tuning(
    model: torch.nn.Module, p: PromptTuningParams, device: torch.device, tokenizer_dir: Path
) -> torch.nn.Module:
    """Wrap ``model`` with a trainable prompt of ``p.num_virtual_tokens`` embeddings (fp32; the frozen
    base in bf16 on GPU, as for LoRA)."""
    import torch

    from winnow.trainer.lora import require_peft, trainable_in_fp32

    peft = require_peft()
    if device.type == "cuda":
        model.to(torch.bfloat16)
    config = peft.PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=p.num_virtual_tokens,
        prompt_tuning_init=p.init.upper(),
        prompt_tuning_init_text=p.init_text or None,
        tokenizer_name_or_path=str(Path(tokenizer_dir).resolve()) if p.init == "text" else None,
    )
    return trainable_in_fp32(peft.get_peft_model(model, config))


def virtual_tokens(model: Any) -> int:
    """How many virtual tokens ``model`` prepends to a row: 0 unless it is a prompt-tuning ``PeftModel``."""
    cfg = getattr(model, "active_peft_config", None) if hasattr(model, "get_prompt") else None
    if cfg is None or not getattr(cfg, "is_prompt_learning", False):
        return 0
    if str(getattr(cfg.peft_type, "value", cfg.peft_type)) != "PROMPT_TUNING":
        raise ValueError(f"peft method {cfg.peft_type} is not supported by the trainer (prompt tuning is)")
    return int(cfg.num_virtual_tokens)


def prompted_embeds(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """``[prompt; embed(input_ids)]`` of shape (R, N+W, D): what peft's forward feeds the body."""
    import torch

    emb = model.word_embeddings(input_ids)
    prompts = model.get_prompt(batch_size=input_ids.shape[0]).to(emb.dtype)
    return torch.cat((prompts, emb), dim=1)


def shift_gather(gather: torch.Tensor, width: int, n_virtual: int) -> torch.Tensor:
    """Flat padded-layout positions ``r·W + c`` -> ``r·(N+W) + N + c`` (the same states after the prompt)."""
    return gather + n_virtual * (gather // width + 1)
