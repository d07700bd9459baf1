"""`winnow train` parameters: one validated ``kw_only`` dataclass, every key settable with ``--set key=value``.

Defaults are sized for the builtin tiny model on this 2-core CPU (a few hundred steps a minute); a real
model on a GPU wants a larger ``tokens_per_batch`` and a smaller ``lr``. The run's own settings (data,
schedule, batches, held-out split, checkpoints, numerics) are flat keys; each feature is a group of its
own (``online.*``, ``masked_thought.*``, ``lora.*``, ``prompt_tuning.*``), filled with
``--set group.key=value`` or a recipe sub-table, and a training method added later is one more group.

**Aliases.** The names from before the groups keep working (:data:`ALIASES`): ``online=q_tuning`` is
``online.policy=q_tuning``, ``q_tuning.r_sample`` is ``online.q_tuning.r_sample`` (likewise ``rho1.*``,
``sstoken.*``), ``record_weights`` / ``online_scoring`` / ``always_keep`` are ``online.record_weights`` /
``online.scoring`` / ``online.always_keep``, and ``lora_r`` / ``lora_alpha`` / ``lora_dropout`` /
``lora_target`` / ``merge`` are ``lora.r`` / ``lora.alpha`` / ``lora.dropout`` / ``lora.target`` /
``lora.merge``. One change of meaning: each online policy has its own ``batch_size`` (before, every
policy read ``q_tuning.batch_size``); all default to 8, so default runs are unchanged.

**Identity.** A training run is identified by (model fingerprint, data digest, these parameters minus the
purely cosmetic :data:`NOT_IN_IDENTITY`, ``--out``). :meth:`TrainParams.identity` keeps the flat, pre-group
form (old names; parameters added since then appear only where they change what is computed: a policy's own
``batch_size`` as ``online_batch_size`` when it differs from ``q_tuning.batch_size``, which every policy
used before), so an ``--out`` trained before the groups still resumes exactly when the run computes the
same, and the recorded ``config`` reads as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from winnow.trainer.caft import CaftParams
from winnow.trainer.greentrainer import GreenTrainerParams
from winnow.trainer.hft import HftParams
from winnow.trainer.lemo import LemoParams
from winnow.trainer.lora import LoraParams
from winnow.trainer.method import TrainingMethod
from winnow.trainer.online_params import MaskedThoughtParams, OnlineParams
from winnow.trainer.otr import OtrParams
from winnow.trainer.prompt_tuning import PromptTuningParams

# changing these on a rerun continues the same run (they do not change what is computed)
NOT_IN_IDENTITY = ("log_every", "progress", "keep_checkpoints", "save_every", "eval_every", "report_to")

# pre-group name -> its key now; a prefix alias carries its sub-keys (q_tuning.r_sample)
ALIASES = {
    "online": "online.policy",
    "q_tuning": "online.q_tuning",
    "rho1": "online.rho1",
    "sstoken": "online.sstoken",
    "record_weights": "online.record_weights",
    "online_scoring": "online.scoring",
    "always_keep": "online.always_keep",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target": "lora.target",
    "merge": "lora.merge",
    "hft": "hft.enabled",  # hft=true (a group's own name given a plain value)
}
# the per-policy mini-batch sizes: before the groups every policy read q_tuning.batch_size, so the flat
# identity keeps that one and adds `online_batch_size` only where the chosen policy's own one differs
_OWN_BATCH_SIZES = ("online.rho1.batch_size", "online.sstoken.batch_size", "online.all")
# training methods added after the identity's flat form: left out of it while at their defaults
_NEW_GROUPS = ("caft", "loss", "otr", "hft", "greentrainer", "lemo")
# the position of the grouped keys in the flat identity (the order of the fields before the groups)
_FLAT_ORDER = ("online", "q_tuning", "rho1", "sstoken", "masked_thought", "record_weights", "online_scoring",
               "always_keep", "lora_r", "lora_alpha", "lora_dropout", "lora_target", "merge", "prompt_tuning")  # fmt: skip


@dataclass(kw_only=True)
class TrainParams:
    ALIASES = ALIASES  # read by winnow.core.params.build_params

    # what to train on and where (the CLI fills these from its flags)
    model: str = ""  # builtin:<name> or a local Hugging Face model directory
    selection: str = ""  # selection/<name>/ of the run, or "all": every sample, supervised tokens at weight 1
    data: str = ""  # a `winnow export` parquet or hf folder instead of a run
    name: str = ""  # RUN/train/<name>/ (default: the selection's name, or "all")
    out: str = ""  # the save_pretrained directory (default RUN/train/<name>/)
    # schedule
    max_steps: int = 0  # > 0: exactly this many steps, epochs repeating as needed; 0: `epochs` decides
    epochs: int = 1  # passes over the training samples (max_steps > 0 overrides it)
    lr: float = 1e-4  # peak learning rate (AdamW), after warmup
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0  # linear warmup from 0 to lr over this many optimizer steps
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # 0: no clipping
    # batches
    tokens_per_batch: int = 4096  # per micro-batch and rank (computed tokens, padding included)
    max_seq_len: int = 2048  # longer samples (after trimming) are skipped and counted
    grad_accum: int = 1  # micro-batches per optimizer step
    layout: Literal["auto", "padded", "packed"] = "auto"  # auto: packed on GPU, padded rows on CPU
    # held-out split: eval_loss is over every supervised token (loss_mask) of these samples
    eval_fraction: float = 0.05  # share of samples held out (by a hash of sample_id)
    eval_where: str = ""  # a DuckDB condition over the samples view instead of eval_fraction
    eval_every: int = 0  # 0: only at step 0 and at the end
    eval_max_samples: int = 512  # at most this many held-out samples are scored
    # checkpoints
    save_every: int = 50  # a resumable checkpoint every this many steps (0: only at the end)
    keep_checkpoints: int = 2  # the newest this many checkpoints are kept
    # numerics and devices
    seed: int = 0  # shuffling, dropout and every other draw of the run
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:N or mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # GPU autocast dtype; CPU: float32
    threads: int = 1  # CPU intra-op threads (fixed so weights do not depend on OMP_NUM_THREADS)
    activation_checkpointing: bool = False  # recompute activations in backward: less memory
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP under torchrun
    log_every: int = 1  # metrics.jsonl (and the plain line of a piped stdout) every N steps
    progress: bool = True  # a progress bar when stderr is a terminal
    # a copy of metrics.jsonl to an experiment tracker (optional extra, rank 0; trainer.trackers)
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = "none"
    # features, one group each
    online: OnlineParams = field(default_factory=OnlineParams)  # per-mini-batch selection (trainer.online)
    masked_thought: MaskedThoughtParams = field(default_factory=MaskedThoughtParams)  # input noise
    # CAFT's auxiliary heads: caft.heads > 0 turns it on (trainer.caft); before lora: the heads copy a plain layer
    caft: CaftParams = field(default_factory=CaftParams)
    lora: LoraParams = field(default_factory=LoraParams)  # LoRA through peft: lora.r > 0 turns it on
    # prompt tuning through peft: prompt_tuning.num_virtual_tokens > 0 turns it on
    prompt_tuning: PromptTuningParams = field(default_factory=PromptTuningParams)
    # the per-token loss: ce (cross-entropy), otr (one-token rollout, otr.*) or dft (trainer.otr)
    loss: Literal["ce", "otr", "dft"] = "ce"
    otr: OtrParams = field(default_factory=OtrParams)
    hft: HftParams = field(default_factory=HftParams)  # half fine-tuning: hft=true (trainer.hft)
    # GreenTrainer: greentrainer.rho > 0 turns it on (trainer.greentrainer)
    greentrainer: GreenTrainerParams = field(default_factory=GreenTrainerParams)
    # LeMo contextual token sparsity: lemo.predictors=DIR (a `winnow lemo-fit` folder) turns it on (trainer.lemo);
    # after lora: it checks the adapters it finds
    lemo: LemoParams = field(default_factory=LemoParams)

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
        if self.lora.enabled and self.fsdp:
            raise ValueError("LoRA with fsdp=true is not supported yet: use DDP (the default) for adapters")
        self._check_online()
        self._check_prompt_tuning()
        self._check_methods()
        if self.data and self.selection:
            raise ValueError("give --data (an export) or --selection (of a run), not both")

    def _check_online(self) -> None:
        o, policy = self.online, self.online.policy
        if policy == "rho1" and o.rho1.reference == "base" and not self.lora.enabled:
            raise ValueError("rho1.reference=base means the base model under LoRA adapters: set lora.r > 0")
        if self.fsdp and policy == "sstoken":
            raise ValueError(
                "online=sstoken with fsdp=true is not supported yet (its history copy and attention recomputation "
                "need the unsharded model): use DDP (fsdp=false)"
            )
        if o.scoring == "reuse" and self.masked_thought.p > 0:
            raise ValueError(
                "online.scoring=reuse scores from the training forward, whose inputs Masked Thought masks: "
                "use online.scoring=separate with masked_thought.p > 0"
            )
        if o.always_keep and not o.selects:
            raise ValueError(
                f"always_keep={','.join(o.always_keep)} floors an online token selection: set "
                "online=q_tuning|rho1|sstoken (an offline selection takes `winnow select ... --always-keep`)"
            )
        if o.record_weights and policy == "none":
            raise ValueError(
                "record_weights=true records what an online policy kept: set online=q_tuning|rho1|sstoken (or all)"
            )
        if o.record_weights and self.data:
            raise ValueError(
                "record_weights=true writes selection/online-<name>-epoch<E> tables into a run: train on a RUN "
                "(--selection NAME or --selection all) instead of --data"
            )

    def _check_methods(self) -> None:
        freezers = [
            k
            for k, on in (("hft=true", self.hft.enabled), ("greentrainer.rho", self.greentrainer.enabled))
            if on
        ]
        adapters = [
            k for k, on in (("lora.r", self.lora.enabled), ("prompt_tuning", self.virtual_tokens > 0)) if on
        ]
        if freezers and adapters:
            raise ValueError(
                f"{freezers[0]} with {adapters[0]}: both choose which weights train (the adapters freeze the whole "
                "base); use one of them"
            )
        if self.lemo.enabled and self.virtual_tokens:
            raise ValueError(
                "lemo.predictors with prompt tuning is not supported: the virtual tokens shift every block"
            )
        if len(freezers) > 1:
            raise ValueError("hft=true with greentrainer.rho > 0: both choose which tensors train; use one")
        if self.greentrainer.enabled and self.fsdp:
            raise ValueError("greentrainer.rho with fsdp=true is not supported yet: use DDP (the default)")
        if self.greentrainer.enabled and self.online.policy != "none":
            raise ValueError(
                f"greentrainer.rho with online={self.online.policy} is not supported: its importance update re-reads "
                "the epoch's first batch, which an online policy draws once; use online=none"
            )
        self._check_caft()
        if self.loss != "ce" and self.online.selects and self.scoring_mode == "reuse":
            raise ValueError(
                f"loss={self.loss} with online.scoring=reuse: the reused forward computes the cross-entropy only; "
                "set online.scoring=separate"
            )

    def _check_caft(self) -> None:
        c = self.caft
        if not c.enabled:
            return
        if self.virtual_tokens or (self.online.selects and self.scoring_mode == "reuse"):
            raise ValueError(
                "caft.heads with prompt tuning or online.scoring=reuse is not supported (the heads need the "
                "body's plain hidden states); use online.scoring=separate, no prompt tuning"
            )
        if c.phase == "heads" and (self.lora.enabled or self.hft.enabled or self.greentrainer.enabled):
            raise ValueError(
                "caft.phase=heads trains the heads alone: no lora.r, hft or greentrainer (use them in caft.phase=finetune)"
            )

    def _check_prompt_tuning(self) -> None:
        n = self.prompt_tuning.num_virtual_tokens
        if n == 0:
            return
        key = f"prompt_tuning.num_virtual_tokens={n}"
        if self.lora.enabled:
            raise ValueError(f"{key} with lora.r={self.lora.r}: choose one method (prompt tuning or LoRA)")
        if self.layout == "packed":
            raise ValueError(
                f"layout=packed with {key}: peft prepends the virtual tokens to every row and drops "
                "position_ids, so packed samples would share one prompt and one position range; use "
                "layout=padded (layout=auto picks it under prompt tuning)"
            )
        if self.fsdp:
            raise ValueError(f"fsdp=true with {key} is not supported: use DDP (the default)")
        if self.online.policy != "none":
            raise ValueError(
                f"online={self.online.policy} with {key} is not supported: the online scoring forward runs "
                "without the virtual tokens; use online=none"
            )
        if self.max_seq_len + n > self.tokens_per_batch:
            raise ValueError(
                f"max_seq_len={self.max_seq_len} + {n} virtual tokens > tokens_per_batch={self.tokens_per_batch}: "
                "every row carries the prompt; raise tokens_per_batch or lower max_seq_len"
            )

    @property
    def scoring_mode(self) -> str:
        """``online.scoring`` resolved: what the loop and the online batches run."""
        if self.online.scoring != "auto":
            return self.online.scoring
        plain = self.masked_thought.p == 0 and not self.lora.enabled
        return "reuse" if self.online.policy == "sstoken" and plain else "separate"

    @property
    def virtual_tokens(self) -> int:
        return self.prompt_tuning.num_virtual_tokens

    def methods(self) -> list[TrainingMethod]:
        """The enabled training methods (winnow.trainer.method), in field order."""
        found = (getattr(self, f.name) for f in dataclasses.fields(self))
        out = [m for m in found if isinstance(m, TrainingMethod) and m.enabled]
        if self.loss != "ce":
            from winnow.trainer.otr import OtrMethod

            out.append(OtrMethod(self.loss, self.otr, self.seed))
        return out

    def online_params(self, always_keep_ids: tuple[int, ...] = ()) -> OnlineParams:
        """The online group with ``always_keep`` tokenized by the caller (the trainer holds the tokenizer)."""
        return dataclasses.replace(self.online, always_keep_ids=tuple(always_keep_ids))

    def identity(self) -> dict[str, Any]:
        """The flat, pre-group form of these parameters (module docstring), minus :data:`NOT_IN_IDENTITY`."""
        nested = dataclasses.asdict(self)
        nested["online"].pop("always_keep_ids")
        for path in _OWN_BATCH_SIZES:
            _pop_path(nested, path)
        chosen, q = self.online.chosen, self.online.q_tuning
        if chosen is not None and chosen.batch_size != q.batch_size:  # not what the same settings meant
            nested["online_batch_size"] = chosen.batch_size
        plain = dataclasses.asdict(TrainParams())
        for k in _NEW_GROUPS:
            if nested[k] == plain[k]:
                del nested[k]
        grouped = {old: _pop_path(nested, new) for old, new in ALIASES.items() if old not in _NEW_GROUPS}
        grouped["masked_thought"] = nested.pop("masked_thought")
        grouped["prompt_tuning"] = nested.pop("prompt_tuning")
        for k in ("online", "lora"):  # groups added since (their keys are in `grouped` by now)
            if nested[k]:
                grouped[k + "_new"] = nested[k]
            del nested[k]
        flat = {k: v for k, v in nested.items() if k not in NOT_IN_IDENTITY}
        return flat | {k: grouped.pop(k) for k in _FLAT_ORDER} | grouped


def _pop_path(d: dict[str, Any], path: str) -> Any:
    *parents, leaf = path.split(".")
    for k in parents:
        d = d[k]
    return d.pop(leaf)
