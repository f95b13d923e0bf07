"""Do a search's candidates rank the same on the latents as on the decoded clips?

`astraea.tune` scores the search's candidates on the latents (the model's contribution: final
latent minus the noise) and decodes only the few it confirms and the held-out seeds, sparing a
decode per candidate. That is only sound if the latents rank candidates as the decoded clips
would. This scores the schedules a search starts from (its initial population at a target:
uniform, front-loaded, step-caching, MagCache-shaped, repaired dense and random schedules) on
both views of the same generations, on a subject with a trained decoder, and reports the rank
correlation, where the decoded best falls in the latent ranking, and what choosing among the
latent ranking's best few (the confirmation, on decoded clips) loses against the decoded best.

    python benchmarks/proxy_views.py --model reference-v2 --steps 20 --speedup 2 \\
        --costs benchmarks/results/search_reference-v2_20steps_cpu_costs.json --skip output
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from astraea.search import models
from astraea.search import sparse as backend_options
from astraea.search.costs import load_or_profile
from astraea.search.ea import Space
from astraea.search.evaluator import Evaluator
from astraea.search.search import Calibration, SearchSettings, Target, initial_population, magnitude_ratios
from tables import write_results


def ranks(values) -> np.ndarray:
    """Ranks from 0 (the largest value), ties broken by order."""
    order = np.argsort(-np.asarray(values), kind="stable")
    out = np.empty(len(order), dtype=float)
    out[order] = np.arange(len(order))
    return out


def spearman(a, b) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models.add_arguments(parser)
    backend_options.add_arguments(parser)
    parser.add_argument("--speedup", type=float, default=2.0, help="the target the population is drawn for")
    parser.add_argument("--costs", help="cost table to load, or to write when missing")
    parser.add_argument("--size", type=int, default=24,
                        help="the population drawn (each distinct schedule in it is scored)")
    parser.add_argument("--seed", type=int, default=0, help="the generations' seed (the search's proxy seed)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    workload = models.from_arguments(args)
    if not workload.decodes:
        raise SystemExit(f"{args.model} has no decoder: there are no decoded clips to compare the latents with")
    sparse = backend_options.from_arguments(workload, args)
    table = load_or_profile(args.costs, workload, sparse)
    steps, calls = workload.num_steps, workload.calls_per_step
    dense_ms = table.predict([1.0] * steps, calls)
    levels, _, costs, _ = table.copying().choices(calls)
    space = Space(levels, costs, steps, SearchSettings().full_steps, Target(speedup=args.speedup).limit_ms(dense_ms))
    rng = np.random.default_rng(0)
    population = initial_population(space, args.size, rng, magnitude_ratios(workload, args.seed))
    genomes = list({space.budgets(g): g for g in population}.values())  # each schedule once
    evaluator = Evaluator(workload, sparse)
    rows = []
    for i, genome in enumerate(genomes):
        budgets = space.budgets(genome)
        report = evaluator(budgets, [args.seed])  # one generation: both views of it
        rows.append({"budgets": list(budgets), "speedup": dense_ms / space.latency(genome),
                     "contribution_psnr": report.contribution.psnr, "decoded_psnr": report.decoded.psnr,
                     "decoded_ssim": report.decoded.ssim})
        print(f"{i + 1}/{len(genomes)}: {rows[-1]['speedup']:.2f}x, contribution {report.contribution.psnr:.2f} dB, "
              f"decoded {report.decoded.psnr:.2f} dB", flush=True)
    latent = [r["contribution_psnr"] for r in rows]
    decoded = [r["decoded_psnr"] for r in rows]
    by_latent = ranks(latent)
    confirm = Calibration().confirm
    best = int(np.argmax(decoded))
    confirmed = [i for i in range(len(rows)) if by_latent[i] < confirm]
    summary = {"spearman": spearman(latent, decoded), "decoded_best_rank_by_latents": int(by_latent[best]) + 1,
               "confirm": confirm, "loss_db": decoded[best] - max(decoded[i] for i in confirmed)}
    print(summary)
    write_results(
        os.path.join(args.out, f"proxy_views_{args.model}_{steps}steps"),
        {"args": vars(args), "device": table.key.device, "summary": summary, "rows": rows},
        "A search's starting schedules scored on the latents and on the decoded clips",
        f"`python benchmarks/proxy_views.py {' '.join(sys.argv[1:] if argv is None else argv)}` on "
        f"{table.key.device}; {len(rows)} distinct schedules. Rank correlation (Spearman) of the two "
        f"views: {summary['spearman']:.3f}; the decoded best is number {summary['decoded_best_rank_by_latents']} "
        f"by the latents; the best of the latents' top {confirm}, on decoded clips, is "
        f"{summary['loss_db']:.2f} dB below the decoded best.",
        ["schedule", "predicted speedup", "contribution PSNR dB", "decoded PSNR dB", "decoded SSIM", "rank by latents"],
        [[" ".join(f"{b:g}" for b in r["budgets"]), f"{r['speedup']:.2f}x", f"{r['contribution_psnr']:.2f}",
          f"{r['decoded_psnr']:.2f}", f"{r['decoded_ssim']:.3f}", str(int(by_latent[i]) + 1)]
         for i, r in enumerate(rows)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
