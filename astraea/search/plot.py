"""The picture of a search: what each candidate bought for its latency, and what was chosen.

Left: fidelity against predicted latency for every evaluated candidate, the Pareto front,
the chosen schedule and the best uniform schedule at the same target (what the search has to
beat). Right: the chosen budget of each step.
"""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: searches run on machines without a display
import matplotlib.pyplot as plt  # noqa: E402

from .candidates import Candidate, pareto_front  # noqa: E402


def plot_search(
    candidates: Sequence[Candidate],
    chosen: Candidate,
    uniform: Candidate | None,
    dense_ms: float,
    path: str | os.PathLike,
) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=(3, 2))
    proxy_view = _view(candidates[0]) if candidates else "none"
    left.scatter([c.latency_ms for c in candidates], [c.score for c in candidates], s=12, alpha=0.4,
                 color="tab:gray", label=f"evaluated ({len(candidates)}, proxy seeds, {proxy_view})")
    front = pareto_front(candidates)
    left.plot([c.latency_ms for c in front], [c.score for c in front], "-o", ms=4, color="tab:blue",
              label="Pareto front")
    left.scatter([chosen.latency_ms], [chosen.score], s=90, marker="*", color="tab:red", zorder=3,
                 label=f"chosen: {dense_ms / chosen.latency_ms:.2f}x, {chosen.score:.2f} dB (all seeds, "
                       f"{_view(chosen)})")
    if uniform is not None:
        left.scatter([uniform.latency_ms], [uniform.score], s=60, marker="s", color="tab:orange", zorder=3,
                     label=f"uniform {uniform.budgets[-1]:g}: {uniform.score:.2f} dB (all seeds)")
    left.set_xlabel(f"predicted latency of a generation, ms (dense {dense_ms:.1f} ms)")
    left.set_ylabel("fidelity, PSNR dB")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    steps = range(len(chosen.budgets))
    right.bar(steps, chosen.budgets, color="tab:red")
    right.set_xlabel("denoising step")
    right.set_ylabel("budget (fraction of tokens recomputed)")
    right.set_ylim(0, 1.05)
    right.set_title("chosen schedule")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _view(candidate: Candidate) -> str:
    """What a candidate was scored on: a search may score its candidates on the latents and
    confirm the best of them on decoded frames."""
    return "latents" if candidate.fidelity.decoded is None else "decoded"
