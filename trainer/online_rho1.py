"""Online Rho-1: selective language modelling, the top ``k_ratio`` excess losses across the mini-batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from winnow.trainer.online_policy import OnlinePolicy

if TYPE_CHECKING:
    from winnow.trainer.online import Decision, Scored


@dataclass(kw_only=True)
class Rho1Online(OnlinePolicy):
    NAME: ClassVar[str] = "rho1"

    k_ratio: float = 0.6  # fraction of the mini-batch's supervised tokens kept (UNCONFIRMED in the paper)
    # model dir or builtin:NAME; "" = the model of the run's `reference` signals; "base" = the model under
    # its LoRA adapters (adapters switched off)
    reference: str = ""

    def __post_init__(self) -> None:
        if not 0.0 < self.k_ratio <= 1.0:
            raise ValueError(f"rho1.k_ratio={self.k_ratio} must be in (0, 1]")
        super().__post_init__()

    def needs(self) -> set[str]:
        return {"nll", "reference"}

    def decide(self, s: Scored) -> Decision:
        from winnow.stages.excess_loss_math import excess_loss_select
        from winnow.trainer.online import decision

        if s.nll_ref is None:
            raise ValueError("rho1 needs the reference model's losses")
        _, keep = excess_loss_select(s.nll, s.nll_ref, s.mask, self.k_ratio)
        return decision(keep, s)
