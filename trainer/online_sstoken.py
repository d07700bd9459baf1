"""Online ssToken: REL against a history model plus attention to the prompt, top ``rho`` per sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from winnow.trainer.online_policy import OnlinePolicy

if TYPE_CHECKING:
    from winnow.trainer.online import Decision, Scored


@dataclass(kw_only=True)
class SSTokenOnline(OnlinePolicy):
    NAME: ClassVar[str] = "sstoken"

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
        super().__post_init__()

    def needs(self) -> set[str]:
        g = self.gamma
        return {"nll"} | ({"history"} if g > 0 else set()) | ({"attention"} if g < 1 else set())

    def history_model(self) -> tuple[str, float, bool] | None:
        return (self.history, self.ema_decay, self.cache_history) if self.gamma > 0 else None

    def decide(self, s: Scored) -> Decision:
        from winnow.stages.sstoken_math import sstoken_select
        from winnow.trainer.online import decision

        nll_his = s.nll_his if s.nll_his is not None else s.nll  # gamma == 0: REL unused
        if self.gamma > 0 and s.nll_his is None:
            raise ValueError("sstoken with gamma > 0 needs the history model's losses")
        r = sstoken_select(nll_his, s.nll, s.attn, s.mask, self.gamma, self.rho)
        return decision(r.keep, s)
