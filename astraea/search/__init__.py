"""Per-step budget search: a measured cost table, fidelity against the dense model, and an
evolutionary search that writes a schedule file.

    table = profile(workload)                              # once per model, shape and device
    result = search(workload, table, Target(speedup=2.0))
    result.save("schedule.json")
    model = torch.compile(model, backend="astraea", options={"schedule": "schedule.json"})
"""

from .candidates import Candidate, pareto_front
from .costs import DEFAULT_LEVELS, CostKey, CostTable, CostTableError, Prediction, load_or_profile, profile
from .ea import SearchError, Space
from .evaluator import Evaluator
from .fidelity import Fidelity, FidelityReport, fidelity
from .models import random_wan, reference
from .search import Calibration, SearchResult, SearchSettings, Target, evolve, search
from .sparse import SparseModel
from .workload import Trajectory, Workload, random_text

__all__ = [
    "Calibration", "Candidate", "CostKey", "CostTable", "CostTableError", "DEFAULT_LEVELS", "Evaluator", "Fidelity",
    "FidelityReport", "Prediction", "SearchError", "SearchResult", "SearchSettings", "Space", "SparseModel",
    "Trajectory", "Workload", "evolve", "fidelity", "load_or_profile", "pareto_front", "profile", "random_text",
    "random_wan", "reference", "search", "Target",
]
