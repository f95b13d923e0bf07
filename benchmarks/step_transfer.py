"""How much does a schedule searched at one step count lose at another?

Searches a schedule at `--searched` steps and one at `--run` steps, for the same speedup target
on the same cost table and calibration seeds, then scores both at `--run` steps on held-out
seeds: the first through the time axis (each step takes the budget of the searched step whose
time span holds its timestep, as the backend does), the second as searched. Also reports the
predicted speedup the moved schedule keeps at the new step count.

    python benchmarks/step_transfer.py --model reference --searched 50 --run 30 --speedup 1.5 \\
        --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import sys

from astraea.search import models
from astraea.search import sparse as backend_options
from astraea.search.costs import load_or_profile
from astraea.search.evaluator import Evaluator
from astraea.search.search import Calibration, SearchSettings, Target, search
from tables import write_results

HELD_OUT = (100, 101, 102, 103)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models.add_arguments(parser)
    backend_options.add_arguments(parser)
    parser.add_argument("--searched", type=int, default=50, help="step count the first schedule is searched at")
    parser.add_argument("--run", type=int, default=30, help="step count both schedules run at")
    parser.add_argument("--speedup", type=float, default=1.5)
    parser.add_argument("--costs", help="cost table to load, or to write when missing")
    parser.add_argument("--seeds", type=int, default=2, help="calibration seeds 0..n-1")
    parser.add_argument("--generations", type=int, default=SearchSettings().generations)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    args.steps = args.searched
    searched_workload = models.from_arguments(args)
    args.steps = args.run
    run_workload = models.from_arguments(args)
    sparse = backend_options.from_arguments(run_workload, args)  # one compile: budgets are data
    table = load_or_profile(args.costs, run_workload, sparse)
    settings = SearchSettings(generations=args.generations)
    calibration = Calibration(seeds=tuple(range(args.seeds)))
    results = {}
    for steps, workload in ((args.searched, searched_workload), (args.run, run_workload)):
        results[steps] = search(workload, table, Target(speedup=args.speedup), calibration=calibration,
                                settings=settings, sparse=sparse, measure=False)
    moved = results[args.searched].schedule
    moved_budgets = tuple(moved.budget(step, t) for step, t in enumerate(run_workload.step_times()))
    scoring = Evaluator(run_workload, sparse, share_prefixes=False)
    dense_ms = table.predict([1.0] * args.run, run_workload.calls_per_step)
    rows = {}
    for name, budgets in ((f"searched at {args.searched}, run at {args.run}", moved_budgets),
                          (f"searched at {args.run}", results[args.run].chosen.budgets)):
        report = scoring(budgets, HELD_OUT)
        view = report.decoded or report.contribution
        rows[name] = {"budgets": list(budgets), "predicted_speedup": dense_ms / table.predict(
            budgets, run_workload.calls_per_step), "psnr": view.psnr, "ssim": view.ssim}
    view = "decoded clips" if searched_workload.decoder else "the model contribution"
    write_results(os.path.join(args.out, f"step_transfer_{args.model}_{args.searched}to{args.run}"),
                  {"args": vars(args), "held_out": list(HELD_OUT), "device": table.key.device, "rows": rows,
                   "searched_schedule": list(moved.budgets)},
                  f"A schedule searched at {args.searched} steps, run at {args.run}",
                  f"`python benchmarks/step_transfer.py {' '.join(sys.argv[1:] if argv is None else argv)}` on "
                  f"{table.key.device}; held-out seeds {list(HELD_OUT)}, {view}.",
                  [f"schedule at {args.run} steps", "predicted speedup", "PSNR dB", "SSIM"],
                  [[name, f"{r['predicted_speedup']:.2f}x", f"{r['psnr']:.2f}", f"{r['ssim']:.3f}"]
                   for name, r in rows.items()])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
