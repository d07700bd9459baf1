"""Parameters of online selection and Masked Thought, namespaced under ``winnow train``.

``--set online=q_tuning --set q_tuning.r_sample=0.25`` (or a recipe sub-table ``[q_tuning]``) fills
these; defaults follow the offline stages and the papers (ALGORITHMS.md). Kept free of torch so that
``winnow steps`` and the CLI's help import nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

POLICY_NAMES = ("none", "all", "q_tuning", "rho1", "sstoken")  # all: mini-batch mode, no selection


@dataclass
class QTuningOnline:
    r_sample: float = 0.25  # fraction of each mini-batch's samples kept (paper grid 0.125/0.25/0.5)
    r_token: float = 0.5  # fraction of a Q2 sample's supervised tokens kept (paper grid 0.5/0.7)
    lam: float = 0.5  # λ of Eq. 7 (paper Table 7)
    batch_size: int = 8  # samples per mini-batch per rank: the paper's per-device batch

    def __post_init__(self) -> None:
        for key in ("r_sample", "r_token"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ValueError(f"q_tuning.{key}={getattr(self, key)} must be in (0, 1]")
        if self.batch_size < 2:
            raise ValueError(f"q_tuning.batch_size={self.batch_size}: the EU plane needs >= 2 samples")


@dataclass
class Rho1Online:
    k_ratio: float = 0.6  # fraction of the mini-batch's supervised tokens kept (UNCONFIRMED in the paper)
    reference: str = ""  # model dir or builtin:NAME; "" = the model of the run's `reference` signals

    def __post_init__(self) -> None:
        if not 0.0 < self.k_ratio <= 1.0:
            raise ValueError(f"rho1.k_ratio={self.k_ratio} must be in (0, 1]")


@dataclass
class SSTokenOnline:
    gamma: float = 0.5  # weight of the normalised REL; 1 - gamma weighs attention (paper default)
    rho: float = 0.6  # fraction of each sample's supervised tokens kept (paper: 0.6 at 3B/8B)
    history: Literal["start", "ema"] = "start"  # the released code's fixed base model, or Eq. 4's EMA
    ema_decay: float = 0.99  # α of Eq. 4 (UNCONFIRMED: the paper gives no value)
    # history=start: each sample's history losses computed once, read back in later epochs
    # (winnow.trainer.online_history_cache; 4 bytes per supervised token, saved with checkpoints)
    cache_history: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"sstoken.gamma={self.gamma} must be in [0, 1]")
        if not 0.0 < self.rho <= 1.0:
            raise ValueError(f"sstoken.rho={self.rho} must be in (0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"sstoken.ema_decay={self.ema_decay} must be in [0, 1)")


@dataclass
class MaskedThoughtParams:
    p: float = 0.0  # top masking rate (the authors' GSM8K script: 0.4); 0 = off
    warmup: float = 0.66  # p ramps from 0 over this fraction of max_steps (the authors' mask_rate_warmup)

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"masked_thought.p={self.p} must be in [0, 1)")
        if not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"masked_thought.warmup={self.warmup} must be in [0, 1]")


@dataclass
class OnlineParams:
    """The ``online`` group of ``winnow train``: the policy and every policy's namespace."""

    online: str = "none"
    q_tuning: QTuningOnline = field(default_factory=QTuningOnline)
    rho1: Rho1Online = field(default_factory=Rho1Online)
    sstoken: SSTokenOnline = field(default_factory=SSTokenOnline)
    masked_thought: MaskedThoughtParams = field(default_factory=MaskedThoughtParams)
    # token ids every policy's decision keeps where supervised (TrainParams.always_keep, tokenized by the
    # trainer with the model's tokenizer: winnow.core.always_keep)
    always_keep_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.online not in POLICY_NAMES:
            raise ValueError(f"online={self.online!r}: use one of {', '.join(POLICY_NAMES)}")
