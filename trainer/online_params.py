"""The ``online.*`` group of ``winnow train`` (online selection) and Masked Thought's ``masked_thought.*``.

``--set online.policy=q_tuning --set online.q_tuning.r_sample=0.25`` (or a recipe sub-table
``[online.q_tuning]``) fills these; the pre-nesting names ``online=q_tuning``, ``q_tuning.r_sample``,
``record_weights``, ``online_scoring``, ``always_keep`` stay as aliases (:data:`winnow.trainer.config.ALIASES`).
Each policy is one object in its own module (:mod:`winnow.trainer.online_policy`); a field of an
:class:`OnlinePolicy` type here names it. Every dataclass is ``kw_only``: ``OnlineParams`` was built
positionally once, and a field added before ``always_keep_ids`` silently turned the always-keep floor off.
Kept free of torch so that ``winnow steps`` and the CLI's help import nothing heavy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from winnow.trainer.online_policy import AllOnline, OnlinePolicy
from winnow.trainer.online_q_tuning import QTuningOnline
from winnow.trainer.online_rho1 import Rho1Online
from winnow.trainer.online_sstoken import SSTokenOnline


@dataclass(kw_only=True)
class MaskedThoughtParams:
    p: float = 0.0  # top masking rate (the authors' GSM8K script: 0.4); 0 = off
    warmup: float = 0.66  # p ramps from 0 over this fraction of max_steps (the authors' mask_rate_warmup)

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"masked_thought.p={self.p} must be in [0, 1)")
        if not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"masked_thought.warmup={self.warmup} must be in [0, 1]")


@dataclass(kw_only=True)
class OnlineParams:
    """Online selection: the policy, each policy's own object, and what applies to any of them."""

    policy: str = "none"  # none | all (mini-batches, no selection) | q_tuning | rho1 | sstoken
    all: AllOnline = field(default_factory=AllOnline)
    q_tuning: QTuningOnline = field(default_factory=QTuningOnline)
    rho1: Rho1Online = field(default_factory=Rho1Online)
    sstoken: SSTokenOnline = field(default_factory=SSTokenOnline)
    # the weights each epoch trained with, as selection/online-<name>-epoch<E> of the run
    record_weights: bool = False
    # the current model's scores from a separate no-grad forward, or from the training forward (online_reuse);
    # auto: reuse for sstoken (faster in every near-idle measurement), separate for the others (RESULTS.md)
    scoring: Literal["auto", "separate", "reuse"] = "auto"
    # texts whose tokens a policy never drops where supervised, e.g. "<|im_end|>,####" (issue 15)
    always_keep: list[str] = field(default_factory=list)
    # always_keep as token ids of the model's tokenizer: filled by the trainer, which holds the tokenizer
    # (winnow.pipeline.always_keep); never a --set key
    always_keep_ids: tuple[int, ...] = field(default=(), metadata={"internal": True})

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"online={self.policy!r}: use one of {', '.join(POLICY_NAMES)}")

    @property
    def chosen(self) -> OnlinePolicy | None:
        """The policy object ``policy`` names (None for ``none``)."""
        return None if self.policy == "none" else getattr(self, self.policy)

    @property
    def selects(self) -> bool:
        """A policy that scores and selects (not ``none``, not the ``all`` control)."""
        return self.policy not in ("none", "all")


POLICY_NAMES = ("none",) + tuple(
    f.name
    for f in dataclasses.fields(OnlineParams)
    if isinstance(f.default_factory, type) and issubclass(f.default_factory, OnlinePolicy)
)

__all__ = [
    "MaskedThoughtParams",
    "OnlineParams",
    "POLICY_NAMES",
    "QTuningOnline",
    "Rho1Online",
    "SSTokenOnline",
]
