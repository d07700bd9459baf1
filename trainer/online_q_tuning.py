"""Online Q-Tuning (Algorithm 1): EU-plane quadrants of the mini-batch, then Q2 token pruning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from winnow.trainer.online_policy import OnlinePolicy

if TYPE_CHECKING:
    from winnow.trainer.online import Decision, Scored


def _eu_reason(quadrant: int, kept_by: int) -> str:
    """The offline eu_plane stage's reason vocabulary (kept_q2, topup_middle, dropped_q1, ...)."""
    from winnow.stages.eu_plane_math import BY_QUADRANT, DROPPED, QUADRANT_NAMES, UNSCORED

    if quadrant == UNSCORED:
        return "no_supervised_tokens"
    head = "kept" if kept_by == BY_QUADRANT else ("dropped" if kept_by == DROPPED else "topup")
    return f"{head}_{QUADRANT_NAMES[quadrant].lower()}"


@dataclass(kw_only=True)
class QTuningOnline(OnlinePolicy):
    NAME: ClassVar[str] = "q_tuning"
    STATS: ClassVar[tuple[str, ...]] = ("kept_samples", "kept_tokens", "q1", "q2", "q3", "q4", "topup")
    MIN_BATCH: ClassVar[int] = 2

    r_sample: float = 0.25  # fraction of each mini-batch's samples kept (paper grid 0.125/0.25/0.5)
    r_token: float = 0.5  # fraction of a Q2 sample's supervised tokens kept (paper grid 0.5/0.7)
    lam: float = 0.5  # λ of Eq. 7 (paper Table 7)

    def __post_init__(self) -> None:
        for key in ("r_sample", "r_token"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ValueError(f"q_tuning.{key}={getattr(self, key)} must be in (0, 1]")
        super().__post_init__()

    def needs(self) -> set[str]:
        return {"nll", "entropy"}

    def decide(self, s: Scored) -> Decision:
        from winnow.stages.eu_plane_math import BY_QUADRANT, Q1, Q2, Q3, Q4, eu_plane_select
        from winnow.trainer.online import decision

        if s.entropy is None:
            raise ValueError("q_tuning needs the current model's entropy")
        r = eu_plane_select(s.nll, s.entropy, s.mask, self.r_sample, self.r_token, self.lam)
        quads = {
            name: int((r.quadrant == q).sum()) for name, q in (("q1", Q1), ("q2", Q2), ("q3", Q3), ("q4", Q4))
        }
        topup = int((r.keep_sample & (r.kept_by != BY_QUADRANT)).sum())
        pairs = zip(r.quadrant.tolist(), r.kept_by.tolist(), strict=True)
        why = [_eu_reason(int(q), int(b)) for q, b in pairs]
        return decision(r.token_keep, s, {**quads, "topup": topup}, why)
