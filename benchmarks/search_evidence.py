"""Does the searched schedule beat simple ones at the same predicted latency, on unseen seeds?

Measures the cost table (or loads one), searches a schedule for each speedup target on
calibration seeds, then scores on held-out seeds: the searched schedule, the cheapest uniform schedule predicted at
least as slow, and the cheapest "first steps dense, then uniform" schedule predicted at least
as slow (so both baselines get as much compute or more). Writes JSON, markdown, the schedule
and the search plot.

    python benchmarks/search_evidence.py --model reference --steps 20 --speedup 2 --out benchmarks/results
    python benchmarks/search_evidence.py --model reference --device cuda --tag h200 --speedup 2   # beside it
    python benchmarks/search_evidence.py --model wan2.1-1.3b --frames 5 --height 60 --width 104 \\
        --dtype bfloat16 --device cuda --speedup 2 2.5 --generations 5 --held-out 4   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os

from astraea.search import models
from astraea.search.costs import CostKey, CostTable, profile
from astraea.search.evaluator import Evaluator
from astraea.search.search import Calibration, SearchSettings, Target, search
from astraea.search import sparse as backend_options

HELD_OUT = (100, 101, 102, 103, 104, 105)
FULL_FIRST = 3


def cheapest_at_least(table, steps, calls_per_step, prefix, target_ms):
    """(budgets, predicted ms) of prefix + one uniform level for the other steps, the cheapest
    whose predicted latency is at least `target_ms`."""
    for level in sorted(table.levels):
        budgets = list(prefix) + [level] * (steps - len(prefix))
        ms = table.predict(budgets, calls_per_step)
        if ms >= target_ms:
            return budgets, ms
    budgets = [1.0] * steps
    return budgets, table.predict(budgets, calls_per_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models.add_arguments(parser)
    backend_options.add_arguments(parser)
    parser.add_argument("--speedup", type=float, nargs="+", default=[2.0], help="one search per target")
    parser.add_argument("--costs", help="a cost table measured earlier for this setting (default: measure one)")
    defaults = SearchSettings()
    parser.add_argument("--population", type=int, default=defaults.population)
    parser.add_argument("--offspring", type=int, default=defaults.offspring)
    parser.add_argument("--generations", type=int, default=defaults.generations)
    parser.add_argument("--held-out", type=int, default=len(HELD_OUT), help=f"how many of the seeds {HELD_OUT}")
    parser.add_argument("--proxy-seeds", type=int, default=1, help="calibration seeds every candidate is scored on")
    parser.add_argument("--tag", default="", help="added to the output names (e.g. the device, to keep a CPU "
                        "search of the same model beside a GPU one)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"search_{args.model}_{args.steps}steps" + (f"_{args.tag}" if args.tag else ""))
    workload = models.from_arguments(args)
    sparse = backend_options.from_arguments(workload, args)  # one compilation for the profile and every search
    if args.costs:
        table = CostTable.load(args.costs, expect=CostKey.here(sparse, workload))
    else:
        table = profile(workload, sparse=sparse)
        table.save(f"{stem}_costs.json")
    settings = SearchSettings(population=args.population, offspring=args.offspring, generations=args.generations)
    held_out = HELD_OUT[: args.held_out]
    # Each keeps its dense references and scores across the targets.
    searching, scoring = Evaluator(workload, sparse), Evaluator(workload, sparse, share_prefixes=False)
    for speedup in args.speedup:
        name = f"{stem}_{speedup:g}x"
        result = search(workload, table, Target(speedup=speedup), calibration=Calibration(proxy_seeds=args.proxy_seeds),
                        sparse=sparse, evaluator=searching, settings=settings, progress=False)
        result.save(f"{name}.json")
        result.plot(f"{name}.png")
        evidence(args, workload, table, result, scoring, held_out, speedup, name)


def evidence(args, workload, table, result, evaluator, held_out, speedup, name) -> None:
    """Score the searched schedule and both baselines on the held-out seeds; write JSON and markdown."""
    steps, calls_per_step = workload.num_steps, workload.calls_per_step
    searched = list(result.schedule.budgets)
    searched_ms = table.predict(searched, calls_per_step)
    schedules = {
        "searched": (searched, searched_ms),
        "uniform": cheapest_at_least(table, steps, calls_per_step, [1.0], searched_ms),
        f"first {FULL_FIRST} dense, then uniform": cheapest_at_least(table, steps, calls_per_step, [1.0] * FULL_FIRST, searched_ms),
    }
    dense_ms = table.predict([1.0] * steps, calls_per_step)
    rows = {}
    for label, (budgets, ms) in schedules.items():
        report = evaluator(budgets, held_out)
        fid = report.decoded or report.contribution
        rows[label] = {"budgets": budgets, "predicted_ms": ms, "predicted_speedup": dense_ms / ms,
                       "psnr": fid.psnr, "ssim": fid.ssim, "rel_l2": fid.rel_l2}
    out = {"model": args.model, "steps": steps, "device": table.key.device, "target_speedup": speedup,
           "shapes": workload.shapes(), "dtype": args.dtype, "held_out_seeds": held_out,
           "view": "decoded" if workload.decoder else "contribution",
           "search_wall_s": result.wall_s, "stats": result.stats, "rows": rows}
    if result.prediction is not None:
        out["prediction"] = {"predicted_ms": result.prediction.predicted_ms, "measured_ms": result.prediction.measured_ms,
                             "dense_predicted_ms": result.dense.predicted_ms, "dense_measured_ms": result.dense.measured_ms}
    with open(f"{name}_evidence.json", "w") as f:
        json.dump(out, f, indent=1, default=str)
    lines = [f"{args.model}, {steps} steps with CFG, {table.key.device}; target {speedup}x; "
             f"held-out seeds {held_out}; fidelity of the {out['view']} output vs dense; search took {result.wall_s:.0f} s",
             "", "| schedule | predicted speedup | PSNR dB | SSIM | budgets |", "|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['predicted_speedup']:.2f} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                     f"{' '.join(f'{b:g}' for b in r['budgets'])} |")
    if result.prediction is not None:
        lines += ["", f"end to end: searched {result.prediction}; dense {result.dense}"]
    with open(f"{name}_evidence.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
