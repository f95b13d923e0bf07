"""Forward time, FLOPs and memory of astraea against dense, on the shape of a released model.

Random weights (bf16) at the shape of Wan2.1-1.3B (81 frames 480x832: 32,760 video tokens, 512
text tokens, cross-attention), HunyuanVideo-13B (61 frames 544x960: 32,640 video tokens, 256
text tokens, dual- then single-stream joint attention) or CogVideoX-5B (49 frames 480x720:
17,550 video tokens, 226 text tokens, joint attention). The joint models run fewer blocks than
released by default, so that one 10-minute GPU command holds every phase; the counts run are in
the results. One run measures dense eager, dense Inductor and astraea at several budgets (one
compiled model serves all of them), the FLOP ratio of each budget next to its time ratio, peak
memory and cache bytes, and what an fp8 cache costs in fidelity. Writes the JSON after each
phase (a timeout keeps what was measured), then a markdown table and a PNG of time against
budget with the ideal line r x dense, and prints the table last.

    python benchmarks/forward.py --model wan2.1-1.3b --out benchmarks/results
    python benchmarks/forward.py --model hunyuanvideo-13b --out benchmarks/results
    python benchmarks/forward.py --model cogvideox-5b --out benchmarks/results
    python benchmarks/forward.py --model cogvideox-5b --device cpu --dtype float32 --layers 1 \\
        --frames 2 --height 8 --width 8 --warmup 0 --reps 1 --out /tmp/forward   # end-to-end check on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import (
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    HunyuanVideoTransformer3DModel,
    WanTransformer3DModel,
)

import astraea
from astraea.flops import count_flops, counting
from astraea.search.models import WAN_PRESETS


def wan_inputs(model, grid, text, rand):
    frames, height, width = grid
    return rand(1, 16, frames, height, width), dict(encoder_hidden_states=text)


def hunyuan_inputs(model, grid, text, rand):
    """As HunyuanVideoPipeline calls it: a text mask of ones in the model's dtype, the embedded
    guidance (6.0, its default) times 1000."""
    frames, height, width = grid
    extra = dict(device=model.device, dtype=model.dtype)
    return rand(1, 16, frames, height, width), dict(
        encoder_hidden_states=text, encoder_attention_mask=torch.ones(text.shape[:2], **extra),
        pooled_projections=rand(1, 768), guidance=torch.tensor([6000.0], **extra),
    )


def cogvideox_inputs(model, grid, text, rand):
    """Latents [B, F, C, H, W]; the rotary embeddings are CogVideoXPipeline's own, from a pipeline
    holding only this transformer (it takes pixel sizes)."""
    frames, height, width = grid
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=None)
    scale = pipe.vae_scale_factor_spatial
    rope = pipe._prepare_rotary_positional_embeddings(height * scale, width * scale, frames, model.device)
    return rand(1, frames, 16, height, width), dict(encoder_hidden_states=text, image_rotary_emb=rope)


@dataclass(frozen=True)
class Spec:
    """A released model's shape: how to build it, call it, and what one command can run of it."""

    title: str
    cls: type
    config: dict  # the released model's, its depth included
    depth: dict[str, str]  # config keys of the block counts -> what they count
    layers: tuple[int, ...]  # default counts: what one 10-minute GPU command holds, every phase included
    grid: tuple[int, int, int]  # latent frames, height, width at the released resolution
    text_tokens: int
    inputs: Callable  # inputs(model, grid, text, rand) -> (latent, keyword arguments besides the timestep)
    budgets: tuple[float, ...] = (1.0, 0.5, 0.25)

    @staticmethod
    def tokens(frames: int, height: int, width: int) -> int:
        return frames * (height // 2) * (width // 2)  # every model here patches 1 x 2 x 2


MODELS = {
    "wan2.1-1.3b": Spec(
        "Wan2.1-1.3B", WanTransformer3DModel,
        dict(WAN_PRESETS["wan2.1-1.3b"], patch_size=(1, 2, 2), cross_attn_norm=True),
        {"num_layers": "blocks"}, (30,), (21, 60, 104), 512, wan_inputs, budgets=(1.0, 0.75, 0.5, 0.4, 0.25),
    ),
    "hunyuanvideo-13b": Spec(
        "HunyuanVideo-13B", HunyuanVideoTransformer3DModel,
        dict(
            in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
            num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
            qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
            rope_theta=256.0, rope_axes_dim=(16, 56, 56),
        ),
        {"num_layers": "double-stream blocks", "num_single_layers": "single-stream blocks"}, (4, 8),
        (16, 68, 120), 256, hunyuan_inputs,
    ),
    "cogvideox-5b": Spec(
        "CogVideoX-5B", CogVideoXTransformer3DModel,
        dict(
            num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
            text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=True,
        ),
        {"num_layers": "blocks"}, (10,), (13, 60, 90), 226, cogvideox_inputs,
    ),
}


def depth(spec: Spec, layers: str | None) -> dict[str, int]:
    """`--layers`: block counts per kind ("4,8"), or with a decimal point a fraction of the released
    model's ("0.2"); the spec's default if not given."""
    if layers is None:
        counts = spec.layers
    elif "." in layers:
        counts = tuple(max(1, round(float(layers) * spec.config[k])) for k in spec.depth)
    else:
        counts = tuple(int(c) for c in layers.split(","))
    if len(counts) != len(spec.depth):
        raise SystemExit(f"--layers: {len(spec.depth)} counts ({', '.join(spec.depth.values())}), got {layers!r}")
    return dict(zip(spec.depth, counts))


def build(spec: Spec, layers: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Initialised on the device (a CPU initialises billions of weights slowly), then cast."""
    with device:
        model = spec.cls(**{**spec.config, **layers})
    if dtype != torch.float32:  # diffusers warns about any cast, to float32 too
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int, device: torch.device) -> list[float]:
    """Milliseconds of each of `reps` calls: CUDA events on a GPU, the wall clock elsewhere."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return times


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def flop_ratios(model, call, budgets) -> dict:
    """FLOPs of a forward at each budget over the dense forward's, counted on the eager rewrite
    so that the counter sees every op (Inductor's generated kernels bypass it); as in the timing,
    one compiled model walks through the budgets."""
    dense, _ = count_flops(call, model, 999.0)
    torch._dynamo.reset()
    be = astraea.backend(schedule=[1.0, *budgets], lowering="eager")
    counted = torch.compile(model, backend=be)
    call(counted, 1000.0)
    flops = []
    be.runners[0].graph_fn = counting(be.runners[0].graph_fn, flops)
    for i in range(len(budgets)):
        call(counted, 990.0 - i)
    torch._dynamo.reset()
    return {budget: f / dense for budget, f in zip(budgets, flops)}


def rel_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="wan2.1-1.3b")
    parser.add_argument("--layers", help="block counts per kind (4,8) or a fraction of the released model's (0.2)")
    parser.add_argument("--frames", type=int, help="latent frames (default: the released resolution's)")
    parser.add_argument("--height", type=int, help="latent height")
    parser.add_argument("--width", type=int, help="latent width")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--flops-only", action="store_true",
                        help="only count FLOPs, into the results of the same model and shape already in --out")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    spec, device = MODELS[args.model], torch.device(args.device)
    grid = tuple(given or default for given, default in zip((args.frames, args.height, args.width), spec.grid))
    layers = depth(spec, args.layers)
    torch.manual_seed(0)
    model = build(spec, layers, device, getattr(torch, args.dtype))
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, device=device, dtype=model.dtype, generator=g)

    x, kwargs = spec.inputs(model, grid, rand(1, spec.text_tokens, 4096), rand)

    def call(m, t, latent=x):
        return m(hidden_states=latent, timestep=torch.tensor([t], device=device), return_dict=False, **kwargs)[0]

    path = os.path.join(args.out, f"forward_{args.model}")
    result = {
        "model": args.model, "device": torch.cuda.get_device_name() if device.type == "cuda" else device.type,
        "torch": torch.__version__, "dtype": args.dtype, "layers": layers, "latent": list(grid),
        "tokens": spec.tokens(*grid), "text_tokens": spec.text_tokens, "budgets": {},
    }

    if args.flops_only:
        with open(path + ".json") as f:
            recorded = json.load(f)
        if any(recorded[k] != result[k] for k in ("layers", "latent", "dtype")):
            raise SystemExit(f"{path}.json is of another shape: pass the --layers, --frames, --height and "
                             "--width it ran")
        with torch.no_grad():
            for budget, ratio in flop_ratios(model, call, spec.budgets).items():
                recorded["budgets"][str(budget)]["flop_ratio"] = ratio
        report(recorded, path)
        return
    with torch.no_grad():
        reference = call(model, 999.0)
        result["dense_eager_ms"] = statistics.median(timed(lambda: call(model, 999.0), args.reps, device))
        inductor = torch.compile(model)
        t0 = time.perf_counter()
        dense_out = call(inductor, 999.0)
        sync(device)
        result["dense_inductor_compile_s"] = time.perf_counter() - t0
        reset_peak(device)
        result["dense_inductor_ms"] = statistics.median(timed(lambda: call(inductor, 999.0), args.reps, device))
        result["dense_peak_gb"] = peak_gb(device)
        result["dense_inductor_vs_eager_rel_l2"] = rel_l2(dense_out, reference)
        save(result, path)
        print(f"dense: eager {result['dense_eager_ms']:.1f}, Inductor {result['dense_inductor_ms']:.1f} ms", flush=True)

        # astraea: one compiled model, the schedule walks through every budget.
        per = args.warmup + args.reps
        schedule = [1.0] + [b for b in spec.budgets for _ in range(per)]
        be = astraea.backend(schedule=schedule)
        sparse = torch.compile(model, backend=be)
        t0 = time.perf_counter()
        first = call(sparse, 1000.0)
        sync(device)
        result["astraea_compile_s"] = time.perf_counter() - t0
        result["astraea_budget1_vs_eager_rel_l2"] = rel_l2(first, reference)
        analysis = be.reports[0]
        print(analysis, flush=True)
        result["sparse_blocks"] = f"{analysis.num_sparse_blocks} of {analysis.num_blocks}"
        result["astraea_tokens"] = analysis.num_tokens
        runner = be.runners[0]
        reset_peak(device)
        step = 1
        for budget in spec.budgets:
            times = []
            for i in range(per):
                t = 999.0 - step
                step += 1
                ms = timed(lambda: call(sparse, t), 1, device)[0]
                if i >= args.warmup:
                    times.append(ms)
            result["budgets"][str(budget)] = {"ms": statistics.median(times)}
        result["astraea_peak_gb"] = peak_gb(device)
        result["cache_gb_per_branch"] = runner.cache_bytes() / 2**30
        assert [r.budget for r in runner.records] == schedule
        save(result, path)
        print("astraea:", {b: round(r["ms"], 1) for b, r in result["budgets"].items()}, flush=True)

        for budget, ratio in flop_ratios(model, call, spec.budgets).items():
            result["budgets"][str(budget)]["flop_ratio"] = ratio
        save(result, path)

        # What an fp8 cache costs: same drifting inputs, compared with dense and with a bf16 cache.
        fidelity = {}
        for dtype in ("auto", "float8_e4m3fn"):
            be = astraea.backend(schedule=[1.0] + [0.5] * 5, cache_dtype=dtype, lowering="eager")
            m = torch.compile(model, backend=be)
            drift = torch.Generator(device=device).manual_seed(1)
            xs = x.clone()
            for s in range(6):
                xs += 0.05 * torch.randn(xs.shape, device=device, dtype=xs.dtype, generator=drift)
                out, dense = call(m, 1000.0 - s, xs), call(model, 1000.0 - s, xs)
            fidelity[dtype] = {"rel_l2_vs_dense": rel_l2(out, dense), "cache_gb": be.runners[0].cache_bytes() / 2**30}
            torch._dynamo.reset()
        result["cache_dtype_fidelity"] = fidelity
        save(result, path)

        # Last, since it compiles the model's blocks in place: the strongest dense baseline a user
        # has, diffusers' regional compile (one compiled graph per block class), where the class
        # names its repeated blocks (CogVideoX does not: there whole-graph Inductor is the baseline).
        if model._repeated_blocks:
            model.compile_repeated_blocks(fullgraph=True)
            t0 = time.perf_counter()
            call(model, 999.0)
            sync(device)
            result["dense_regional_compile_s"] = time.perf_counter() - t0
            result["dense_regional_ms"] = statistics.median(timed(lambda: call(model, 999.0), args.reps, device))

    for b, row in result["budgets"].items():
        row["ratio_to_dense_inductor"] = row["ms"] / result["dense_inductor_ms"]
        if "dense_regional_ms" in result:
            row["ratio_to_dense_regional"] = row["ms"] / result["dense_regional_ms"]
        row["target"] = 1.05 if float(b) == 1.0 else float(b) + 0.07
    report(result, path)


