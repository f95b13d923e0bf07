"""Does letting the search choose copy or forecast per step find better schedules than copying alone?

On one cost table that priced forecasting steps (`profile(forecast=True)`), two searches per speedup
target with everything else equal (model, seeds, settings, one evaluator, so dense references and
scores are shared): over copying steps only (the table without its forecast column), and over both
modes per step. Skipped steps reuse the block caches, where a forecast applies. Each chosen schedule
is then scored on held-out seeds the searches never saw. Writes the schedules and a markdown table.

    python benchmarks/forecast_search.py --steps 20 --device cpu --speedups 2 3 --out <folder>
    python benchmarks/forecast_search.py --steps 30 --batch 8 --device cuda --speedups 2 3 4 --out <folder>
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from astraea.config import AstraeaConfig
from astraea.search import Calibration, Evaluator, SearchSettings, SparseModel, Target, load_or_profile, search
from astraea.search.models import reference

HELD_OUT = (100, 101, 102, 103)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference-v2", choices=("reference", "reference-v2"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1, help="clips per generation (price steps at the batch you run)")
    parser.add_argument("--speedups", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--generations", type=int, default=SearchSettings().generations)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    workload = reference(args.model, num_steps=args.steps, device=args.device, batch=args.batch)
    sparse = SparseModel(workload, AstraeaConfig(skip="blocks"))
    costs = os.path.join(args.out, "costs.json")
    table = load_or_profile(costs, workload, sparse, forecast=True)
    spaces = {"copy": table.copying(), "copy or forecast": table}
    evaluator, rows = Evaluator(workload, sparse), []
    for speedup in args.speedups:
        for name, space in spaces.items():
            start = time.perf_counter()
            result = search(workload, space, Target(speedup=speedup), calibration=Calibration(),
                            settings=SearchSettings(generations=args.generations), sparse=sparse, evaluator=evaluator,
                            measure=False, progress=False)
            result.save(os.path.join(args.out, f"{speedup:g}x_{name.replace(' ', '_')}.json"))
            chosen = result.chosen
            held = evaluator(chosen.budgets, HELD_OUT, chosen.reuse)
            forecasting = sum(m == "forecast" and b < 1.0 for b, m in zip(chosen.budgets, chosen.reuse or ()))
            rows.append({"target": speedup, "space": name, "predicted_speedup": result.schedule.meta["search"][
                "predicted_speedup"], "calibration_db": chosen.score, "held_out_db": held.score,
                "held_out_ssim": held.decoded.ssim if held.decoded else held.contribution.ssim,
                "forecasting_steps": forecasting, "budgets": list(chosen.budgets),
                "reuse": None if chosen.reuse is None else list(chosen.reuse), "seconds": time.perf_counter() - start})
            print(json.dumps(rows[-1]), flush=True)
            _write(rows, args)
    return 0


def _write(rows: list[dict], args) -> None:
    with open(os.path.join(args.out, "forecast_search.json"), "w") as f:
        json.dump({"args": vars(args), "held_out": HELD_OUT, "rows": rows}, f, indent=1)
    lines = [f"{args.model}, {args.steps} steps, batch {args.batch}, {args.generations} generations, skips reuse the "
             f"block caches; {args.device}; PSNR over held-out seeds {list(HELD_OUT)}", "",
             "| target | search space | predicted speedup | calibration dB | held-out dB | held-out SSIM | "
             "forecasting steps |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['target']:g}x | {r['space']} | {r['predicted_speedup']:.2f}x | {r['calibration_db']:.2f} | "
              f"{r['held_out_db']:.2f} | {r['held_out_ssim']:.3f} | {r['forecasting_steps']} |" for r in rows]
    with open(os.path.join(args.out, "forecast_search.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
