"""What forecasting adds: moving every block's cache to its forecast and back (what a partial step
that forecasts does around its call), timed against the work of a skipped step that reuses the
block caches (each block's input plus its cache) and against that skip forecasting (each block's
input plus cache plus slope times staleness, as the skip graph's forecasting form reads them in
one pass); and the slopes' upkeep on a computed call (dense, and recomputing half the tokens).

    python benchmarks/forecast_cost.py --device cuda               # 30 blocks, 32,760 tokens, width 1536, bf16
"""

from __future__ import annotations

import argparse

import torch

from astraea.runtime import forecast
from astraea.runtime.state import BlockState
from astraea.search.timing import wall_ms


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=32_760)
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    dtype, shape = getattr(torch, args.dtype), (args.batch, args.tokens, args.width)
    states = [BlockState.allocate(shape, dtype, args.device, args.batch) for _ in range(args.blocks)]
    forecast.allocate(states)
    for state in states:
        state.cache.normal_()
        state.slope.normal_()
        state.stale.fill_(2)
    x = torch.randn(shape, dtype=dtype, device=args.device)

    def skip():  # what a skipped step's blocks do: each adds its cache to its input
        h = x
        for state in states:
            h = h + state.cache
        return h

    def skip_forecasting():  # the skip graph's forecasting form, eager: one expression per block
        h = x
        for state in states:
            h = h + (state.cache + state.slope * state.stale[..., None])
        return h

    def around():
        forecast.shift(states)
        forecast.unshift(states)

    every = torch.arange(args.tokens, device=args.device).expand(args.batch, -1).contiguous()
    half = torch.randperm(args.tokens, device=args.device)[: args.tokens // 2].sort().values.expand(args.batch, -1)

    def slopes(idx):  # a computed call's upkeep of the slopes, around its merge
        def run():
            for state in states:
                forecast.add_fresh(state, idx, forecast.start_slopes(state, idx))
        return run

    # Both skips compiled, as the skip graph's two forms are lowered by Inductor: one fused pass each.
    skip_ms = wall_ms(torch.compile(skip), args.device, repeats=10)
    forecasting_ms = wall_ms(torch.compile(skip_forecasting), args.device, repeats=10)
    around_ms = wall_ms(around, args.device, repeats=10)
    dense_ms, half_ms = (wall_ms(slopes(idx), args.device, repeats=10) for idx in (every, half.contiguous()))
    gigabytes = args.blocks * states[0].cache.numel() * states[0].cache.element_size() / 1e9
    print(f"{args.blocks} blocks x {shape} {args.dtype} on {args.device} ({gigabytes:.2f} GB of caches per branch): "
          f"a skipped step's blocks {skip_ms:.2f} ms, forecasting {forecasting_ms:.2f} ms; moving the caches to the "
          f"forecast and back {around_ms:.2f} ms "
          f"({around_ms / skip_ms:.2f}x the skip); keeping the slopes on a dense call {dense_ms:.2f} ms, on a call "
          f"recomputing half the tokens {half_ms:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
