"""`winnow train` parameters: one validated dataclass, every key settable with ``--set key=value``.

Defaults are sized for the builtin tiny model on this 2-core CPU (a few hundred steps a minute); a real
model on a GPU wants a larger ``tokens_per_batch`` and a smaller ``lr``. The identity of a training run
is (model fingerprint, data digest, these parameters minus the purely cosmetic ones, ``--out``):
:data:`NOT_IN_IDENTITY` lists the keys a rerun may change without starting over.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from winnow.trainer.online_params import (
    POLICY_NAMES,
    MaskedThoughtParams,
    OnlineParams,
    QTuningOnline,
    Rho1Online,
    SSTokenOnline,
)
from winnow.trainer.prompt_tuning import PromptTuningParams

# changing these on a rerun continues the same run (they do not change what is computed)
NOT_IN_IDENTITY = ("log_every", "progress", "keep_checkpoints", "save_every", "eval_every")


@dataclass
class TrainParams:
    # what to train on and where (the CLI fills these from its flags)
    model: str = ""  # builtin:<name> or a local Hugging Face model directory
    selection: str = ""  # selection/<name>/ of the run; empty: every supervised token at weight 1
    data: str = ""  # an export parquet (input_ids, token_weight, loss_mask) instead of a run
    name: str = ""  # RUN/train/<name>/ (default: the selection's name, or "all")
    out: str = ""  # the save_pretrained directory (default RUN/train/<name>/)
    # schedule
    max_steps: int = 0  # 0: as many as `epochs` take
    epochs: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    # batches
    tokens_per_batch: int = 4096  # per micro-batch and rank (computed tokens, padding included)
    max_seq_len: int = 2048  # longer samples (after trimming) are skipped and counted
    grad_accum: int = 1
    layout: Literal["auto", "padded", "packed"] = "auto"  # auto: packed on GPU, padded rows on CPU
    # held-out split: eval_loss is over every supervised token (loss_mask) of these samples
    eval_fraction: float = 0.05
    eval_where: str = ""  # a DuckDB condition over the samples view instead of eval_fraction
    eval_every: int = 0  # 0: only at step 0 and at the end
    eval_max_samples: int = 512
    # checkpoints
    save_every: int = 50
    keep_checkpoints: int = 2
    # numerics and devices
    seed: int = 0
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: int = 1  # CPU intra-op threads (fixed so weights do not depend on OMP_NUM_THREADS)
    activation_checkpointing: bool = False
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP under torchrun
    log_every: int = 1
    progress: bool = True
    # online selection on every mini-batch with the current model (winnow.trainer.online), Masked Thought
    online: str = "none"  # none | all (mini-batches, no selection) | q_tuning | rho1 | sstoken
    q_tuning: QTuningOnline = field(default_factory=QTuningOnline)
    rho1: Rho1Online = field(default_factory=Rho1Online)
    sstoken: SSTokenOnline = field(default_factory=SSTokenOnline)
    masked_thought: MaskedThoughtParams = field(default_factory=MaskedThoughtParams)
    # with an online policy: the weights each epoch trained with, as selection/online-<name>-epoch<E> of the run
    record_weights: bool = False
    # the current model's scores from a separate no-grad forward, or from the training forward (online_reuse);
    # auto: reuse for sstoken (faster in every near-idle measurement), separate for the others (RESULTS.md)
    online_scoring: Literal["auto", "separate", "reuse"] = "auto"
    # texts whose tokens an online policy never drops where supervised, e.g. "<|im_end|>,####" (issue 15)
    always_keep: list[str] = field(default_factory=list)
    # LoRA through peft (winnow.trainer.lora): lora_r > 0 turns it on
    lora_r: int = 0
    lora_alpha: int = 0  # 0 = 2 * lora_r
    lora_dropout: float = 0.0
    lora_target: str = "all-linear"  # or a comma list of module names, e.g. q_proj,v_proj
    merge: bool = False  # with LoRA: also save the merged full model under OUT/merged
    # prompt tuning through peft (winnow.trainer.prompt_tuning): num_virtual_tokens > 0 turns it on
    prompt_tuning: PromptTuningParams = field(default_factory=PromptTuningParams)

    def __post_init__(self) -> None:
        from winnow.trainer.param_domains import check_domains

        check_domains(self)  # finite floats, lr/seed/threads/device ranges (issue 24)
        positive = ("epochs", "tokens_per_batch", "max_seq_len", "grad_accum", "threads", "log_every")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        for key in ("max_steps", "warmup_steps", "eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={self.eval_fraction} must be in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ValueError("max_grad_norm and weight_decay must be >= 0")
        if self.max_seq_len > self.tokens_per_batch:
            raise ValueError(
                f"max_seq_len={self.max_seq_len} > tokens_per_batch={self.tokens_per_batch}: a sample must fit "
                "a micro-batch; raise tokens_per_batch or lower max_seq_len"
            )
        if self.online not in POLICY_NAMES:
            raise ValueError(f"online={self.online!r}: use one of {', '.join(POLICY_NAMES)}")
        if self.online == "rho1" and self.rho1.reference == "base" and self.lora_r == 0:
            raise ValueError("rho1.reference=base means the base model under LoRA adapters: set lora_r > 0")
        if self.fsdp and self.online == "sstoken":
            raise ValueError(
                "online=sstoken with fsdp=true is not supported yet (its history copy and attention recomputation "
                "need the unsharded model): use DDP (fsdp=false)"
            )
        if self.online_scoring == "reuse" and self.masked_thought.p > 0:
            raise ValueError(
                "online_scoring=reuse scores from the training forward, whose inputs Masked Thought masks: "
                "use online_scoring=separate with masked_thought.p > 0"
            )
        if self.always_keep and self.online in ("none", "all"):
            raise ValueError(
                f"always_keep={','.join(self.always_keep)} floors an online token selection: set "
                "online=q_tuning|rho1|sstoken (an offline selection takes `winnow select ... --always-keep`)"
            )
        if self.record_weights and self.online == "none":
            raise ValueError(
                "record_weights=true records what an online policy kept: set online=q_tuning|rho1|sstoken (or all)"
            )
        if self.record_weights and self.data:
            raise ValueError(
                "record_weights=true writes selection/online-<name>-epoch<E> tables into a run: train on a RUN "
                "(--selection or all samples) instead of --data"
            )
        self.lora_params()  # validates the LoRA keys with their own messages
        self._check_prompt_tuning()
        if self.data and self.selection:
            raise ValueError("give --data (an export) or --selection (of a run), not both")

    def _check_prompt_tuning(self) -> None:
        n = self.prompt_tuning.num_virtual_tokens
        if n == 0:
            return
        key = f"prompt_tuning.num_virtual_tokens={n}"
        if self.lora_r > 0:
            raise ValueError(f"{key} with lora_r={self.lora_r}: choose one method (prompt tuning or LoRA)")
        if self.layout == "packed":
            raise ValueError(
                f"layout=packed with {key}: peft prepends the virtual tokens to every row and drops "
                "position_ids, so packed samples would share one prompt and one position range; use "
                "layout=padded (layout=auto picks it under prompt tuning)"
            )
        if self.fsdp:
            raise ValueError(f"fsdp=true with {key} is not supported: use DDP (the default)")
        if self.online != "none":
            raise ValueError(
                f"online={self.online} with {key} is not supported: the online scoring forward runs "
                "without the virtual tokens; use online=none"
            )
        if self.max_seq_len + n > self.tokens_per_batch:
            raise ValueError(
                f"max_seq_len={self.max_seq_len} + {n} virtual tokens > tokens_per_batch={self.tokens_per_batch}: "
                "every row carries the prompt; raise tokens_per_batch or lower max_seq_len"
            )

    @property
    def scoring_mode(self) -> str:
        """``online_scoring`` resolved: what the loop and the online batches run."""
        if self.online_scoring != "auto":
            return self.online_scoring
        plain = self.masked_thought.p == 0 and self.lora_r == 0
        return "reuse" if self.online == "sstoken" and plain else "separate"

    @property
    def virtual_tokens(self) -> int:
        return self.prompt_tuning.num_virtual_tokens

    def online_params(self, always_keep_ids: tuple[int, ...] = ()) -> OnlineParams:
        """The online group; ``always_keep_ids``: :attr:`always_keep` tokenized by the caller (the trainer
        holds the model's tokenizer)."""
        return OnlineParams(
            self.online, self.q_tuning, self.rho1, self.sstoken, self.masked_thought, tuple(always_keep_ids)
        )

    def lora_params(self):
        from winnow.trainer.lora import LoraParams

        return LoraParams(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_target, self.merge)

    def identity(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in NOT_IN_IDENTITY:
            d.pop(k)
        return d
