"""Does a searched schedule cost what the cost table predicted? Each schedule timed alone, repeated.

A search prices a schedule as the sum of its steps' measured costs; peers.py then times it once,
end to end, with the decode and prompt encoding in. When a schedule with partial steps ran slower
there than a whole-step schedule priced the same, that may be the price (partial steps costing
more inside a real schedule than in the table's profiling run, e.g. after a run of skips) or the
noise of a single timing. This script separates the two: on one compiled model it measures a
fresh cost table, then times every schedule file's sampling loop `--repeats` times (median; the
transformer calls timed one by one as well, so the sampler's own work shows apart), next to the
table's prediction, and times the decode of one batch, the fixed work no schedule removes.

    python benchmarks/schedule_latency.py --model reference-v2 --steps 30 --batch 8 --skip output \\
        benchmarks/results/search_reference-v2_30steps_h200_batch8_skip-output_*.json --out <folder>
    python benchmarks/schedule_latency.py --steps 30 --batch 8 --skip blocks --forecast \\
        benchmarks/results/reference-v2-h200/forecast_search/search_*_forecast_*x.json --out <folder>

Writes `schedule_latency.json` and `.md` in `--out`, each after every schedule (a run cut off keeps
what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from astraea.config import SKIPS, AstraeaConfig
from astraea.schedule import Schedule
from astraea.search import SparseModel, profile
from astraea.search.models import reference
from astraea.search.timing import CallTimer, wall_ms


def kind(budgets: tuple[float, ...]) -> str:
    """Dense, partial and skipped step counts, e.g. '17 D, 3 P, 10 S'."""
    dense = sum(b == 1.0 for b in budgets)
    skipped = sum(b == 0.0 for b in budgets)
    return f"{dense} D, {len(budgets) - dense - skipped} P, {skipped} S"


def write(rows: list[dict], meta: dict, out: str) -> None:
    with open(os.path.join(out, "schedule_latency.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"{meta['model']}, {meta['steps']} steps, batch {meta['batch']}, skip={meta['skip']}, "
             f"median of {meta['repeats']} generations; decode of one batch {meta['decode_ms']:.1f} ms; {meta['device']}",
             "", "| schedule | steps | predicted ms | sampling loop ms | error | transformer calls ms |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['kind']} | {r['predicted_ms']:.1f} | {r['measured_ms']:.1f} | {r['error']:+.1%} | "
              f"{r['calls_ms']:.1f} |" for r in rows]
    with open(os.path.join(out, "schedule_latency.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("schedules", nargs="*", help="schedule files searched for this model and step count")
    parser.add_argument("--model", default="reference-v2", choices=("reference", "reference-v2"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--skip", choices=SKIPS, default="output")
    parser.add_argument("--forecast", action="store_true",
                        help="price forecasting steps too, for schedules that say each step's reuse; adds a dense row "
                             "but for a last step that skips forecasting, whose dense steps keep the forecasts' slopes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    schedules = {os.path.basename(path).removesuffix(".json"): Schedule.load(path) for path in args.schedules}
    for name, schedule in schedules.items():
        if schedule.budgets is None or len(schedule.budgets) != args.steps:
            parser.error(f"{name} is not a schedule of {args.steps} steps")
    os.makedirs(args.out, exist_ok=True)
    workload = reference(args.model, num_steps=args.steps, device=args.device, batch=args.batch)
    sparse = SparseModel(workload, AstraeaConfig(skip=args.skip))
    table = profile(workload, sparse=sparse, forecast=args.forecast)
    table.save(os.path.join(args.out, "costs.json"))
    latents = workload.generate(sparse.module, 0).latent
    meta = {"model": args.model, "steps": args.steps, "batch": args.batch, "skip": args.skip, "repeats": args.repeats,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "decode_ms": wall_ms(lambda: workload.decoder(latents), workload.device),
            "step_ms": dict(zip(map(str, table.levels), table.step_ms(workload.calls_per_step)))}
    dense = (1.0,) * args.steps
    # Dense but for a last step that skips forecasting: what keeping the slopes costs the dense steps.
    slopes = ((1.0,) * (args.steps - 1) + (0.0,), ("copy",) * (args.steps - 1) + ("forecast",))
    named = {"dense": (dense, None), **({"dense, keeping slopes": slopes} if args.forecast else {}),
             **{name: (s.budgets, s.reuse) for name, s in schedules.items()}}
    rows = []
    timer = CallTimer(sparse.module, workload.device)
    with torch.compiler.set_stance("fail_on_recompile"):
        for name, (budgets, reuse) in named.items():
            if reuse is not None and not args.forecast:
                parser.error(f"{name} says each step's reuse: time it with --forecast (and --skip blocks)")
            sparse.set_schedule(budgets, workload.step_times(), reuse)
            workload.time_generation(timer, 0)  # new call graphs are captured here, untimed
            timer.take()
            walls, calls = [], []
            for _ in range(args.repeats):
                walls.append(workload.time_generation(timer, 0))
                calls.append(sum(timer.take()))
            prediction = table.prediction(budgets, statistics.median(walls), workload.calls_per_step, reuse)
            rows.append({"name": name, "kind": kind(budgets), "budgets": list(budgets), "reuse": reuse and list(reuse),
                         "predicted_ms": prediction.predicted_ms, "measured_ms": prediction.measured_ms,
                         "error": prediction.error, "walls_ms": walls, "calls_ms": statistics.median(calls)})
            print(f"{name}: {rows[-1]['kind']}, {prediction}", flush=True)
            write(rows, meta, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
