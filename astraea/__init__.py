"""astraea: token-sparse video diffusion transformers through `torch.compile`.

    model = torch.compile(model, backend="astraea", options={"schedule": 0.5})
    astraea.compile_blocks(model, schedule=0.5)  # or each repeated block on its own: a faster start
    astraea.tune(pipe, prompts, speedup=2)  # a schedule searched on your own pipeline
"""

from .backend import Backend, attach, backend
from .blockwise import compile_blocks
from .config import AstraeaConfig, AstraeaWarning, ConfigError
from .explain import explain
from .schedule import Schedule, ScheduleError

__all__ = [
    "AstraeaConfig", "AstraeaWarning", "Backend", "ConfigError", "Schedule", "ScheduleError",
    "attach", "backend", "compile_blocks", "explain", "tune",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "tune":  # the search and its dependencies load only when it is asked for
        from .search.tune import tune

        return tune
    raise AttributeError(f"module 'astraea' has no attribute {name!r}")
