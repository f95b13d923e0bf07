"""Measure the compiled forward's latency at each budget on this device.

    astraea profile --model wan2.1-1.3b --frames 21 --height 60 --width 104 --dtype bfloat16 -o costs.json

writes a cost table for `astraea search --costs costs.json`. It holds for this model, input
shape, dtype, device and software versions only; `astraea search` refuses it anywhere else.
"""

from __future__ import annotations

import argparse

from . import models, sparse
from .costs import DEFAULT_LEVELS, profile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    models.add_arguments(parser)
    sparse.add_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="cost table file to write (JSON)")
    parser.add_argument("--levels", type=levels, default=DEFAULT_LEVELS,
                        help="comma-separated budgets to measure, 0 and 1 included (default: 0,0.1,...,1)")
    parser.add_argument("--steps-per-level", type=int, default=3, help="timed steps per level and generation")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations")
    parser.add_argument("--forecast", action="store_true",
                        help="also time each level's steps when they forecast the tokens they do not recompute, so that "
                             "a search may choose copy or forecast per step")


def levels(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels must be comma-separated numbers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    workload = models.from_arguments(args)
    table = profile(workload, levels=args.levels, steps_per_level=args.steps_per_level, repeats=args.repeats,
                    sparse=sparse.from_arguments(workload, args), forecast=args.forecast)
    table.save(args.output)
    print(f"cost table for model {table.key.model} on {table.key.device} ({table.key.dtype}), "
          f"ms per transformer call:")
    forecast = table.forecast_ms or (None,) * len(table.levels)
    slopes = table.slopes_ms or (None,) * len(table.levels)
    for level, ms, f, kept in zip(table.levels, table.latency_ms, forecast, slopes):
        print(f"  budget {level:4.2f}: {ms:9.3f} ms  ({ms / table.call_ms(1.0):.2f} of dense)"
              + ("" if f is None else f"; in a forecasting schedule {kept:9.3f} ms copying"
                 + ("" if level == 1.0 else f", {f:9.3f} ms forecasting")))
    print(f"  and {table.call_overhead_ms:.3f} ms per call around the calls (the sampler between them)")
    print(f"written to {args.output}")
    return 0
