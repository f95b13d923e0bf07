"""What forecasting adds to a call, on the caches of a real shape (default: the Wan2.1-1.3B shape
at 81 frames, one branch): a skipped step's block work copying (each block's input plus its
cache) against forecasting (plus slope times staleness, as the skip graph's forecasting form
reads them), both compiled as Inductor lowers the skip graph; what forecasting cost before it
was fused, every cache moved to its forecast and back around the call; and every block's merge
(`astraea::merge_rows`: the Triton kernel on a GPU) at a partial budget and dense, copying,
keeping the slopes, and forecasting.

    python benchmarks/forecast_cost.py --device cuda               # 30 blocks, 32,760 tokens, width 1536, bf16
"""

from __future__ import annotations

import argparse

import torch

from astraea import ops  # noqa: F401  (registers torch.ops.astraea.*)
from astraea.runtime import forecast
from astraea.runtime.state import BlockState
from astraea.search.timing import wall_ms


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=32_760)
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.5, help="the partial merge's share of recomputed tokens")
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

    def skip_forecasting():  # the skip graph's forecasting form: each adds its cache's forecast
        h = x
        for state in states:
            h = h + (state.cache + state.slope * state.stale[..., None])
        return h

    def moved():  # what the fused forms replaced: each cache moved to its forecast (one pass), then back
        for sign in (1.0, -1.0):
            for state in states:
                state.cache.addcmul_(state.slope, state.stale[..., None].to(dtype), value=sign)

    def merges(k: int, mode: str):  # every block's merge of k fresh rows
        idx = torch.randperm(args.tokens, device=args.device)[:k].sort().values.expand(args.batch, -1).contiguous()
        rows = torch.randn(args.batch, k, args.width, dtype=dtype, device=args.device)
        span = torch.full(idx.shape, 2.0, device=args.device)

        def run():
            for s in states:
                slopes = (None, None, None) if mode == "copy" else (s.slope, s.stale, span, mode == "forecast")
                torch.ops.astraea.merge_rows(x, rows, idx, s.cache, s.change, None, s.lse, *slopes)
        return run

    gigabytes = args.blocks * states[0].cache.numel() * states[0].cache.element_size() / 1e9
    print(f"{args.blocks} blocks x {shape} {args.dtype} on {args.device} ({gigabytes:.2f} GB of caches per branch)")
    # Both skips compiled, as Inductor lowers the skip graph's two forms: one fused pass each.
    copy_ms, forecast_ms = (wall_ms(torch.compile(f), args.device, repeats=10) for f in (skip, skip_forecasting))
    print(f"  a skipped step's blocks: copying {copy_ms:.2f} ms, forecasting {forecast_ms:.2f} ms; before the fusion, "
          f"the caches moved to their forecasts and back around the call: {wall_ms(moved, args.device, repeats=10):.2f} ms")
    for label, k in ((f"budget {args.budget:g}", max(1, round(args.budget * args.tokens))), ("dense", args.tokens)):
        ms = {mode: wall_ms(merges(k, mode), args.device, repeats=10) for mode in ("copy", "slopes", "forecast")}
        print(f"  the merges at {label}: copying {ms['copy']:.2f} ms, keeping the slopes {ms['slopes']:.2f} ms, "
              f"forecasting {ms['forecast']:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
