"""Copy against forecast reuse at the same schedules: fidelity against dense on the same seeds.

Each schedule runs twice on one compiled model, with reuse="copy" and reuse="forecast"
(switched without recompiling); fidelity is scored on the decoded clips (the reference model)
or the model's contribution (random Wan), against the dense model, over `--seeds`.

    python benchmarks/forecast.py --model reference --steps 20 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os

from astraea.config import AstraeaConfig
from astraea.search import models
from astraea.search.evaluator import Evaluator
from astraea.search.sparse import SparseModel
from tables import write_results


def schedules(steps: int) -> dict[str, list[float]]:
    """The shapes the peers and the search use: uniform budgets after dense first steps, and
    step caching (every p-th step recomputed, the others skipped), TaylorSeer's fixed interval."""
    out = {}
    for budget in (0.5, 0.25):
        out[f"2 dense, then {budget:g}"] = [1.0, 1.0] + [budget] * (steps - 2)
    for period in (2, 3, 4):
        out[f"2 dense, then 1 step in {period} recomputed"] = [1.0, 1.0] + [
            1.0 if (s - 2) % period == period - 1 else 0.0 for s in range(2, steps)]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models.add_arguments(parser)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    workload = models.from_arguments(args)
    sparse = SparseModel(workload, AstraeaConfig())
    evaluator = Evaluator(workload, sparse, share_prefixes=False)
    seeds = tuple(range(100, 100 + args.seeds))
    rows = []
    for name, budgets in schedules(args.steps).items():
        row = {"schedule": name, "budgets": budgets}
        for reuse in ("copy", "forecast"):
            sparse.update(reuse=reuse)
            report = evaluator(budgets, seeds)
            view = report.decoded or report.contribution
            row[reuse] = {"psnr": view.psnr, "ssim": view.ssim}
        rows.append(row)
        print(f"{name}: copy {row['copy']['psnr']:.2f} dB, forecast {row['forecast']['psnr']:.2f} dB", flush=True)
    view = "decoded clips" if workload.decoder else "the model's contribution"
    command = (f"python benchmarks/forecast.py --model {args.model} --steps {args.steps} --seeds {args.seeds}"
               + (f" --weights {args.weights}" if args.weights else ""))
    write_results(os.path.join(args.out, f"forecast_{args.model}_{args.steps}steps"),
                  {"args": vars(args), "seeds": list(seeds), "rows": rows},
                  f"Copy vs forecast reuse, {args.model}, {args.steps} steps",
                  f"`{command}`; PSNR dB / SSIM of {view} against dense on seeds {list(seeds)}.",
                  ["schedule", "copy", "forecast"],
                  [[r["schedule"]] + [f"{r[k]['psnr']:.2f} / {r[k]['ssim']:.3f}" for k in ("copy", "forecast")]
                   for r in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
