"""The base of an online policy: one ``kw_only`` object per policy, in one module of its own.

A policy object carries its parameters (``--set online.<name>.KEY=VALUE``, or the old ``<name>.KEY``),
its own mini-batch size (``batch_size``: samples per mini-batch per rank, 8 by default, the Q-Tuning
paper's per-device batch), what the trainer must score for it (:meth:`OnlinePolicy.needs`), its decision
on one scored mini-batch (:meth:`OnlinePolicy.decide`) and the names of the integer stats it reports
(``STATS``, summed over ranks into ``metrics.jsonl``). Kept free of torch at import time (``winnow steps``
and the CLI's help import it): ``decide`` imports what it computes with.

Adding a policy: a module with one subclass (``NAME``, fields, ``needs``, ``decide``; ``STATS`` when it
reports more than ``kept_samples``/``kept_tokens``), and one field of that type in
:class:`winnow.trainer.online_params.OnlineParams`: the field's name is the ``online.policy`` value
(docs/CONTRACTS.md, "Training methods").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from winnow.trainer.online import Decision, Scored

# the signals a policy can ask for (what the online batch source knows how to compute)
SIGNALS = ("nll", "entropy", "reference", "history", "attention")


@dataclass(kw_only=True)
class OnlinePolicy:
    NAME: ClassVar[str] = ""
    STATS: ClassVar[tuple[str, ...]] = ("kept_samples", "kept_tokens")
    MIN_BATCH: ClassVar[int] = 1

    batch_size: int = 8  # samples per mini-batch per rank (the Q-Tuning paper's per-device batch)

    def __post_init__(self) -> None:
        if self.batch_size < self.MIN_BATCH:
            raise ValueError(
                f"{self.NAME}.batch_size={self.batch_size} must be >= {self.MIN_BATCH}"
                + (": the EU plane needs >= 2 samples" if self.MIN_BATCH == 2 else "")
            )

    def needs(self) -> set[str]:
        """The signals (:data:`SIGNALS`) the trainer computes before :meth:`decide`."""
        return set()

    def decide(self, s: Scored) -> Decision:
        """Which samples of the mini-batch train and each token's weight (every supervised token here)."""
        from winnow.trainer.online import decision

        return decision(s.mask, s)

    def history_model(self) -> tuple[str, float, bool] | None:
        """With ``"history"`` in :meth:`needs`: ``(mode, ema_decay, cache)``, mode ``start`` (the model training
        started from, frozen; ``cache``: its losses kept per sample) or ``ema`` (updated after each step)."""
        return None


@dataclass(kw_only=True)
class AllOnline(OnlinePolicy):
    """``online.policy=all``: the same seeded mini-batches as a policy, nothing scored or dropped (their
    control in the benchmarks)."""

    NAME: ClassVar[str] = "all"
    STATS: ClassVar[tuple[str, ...]] = ()
