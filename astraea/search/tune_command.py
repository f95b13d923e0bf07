"""Search a schedule on your own diffusers pipeline.

    astraea tune my_project.pipes:make_pipe --prompts prompts.txt --speedup 2 -o schedule.json

FACTORY (`package.module:function`) is called with no arguments and returns the pipeline, or
(pipeline, dict of arguments for every call: height, width, num_frames, guidance_scale, ...).
The prompts file holds one prompt per line. Writes the schedule file (one schedule per
transformer), a plot per transformer, and beside them the cost tables and checkpoints that let
an interrupted run resume. Then:

    torch.compile(pipe.transformer, backend="astraea", options={"schedule": "schedule.json"})
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import sparse
from .search_command import add_settings, settings_from_arguments
from .tune import tune


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("factory", help="package.module:function returning the pipeline (or pipeline, call arguments)")
    parser.add_argument("--prompts", required=True, help="text file, one prompt per line")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--speedup", type=float, help="target speedup over the dense transformer time")
    target.add_argument("--latency-ms", type=float, help="target transformer milliseconds per generation")
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the pipeline's)")
    parser.add_argument("-o", "--output", default="schedule.json", help="schedule file to write (JSON)")
    parser.add_argument("--seeds", type=int, default=4, help="calibration seeds the search scores on")
    parser.add_argument("--held-out", type=int, default=2, help="seeds after those, scored for the report only")
    parser.add_argument("--no-decode", dest="decode", action="store_false",
                        help="score latents only, never decoding a generation")
    parser.add_argument("--decode-candidates", action="store_true",
                        help="decode every candidate the search scores, not only the confirmed ones and the "
                             "held-out seeds")
    parser.add_argument("--forecast", action="store_true",
                        help="let the search choose, per step, whether the tokens not recomputed copy or forecast")
    add_settings(parser)
    sparse.add_arguments(parser)


def load_factory(spec: str):
    """The function `package.module:function` names, or a SystemExit naming what is wrong."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise SystemExit(f"astraea tune: FACTORY must be package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SystemExit(f"astraea tune: cannot import {module_name!r}: {error}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise SystemExit(f"astraea tune: {module_name} has no function {name!r}")
    return factory


def read_prompts(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as error:
        raise SystemExit(f"astraea tune: cannot read the prompts: {error}") from None
    if not prompts:
        raise SystemExit(f"astraea tune: {path} holds no prompt")
    return prompts


def run(args: argparse.Namespace) -> int:
    factory = load_factory(args.factory)
    prompts = read_prompts(args.prompts)
    made = factory()
    pipe, call_kwargs = made if isinstance(made, tuple) else (made, {})
    settings = settings_from_arguments(args)
    config = sparse.config_from_arguments(args)
    result = tune(pipe, prompts, speedup=args.speedup, latency_ms=args.latency_ms, num_inference_steps=args.steps,
                  output=args.output, seeds=args.seeds, held_out=args.held_out, settings=settings, config=config,
                  decode=args.decode, decode_candidates=args.decode_candidates, forecast=args.forecast,
                  progress=not args.no_progress, **call_kwargs)
    for name, schedule in result.schedules.items():
        meta, held = schedule.meta["search"], result.held_out[name]
        print(f"{name}: {' '.join(f'{b:g}' for b in schedule.budgets)}")
        if schedule.reuse is not None:
            print(f"  reuse: {' '.join(schedule.reuse)}")
        print(f"  predicted {meta['predicted_speedup']:.2f}x the dense transformer time; measured "
              f"{meta['measured_speedup']:.2f}x ({meta['prediction_error']:+.1%} off the prediction)")
        if held is not None:
            uniform = "" if held.uniform is None else f", the best uniform schedule {held.uniform.score:.2f} dB"
            print(f"  held-out seeds {list(held.seeds)}: {held.chosen.score:.2f} dB PSNR{uniform}")
    print(f"written {result.path}", file=sys.stderr)
    return 0
