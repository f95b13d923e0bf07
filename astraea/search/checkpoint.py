"""A search's state after each scored candidate, so an interrupted search resumes where it
stopped and ends exactly where an uninterrupted one would: the last finished generation's
population, the random generator's state before the next one, and every evaluated candidate (no
schedule is generated twice; a search cut off mid-generation breeds the same children again and
finds the scored ones in the archive).

A checkpoint belongs to one problem (the search space, the settings that shape the search and
the calibration seeds); resuming it for another problem is refused, naming what differs.
Only the number of generations may grow, to extend a finished search.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .candidates import Candidate
from .ea import SearchError

FORMAT = "astraea-search-checkpoint"
VERSION = 2  # 2: candidates may carry per-step reuse modes, and the population is their keys
INITIAL = -1  # the generation of a checkpoint written while the initial population is being scored


@dataclass(frozen=True)
class Checkpoint:
    problem: dict
    generation: int  # generations completed; 0 once the initial population is scored, INITIAL while it is
    population: tuple[tuple, ...]  # the candidates' keys (budgets, reuse modes or ()), ranked best first
    rng: dict  # numpy bit generator state
    archive: tuple[Candidate, ...]

    def check(self, problem: dict, source: str) -> None:
        if self.problem != problem:
            keys = sorted(k for k in problem.keys() | self.problem.keys() if problem.get(k) != self.problem.get(k))
            details = "; ".join(f"{k}: {self.problem.get(k)!r} vs {problem.get(k)!r}" for k in keys)
            raise SearchError(
                f"{source} belongs to another search (checkpoint vs now): {details}. "
                "Delete it or pass another checkpoint path to start afresh."
            )

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "problem": self.problem,
            "generation": self.generation,
            "population": [{"budgets": list(budgets), "reuse": list(reuse)} for budgets, reuse in self.population],
            "rng": self.rng,
            "archive": [c.to_json() for c in self.archive],
        }

    def save(self, path: str | os.PathLike) -> None:
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, problem: dict) -> "Checkpoint":
        """Read a checkpoint of `problem`; a SearchError for a bad file or another problem."""
        source = f"search checkpoint {os.fspath(path)!r}"
        try:
            with open(path) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SearchError(f"{source} is corrupt: {e}") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SearchError(f"{source} is not an astraea search checkpoint (missing format {FORMAT!r})")
        if data.get("version") != VERSION:
            raise SearchError(f"{source} has version {data.get('version')!r}; this astraea reads version {VERSION}")
        checkpoint = cls(
            problem=data["problem"],
            generation=data["generation"],
            population=tuple((tuple(p["budgets"]), tuple(p["reuse"])) for p in data["population"]),
            rng=data["rng"],
            archive=tuple(Candidate.from_json(c) for c in data["archive"]),
        )
        checkpoint.check(problem, source)
        return checkpoint
