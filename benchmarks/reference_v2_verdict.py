"""Do token-level budgets beat whole-step schedules on a trained model? The searches, on reference v2.

For each speedup target over the dense schedule, two searches on one cost table: over every
budget level, and over whole steps only (the table restricted to levels 0 and 1: each step dense
or skipped, the space step caching lives in). All of them run in this process on one compiled
model and share one evaluator, so the dense references are generated once and a schedule both
searches meet is scored once. Each search writes its schedule as it ends
(`search_reference-v2_{steps}steps_{tag}_batch{B}_skip-output_{target}x.json`, `..._whole-{target}x.json`; peers.py
names the second kind by the levels the search recorded, not by the file name) and is skipped
when its file exists, so a run cut short by a device call's limit resumes where it stopped. Then
`benchmarks/peers.py` runs every schedule found against diffusers' caches. A generation is a batch
of 8 clips (`--batch`), as peers.py generates its 8 evaluation prompts: the first verdict searched
at batch 1, where this small model leaves an H200 idle and a partial step costs more than a dense
one, and judged at batch 8, where it does not (`benchmarks/NOTES.md`).

    python benchmarks/reference_v2_verdict.py --tag h200 --speedups 1.5 2 2.5 3
    python benchmarks/peers.py --model reference-v2 --steps 30 --device cuda --tag h200

One search takes 7-8 minutes on an H200 with eight processes sharing it (one per target and
space: `--speedups 2 --spaces whole-steps`, started once the first has written the cost table).
Within a device call's time limit, pack the outputs before the limit, not after.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from astraea.config import SKIPS, AstraeaConfig
from astraea.search import Calibration, Evaluator, SearchSettings, SparseModel, Target, load_or_profile, search
from astraea.search.models import reference

SPACES = ("every-level", "whole-steps")  # the levels a search may use: all of the table's, or only 0 and 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="a reference-v2 weights file (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--speedups", type=float, nargs="+", default=[2.0, 3.0, 1.5, 2.5])
    parser.add_argument("--spaces", nargs="+", choices=SPACES, default=list(SPACES),
                        help="which of the two searches to run per target (one each lets processes share a GPU)")
    parser.add_argument("--generations", type=int, default=SearchSettings().generations)
    parser.add_argument("--batch", type=int, default=8,
                        help="clips per generation, as peers.py generates its 8 evaluation prompts in one batch: the "
                             "costs a search prices are then those of the run that judges it (at batch 1 this model "
                             "leaves an H200 idle, and a partial step costs more than a dense one)")
    parser.add_argument("--skip", choices=SKIPS, default=None,
                        help="what a skipped step reuses, in both kinds of search (default: the previous output, which "
                             "scored above the block caches on both trained reference models, see benchmarks/NOTES.md; "
                             "with --forecast, the block caches)")
    parser.add_argument("--forecast", action="store_true",
                        help="price forecasting steps too, so both searches choose copy or forecast per step (skips "
                             "then reuse the block caches, where a forecast applies; files named ..._forecast)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tag", default="h200", help="in the file names, beside the model and steps")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    args.skip = args.skip or ("blocks" if args.forecast else "output")
    workload = reference("reference-v2", num_steps=args.steps, device=args.device, path=args.weights, batch=args.batch)
    sparse = SparseModel(workload, AstraeaConfig(skip=args.skip))
    os.makedirs(args.out, exist_ok=True)
    batch = f"_batch{args.batch}" if args.batch != 1 else ""
    skip = f"_skip-{args.skip}" if args.skip != AstraeaConfig().skip else ""
    forecast = "_forecast" if args.forecast else ""
    stem = os.path.join(args.out, f"search_reference-v2_{args.steps}steps_{args.tag}{batch}{skip}{forecast}")
    table = load_or_profile(f"{stem}_costs.json", workload, sparse, forecast=args.forecast)
    # In the log too: a device call may return the log and lose the table file.
    steps_ms = table.step_ms(workload.calls_per_step)
    print("cost table, ms per step: " + ", ".join(f"{level:g}: {ms:.2f}" for level, ms in zip(table.levels, steps_ms)),
          flush=True)
    evaluator = Evaluator(workload, sparse)
    spaces = {"every-level": ("", table), "whole-steps": ("whole-", table.only((0.0, 1.0)))}  # file prefix, levels
    for speedup in args.speedups:
        for prefix, space in (spaces[name] for name in SPACES if name in args.spaces):
            path = f"{stem}_{prefix}{speedup:g}x.json"
            if os.path.exists(path):
                print(f"{path}: exists, skipped", flush=True)
                continue
            start = time.perf_counter()
            result = search(workload, space, Target(speedup=speedup), calibration=Calibration(),
                            settings=SearchSettings(generations=args.generations), sparse=sparse, evaluator=evaluator,
                            checkpoint=f"{stem}_{prefix}{speedup:g}x.checkpoint.json", progress=False)
            result.save(path)
            result.plot(path.removesuffix(".json") + ".png")
            meta = result.schedule.meta["search"]
            print(f"{path}: {meta['predicted_speedup']:.2f}x predicted, {meta['measured_speedup'] or 0:.2f}x measured, "
                  f"{result.chosen.score:.2f} dB on the calibration seeds ({time.perf_counter() - start:.0f} s); "
                  f"budgets {' '.join(f'{b:g}' for b in result.chosen.budgets)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
