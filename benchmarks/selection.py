"""Does the token score earn its keep? Fidelity of each selection policy at equal budgets.

Prior work found random selection sometimes as good as "importance" selection, so the
paper's score (LSE x change + staleness penalty, at several penalty weights) is measured
against change-only and random selection, at uniform budgets after one dense step, on the
same seeds, against the dense model. Writes JSON and a markdown table.

    python benchmarks/selection.py --model reference --steps 20 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from astraea.config import AstraeaConfig
from astraea.search import models
from astraea.search.evaluator import Evaluator
from astraea.search.sparse import SparseModel

POLICIES = {
    "astraea w_b=0.005": dict(policy="astraea", weight_penalty=0.005),
    "astraea w_b=0.02": dict(policy="astraea", weight_penalty=0.02),
    "astraea w_b=0.1": dict(policy="astraea", weight_penalty=0.1),
    "delta": dict(policy="delta"),
    "random": dict(policy="random"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models.add_arguments(parser)
    parser.add_argument("--budgets", default="0.3,0.5", help="uniform budgets to compare at")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    workload = models.from_arguments(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    view = "decoded" if workload.decoder is not None else "contribution"
    rows = {}
    for name, options in POLICIES.items():
        torch._dynamo.reset()  # each policy compiles once; keep dynamo's per-forward limit clear
        evaluator = Evaluator(workload, SparseModel(workload, AstraeaConfig(**options)), share_prefixes=False)
        for budget in (float(b) for b in args.budgets.split(",")):
            report = evaluator([1.0] + [budget] * (workload.num_steps - 1), seeds)
            fid = report.decoded if view == "decoded" else report.contribution
            rows[f"{name} @ {budget}"] = {"policy": name, "budget": budget, "psnr": fid.psnr, "ssim": fid.ssim}
            print(f"{name:>20} budget {budget}: PSNR {fid.psnr:.2f} dB, SSIM {fid.ssim:.4f} ({view})", flush=True)
    os.makedirs(args.out, exist_ok=True)
    result = {"model": args.model, "steps": workload.num_steps, "seeds": seeds, "view": view, "rows": rows}
    with open(os.path.join(args.out, f"selection_{args.model}.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"{args.model}, {workload.num_steps} steps, CFG, seeds {seeds}, fidelity of the {view} output vs dense",
             "", "| policy | budget | PSNR dB | SSIM |", "|---|---|---|---|"]
    lines += [f"| {r['policy']} | {r['budget']} | {r['psnr']:.2f} | {r['ssim']:.4f} |" for r in rows.values()]
    with open(os.path.join(args.out, f"selection_{args.model}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
