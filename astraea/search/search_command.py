"""Search per-step budgets for a model under a latency target.

    astraea search --model tiny --steps 20 --costs costs.json --speedup 2 -o schedule.json

measures the cost table first when `--costs` names no file, searches, confirms the best
candidates on every calibration seed, times the chosen schedule end to end, and writes the
schedule (for `torch.compile(..., options={"schedule": "schedule.json"})`) and a plot.
"""

from __future__ import annotations

import argparse
import os

from . import models, sparse
from .costs import CostTable, profile
from .search import Calibration, SearchSettings, Target, search


def add_arguments(parser: argparse.ArgumentParser) -> None:
    models.add_arguments(parser)
    sparse.add_arguments(parser)
    parser.add_argument("--costs", required=True, help="cost table (JSON); measured and written when missing")
    parser.add_argument("--forecast", action="store_true",
                        help="a table measured here also prices forecasting steps, so the search chooses copy or "
                             "forecast per step (a table loaded from --costs is searched as it was measured)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--speedup", type=float, help="target speedup over the dense schedule")
    target.add_argument("--latency-ms", type=float, help="target latency of a generation's transformer calls")
    parser.add_argument("-o", "--output", required=True, help="schedule file to write (JSON)")
    parser.add_argument("--plot", help="plot of the search to write (PNG); default: next to the schedule")
    parser.add_argument("--checkpoint", help="resume from and save to this file after every generation")
    parser.add_argument("--seeds", type=seeds, default=(0, 1, 2, 3),
                        help="comma-separated calibration seeds (default: 0,1,2,3)")
    parser.add_argument("--proxy-seeds", type=int, default=1, help="seeds every candidate is scored on")
    parser.add_argument("--confirm", type=int, default=Calibration().confirm, help="best candidates rescored on all seeds")
    parser.add_argument("--decode-candidates", action="store_true",
                        help="score every candidate on decoded clips, not only the confirmed ones (slower)")
    parser.add_argument("--levels", type=levels, default=None,
                        help="comma-separated budgets a step may take, among the cost table's (default: all of them; "
                             "0,1: whole steps only, dense or skipped); a table measured here measures only these")
    add_settings(parser)


def add_settings(parser: argparse.ArgumentParser) -> None:
    """The evolutionary search's settings, shared by `astraea search` and `astraea tune`."""
    defaults = SearchSettings()
    parser.add_argument("--full-steps", type=int, default=defaults.full_steps, help="first steps kept dense")
    parser.add_argument("--population", type=int, default=defaults.population)
    parser.add_argument("--offspring", type=int, default=defaults.offspring)
    parser.add_argument("--generations", type=int, default=defaults.generations)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the search itself")
    parser.add_argument("--minutes", type=float, default=defaults.minutes,
                        help="start no generation after this many minutes of search (a rerun resumes)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def settings_from_arguments(args: argparse.Namespace) -> SearchSettings:
    return SearchSettings(population=args.population, offspring=args.offspring, generations=args.generations,
                          seed=args.seed, full_steps=args.full_steps, minutes=args.minutes)


def levels(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels must be comma-separated numbers, got {text!r}") from None


def seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    workload = models.from_arguments(args)
    compiled = sparse.from_arguments(workload, args)
    if os.path.exists(args.costs):
        table = CostTable.load(args.costs)
    else:
        print(f"no cost table at {args.costs}: measuring one")
        table = profile(workload, sparse=compiled, forecast=args.forecast,
                        **({"levels": args.levels} if args.levels is not None else {}))
        table.save(args.costs)
    if args.levels is not None:
        table = table.only(args.levels)
    settings = settings_from_arguments(args)
    plot = args.plot or os.path.splitext(args.output)[0] + ".png"
    result = search(
        workload, table, Target(args.speedup, args.latency_ms),
        calibration=Calibration(args.seeds, args.proxy_seeds, args.confirm, args.decode_candidates),
        settings=settings,
        sparse=compiled, checkpoint=args.checkpoint, progress=not args.no_progress,
    )
    result.save(args.output)
    result.plot(plot)
    meta = result.schedule.meta["search"]
    print(f"schedule: {' '.join(f'{b:g}' for b in result.chosen.budgets)}")
    if result.chosen.reuse is not None:
        print(f"reuse:    {' '.join(result.chosen.reuse)}")
    print(f"predicted {meta['predicted_ms']:.2f} ms, {meta['predicted_speedup']:.2f}x the dense schedule "
          f"(target {meta['target']['limit_ms']:.2f} ms)")
    if result.prediction is not None:
        print(f"end to end: {result.prediction}; dense {result.dense}; "
              f"measured speedup {meta['measured_speedup']:.2f}x")
    print(f"fidelity on {len(args.seeds)} seeds: {result.chosen.score:.2f} dB PSNR "
          f"(SSIM {(result.chosen.fidelity.decoded or result.chosen.fidelity.contribution).ssim:.3f})")
    if result.uniform is not None:
        print(f"uniform budget {result.uniform.budgets[-1]:g} at the same target: {result.uniform.score:.2f} dB")
    print(f"{meta['evaluated']} candidates, {meta['generations_run']} sparse generations, "
          f"{meta['shared_fraction']:.0%} of their steps spared by shared prefixes "
          f"({meta['shareable_fraction']:.0%} shareable with the backend's state saved), {result.wall_s:.1f} s")
    print(f"written {args.output} and {plot}")
    return 0
