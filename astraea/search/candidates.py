"""Evaluated schedules, how the search orders them, and which of them are worth a look.

A candidate is better when its fidelity score is higher; at equal score the faster one wins,
and the schedule itself breaks remaining ties so that ranking never depends on the order
in which candidates were found (a resumed search must rank exactly as an uninterrupted one).
A candidate's schedule is its budgets and, in a search that may forecast, each step's reuse
mode (`reuse`; None: every step as the backend's option says).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .fidelity import FidelityReport


@dataclass(frozen=True)
class Candidate:
    budgets: tuple[float, ...]
    latency_ms: float  # predicted by the cost table
    fidelity: FidelityReport
    reuse: tuple[str, ...] | None = None

    @property
    def score(self) -> float:
        return self.fidelity.score

    @property
    def key(self) -> tuple:
        """What tells schedules apart: the budgets, and the reuse modes where there are any."""
        return self.budgets, self.reuse or ()

    def to_json(self) -> dict:
        return {"budgets": list(self.budgets), "latency_ms": self.latency_ms, "fidelity": self.fidelity.to_json(),
                **({"reuse": list(self.reuse)} if self.reuse is not None else {})}

    @classmethod
    def from_json(cls, data: dict) -> "Candidate":
        reuse = data.get("reuse")
        return cls(tuple(data["budgets"]), data["latency_ms"], FidelityReport.from_json(data["fidelity"]),
                   None if reuse is None else tuple(reuse))


def ranked(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Best first."""
    return sorted(candidates, key=lambda c: (-c.score, c.latency_ms, c.key))


def pareto_front(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Candidates no other one beats on both latency and score, fastest first."""
    front, best = [], float("-inf")
    for c in sorted(candidates, key=lambda c: (c.latency_ms, -c.score)):
        if c.score > best:
            front.append(c)
            best = c.score
    return front