def save(result: dict, path: str) -> None:
    with open(path + ".json", "w") as f:
        json.dump(result, f, indent=1)


def _ms(value: float | None) -> str:
    return "not run" if value is None else f"{value:.1f} ms"


def _s(value: float | None) -> str:
    return "not run" if value is None else f"{value:.0f} s"


def gb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} GB"


def report(result: dict, path: str) -> None:
    """The JSON, the markdown table and the plot; the table printed last."""
    save(result, path)
    spec = MODELS[result["model"]]
    blocks = " + ".join(f"{n} of {spec.config[k]} {spec.depth[k]}" for k, n in result["layers"].items())
    lines = [
        f"{spec.title} shape, {blocks}, {result['tokens']} video + {result['text_tokens']} text tokens "
        f"(latent {'x'.join(map(str, result['latent']))}), {result['dtype']}, {result['device']}, "
        f"torch {result['torch']}",
        "",
        f"dense eager {result['dense_eager_ms']:.1f} ms; dense Inductor {result['dense_inductor_ms']:.1f} ms "
        f"(compile {result['dense_inductor_compile_s']:.0f} s); dense regional compile "
        f"{_ms(result.get('dense_regional_ms'))} (compile {_s(result.get('dense_regional_compile_s'))}); "
        f"astraea compile {result['astraea_compile_s']:.0f} s, "
        f"{result['sparse_blocks']} blocks sparse over {result['astraea_tokens']} tokens",
        "",
        "| budget | ms | time / dense Inductor | time / dense regional compile | target | FLOPs / dense |",
        "|---|---|---|---|---|---|",
    ]
    for b, row in result["budgets"].items():
        regional = row.get("ratio_to_dense_regional")
        lines.append(f"| {b} | {row['ms']:.1f} | {row['ratio_to_dense_inductor']:.3f} | "
                     f"{'not run' if regional is None else f'{regional:.3f}'} | {row['target']:.2f} | {row['flop_ratio']:.3f} |")
    lines += ["", f"peak memory: dense {gb(result['dense_peak_gb'])}, astraea {gb(result['astraea_peak_gb'])}; "
              f"cache {result['cache_gb_per_branch']:.2f} GB per guidance branch"]
    for dtype, row in result["cache_dtype_fidelity"].items():
        lines.append(f"cache {dtype}: {row['cache_gb']:.2f} GB, rel. L2 vs dense after 5 steps at 0.5: {row['rel_l2_vs_dense']:.4f}")
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [float(b) for b in result["budgets"]]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(budgets, [r["ms"] for r in result["budgets"].values()], "o-", label="astraea")
    ax.plot([0, 1], [0, result["dense_inductor_ms"]], "--", label="ideal: r x dense Inductor")
    ax.axhline(result["dense_inductor_ms"], color="gray", lw=0.8, label="dense Inductor")
    ax.set_title(f"{spec.title} shape, {result['tokens']} video tokens", fontsize=10)
    ax.set_xlabel("budget (fraction of tokens recomputed)")
    ax.set_ylabel("ms per forward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
