"""astraea: token-sparse video diffusion transformers through `torch.compile`.

    model = torch.compile(model, backend="astraea", options={"schedule": 0.5})
"""

from .backend import AstraeaWarning, Backend, backend
from .config import AstraeaConfig, ConfigError
from .explain import explain
from .schedule import Schedule, ScheduleError

__all__ = [
    "AstraeaConfig", "AstraeaWarning", "Backend", "ConfigError", "Schedule", "ScheduleError",
    "backend", "explain",
]
__version__ = "0.1.0"
