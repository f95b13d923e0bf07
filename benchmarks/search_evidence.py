"""Does the searched schedule beat simple ones at the same predicted latency, on unseen seeds?

Measures the cost table, searches a schedule for a speedup target on calibration seeds, then
scores on held-out seeds: the searched schedule, the cheapest uniform schedule predicted at
least as slow, and the cheapest "first steps dense, then uniform" schedule predicted at least
as slow (so both baselines get as much compute or more). Writes JSON, markdown, the schedule
and the search plot.

    python benchmarks/search_evidence.py --model reference --steps 20 --speedup 2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os

from astraea.search import models
from astraea.search.costs import profile
from astraea.search.evaluator import Evaluator
from astraea.search.search import SearchSettings, search
from astraea.search.sparse import SparseModel

HELD_OUT = (100, 101, 102, 103, 104, 105)
FULL_FIRST = 3


def cheapest_at_least(table, steps, contexts, prefix, target_ms):
    """(budgets, predicted ms) of prefix + one uniform level for the other steps, the cheapest
    whose predicted latency is at least `target_ms`."""
    for level in sorted(table.levels):
        budgets = list(prefix) + [level] * (steps - len(prefix))
        ms = table.predict(budgets, contexts)
        if ms >= target_ms:
            return budgets, ms
    budgets = [1.0] * steps
    return budgets, table.predict(budgets, contexts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models.add_arguments(parser)
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--generations", type=int, default=SearchSettings().generations)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    name = f"search_{args.model}_{args.steps}steps_{args.speedup:g}x"
    workload = models.from_arguments(args)
    sparse = SparseModel(workload)
    table = profile(workload, sparse=sparse)
    table.save(os.path.join(args.out, f"{name}_costs.json"))
    result = search(
        workload, table, speedup=args.speedup, sparse=sparse, settings=SearchSettings(generations=args.generations),
        output=os.path.join(args.out, f"{name}.json"), plot=os.path.join(args.out, f"{name}.png"), progress=False,
    )
    steps, contexts = workload.num_steps, workload.contexts
    searched = list(result.schedule.budgets)
    searched_ms = table.predict(searched, contexts)
    schedules = {
        "searched": (searched, searched_ms),
        "uniform": cheapest_at_least(table, steps, contexts, [1.0], searched_ms),
        f"first {FULL_FIRST} dense, then uniform": cheapest_at_least(table, steps, contexts, [1.0] * FULL_FIRST, searched_ms),
    }
    evaluator = Evaluator(workload, sparse, share_prefixes=False)
    dense_ms = table.predict([1.0] * steps, contexts)
    rows = {}
    for label, (budgets, ms) in schedules.items():
        report = evaluator(budgets, HELD_OUT)
        fid = report.decoded or report.contribution
        rows[label] = {"budgets": budgets, "predicted_ms": ms, "predicted_speedup": dense_ms / ms,
                       "psnr": fid.psnr, "ssim": fid.ssim, "rel_l2": fid.rel_l2}
    out = {"model": args.model, "steps": steps, "device": table.key.device, "target_speedup": args.speedup,
           "held_out_seeds": HELD_OUT, "view": "decoded" if workload.decoder else "contribution",
           "search_wall_s": result.wall_s, "stats": result.stats, "rows": rows}
    if result.prediction is not None:
        out["prediction"] = {"predicted_ms": result.prediction.predicted_ms, "measured_ms": result.prediction.measured_ms}
    with open(os.path.join(args.out, f"{name}_evidence.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    lines = [f"{args.model}, {steps} steps with CFG, {table.key.device}; target {args.speedup}x; "
             f"held-out seeds {HELD_OUT}; fidelity of the {out['view']} output vs dense; search took {result.wall_s:.0f} s",
             "", "| schedule | predicted speedup | PSNR dB | SSIM | budgets |", "|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['predicted_speedup']:.2f} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                     f"{' '.join(f'{b:g}' for b in r['budgets'])} |")
    with open(os.path.join(args.out, f"{name}_evidence.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
