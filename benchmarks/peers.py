"""astraea against diffusers' own caches: speed, fidelity and memory in one run.

Same inputs, seeds, sampler and steps for every method: dense eager (and on a GPU dense
Inductor, whole and replayed as CUDA graphs, and diffusers' regional compile,
`compile_repeated_blocks()`); diffusers' `enable_cache` with FirstBlockCache,
PyramidAttentionBroadcast, FasterCache, TaylorSeerCache and MagCache at two or more settings
each (MagCache calibrated first, as its documentation says: one run with `calibrate=True`, whose
ratios the other runs use), each eager and (on a GPU, or with `--regional`) on a transformer
compiled with `compile_repeated_blocks()`, with the graphs and graph breaks that met; astraea
at uniform budgets, with the searched schedules (one per speedup target found in
benchmarks/results; each also with its skipped steps forecasting from the block caches), and
with parts of its token score switched off (random tokens, change without the LSE factor, no
staleness penalty). astraea compiles once: the methods differ in
options it reads per call (`Backend.update`).

Two subjects:
- `--model reference` (default) or `reference-v2`: a shipped trained model; clips for
  `--prompts` prompts, fidelity of the clips against the dense clips, and semantic accuracy.
- `--model wan2.1-1.3b` (or `tiny`): random weights on the search's sampler, on held-out seeds.
  The initial noise dominates a random model's final latent and flatters every method, so
  fidelity is of what the model contributed (final latent minus noise), the latent's beside it.

Timing: on a GPU each method runs once after the warm-up (`--repeats` for more), speedups are
over dense Inductor and dense eager, and peak memory is recorded; on a CPU, whose speed drifts
over minutes, each speedup is over a dense generation timed right after the method. Each
generation's transformer calls are also timed one by one (CUDA events on a GPU) and summed: the
part a method changes, without the prompt encoding and decoding every method pays alike, which
on the small reference models move the end-to-end time by more than the methods differ; on a
GPU the table gives that speedup over the fastest dense compiled model's calls too. Writes JSON, a
markdown table and a plot of fidelity against speedup with each side's Pareto front.

Two views on a GPU. The user's: speedup over the fastest dense compiled model (whole, replayed
as CUDA graphs as astraea's calls are, or regionally compiled), fidelity against dense eager. Each method on its own
footing: speedup and fidelity against the dense run of its own lowering (astraea at budget 1.0
for astraea, dense eager for diffusers' caches run eagerly, dense regional compile for those
compiled so). On the random Wan shape a
compiled dense model is itself about 47 dB from eager in bfloat16, so the first view's
fidelity mixes a method's error with the compiler's rounding; the second separates them, and
keeps CUDA graphs out of astraea's speedup.

    python benchmarks/peers.py                                  # reference model, CPU
    python benchmarks/peers.py --model wan2.1-1.3b --frames 5 --height 60 --width 104 \\
        --dtype bfloat16 --device cuda --seeds 2                 # Wan2.1-1.3B shape, 17 frames 480p
    python benchmarks/peers.py --device cuda --tag h200         # reference model, GPU

A run longer than one sitting can be split: `--only REGEX` measures the dense baselines and only
the methods whose names match, and adds their rows to the results file already at the output
path (rows it measured again are replaced). Every row keeps the speedups of the run that measured
it, each against that run's own dense baselines; the table names the rows of an earlier run.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import gc
import glob
import json
import logging
import os
import re
import statistics
import time

import torch
from torch._dynamo.utils import counters
from diffusers import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

import astraea
from astraea.config import SKIPS, AstraeaConfig
from astraea.reference.subjects import SUBJECTS, load_subject
from astraea.schedule import Schedule
from astraea.search import models
from astraea.search.fidelity import compare, fidelity
from astraea.search.timing import CallTimer

SEARCHED = "benchmarks/results/search_{model}_{steps}steps_*x.json"  # one per speedup target and device kind
DENSE_ASTRAEA = "astraea 1.0 (dense)"
HELD_OUT = (100, 101, 102, 103, 104, 105)  # seeds the searches never saw
WHOLE_STEPS = ", whole steps only"  # in the name of a searched schedule's row: searched over levels 0 and 1
REGIONAL = " + regional compile"  # ends the name of a cache's row on a regionally compiled transformer
# Dense compiled baselines by row name, and their keys in the results' baseline seconds.
COMPILED_DENSE = {"dense Inductor": "inductor", "dense Inductor, CUDA graphs": "inductor_graphs",
                  "dense regional compile": "regional"}


class ReferenceClips:
    """A trained reference model (v1 or v2) on fixed evaluation prompts, one batch; scored on decoded clips."""

    columns = (("PSNR dB", "psnr", ".2f"), ("SSIM", "ssim", ".3f"), ("semantic accuracy", "accuracy", ".3f"))

    def __init__(self, args):
        self.subject = load_subject(args.model, args.device, path=args.weights)
        self.model, self.prompts = self.subject.transformer, self.subject.prompts(args.prompts)
        self.steps = args.steps
        self.guidance = self.subject.guidance if args.guidance is None else args.guidance
        self.setting = (f"{args.model} model, {args.prompts} prompts, {self.steps} steps, guidance {self.guidance}; "
                        "fidelity of the clips against the dense clips")

    def run(self, model):
        return self.subject.generate(model, self.prompts, self.steps, self.guidance, batch_size=len(self.prompts))

    def metrics(self, clips, dense) -> dict:
        fid = compare(clips, dense)
        return {"psnr": fid.psnr, "ssim": fid.ssim, **self.subject.score(clips, self.prompts)}


class RandomWan:
    """A random Wan transformer on the search's sampler; scored on the model's contribution."""

    columns = (("PSNR dB (contribution)", "psnr", ".2f"), ("SSIM (contribution)", "ssim", ".3f"),
               ("rel. L2 (contribution)", "rel_l2", ".4f"), ("PSNR dB (latent)", "latent_psnr", ".2f"))

    def __init__(self, args):
        self.workload = models.from_arguments(args)
        self.model, self.seeds = self.workload.model, HELD_OUT[: args.seeds]
        tokens = args.frames * (args.height // 2) * (args.width // 2)
        self.setting = (f"{args.model}, random weights, latent {args.frames}x{args.height}x{args.width} ({tokens} tokens), "
                        f"{args.dtype}, {args.steps} steps, " + (f"batch {args.batch}, " if args.batch != 1 else "")
                        + f"guidance {self.workload.guidance}, shift "
                        f"{self.workload.shift}, seeds {self.seeds}; fidelity of the model's contribution (final "
                        "latent minus noise) against dense, the latent's beside it")

    def run(self, model):
        return [self.workload.generate(model, seed) for seed in self.seeds]

    def metrics(self, runs, dense) -> dict:
        report = fidelity(runs, dense)
        c = report.contribution
        return {"psnr": c.psnr, "ssim": c.ssim, "rel_l2": c.rel_l2,
                "latent_psnr": report.latent.psnr, "latent_ssim": report.latent.ssim}


class TimestepSpy:
    """The transformer, noting each call's timestep for PAB's `current_timestep_callback`
    (a pipeline would answer it from its own loop)."""

    def __init__(self, model, now: dict):
        self.model, self.now, self.cache_context = model, now, model.cache_context

    def __call__(self, **kwargs):
        self.now["t"] = float(kwargs["timestep"][0])
        return self.model(**kwargs)

    def _reset_stateful_cache(self) -> None:
        self.model._reset_stateful_cache()


class CalibrationLog(logging.Handler):
    """Collects the ratios MagCache logs at the end of a calibration run (one list per branch)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.ratios: list[list[float]] = []

    def emit(self, record):
        prefix = "MagCache Calibration Results: "
        message = record.getMessage()
        if message.startswith(prefix):
            self.ratios.append(ast.literal_eval(message[len(prefix):]))


MAG_CACHE_THRESHOLDS = (0.06, 0.12, 0.24)


def diffusers_methods(now: dict, mag_ratios: list[float], steps: int) -> dict:
    """Two or more settings of each of diffusers' caches. FasterCache runs with
    `is_guidance_distilled=True`: its unconditional-branch reuse needs both branches in one
    batch, and the samplers here (like diffusers' Wan pipeline) call them one after the other.
    TaylorSeer runs in its lite mode (blocks skipped, the output projection predicted): its
    default patterns ("^blocks.*attn", matched whole) name no module of Wan's (`attn1`,
    `attn2`), so by default it hooks nothing and computes every step."""
    timestep = lambda: now["t"]  # noqa: E731  (what PAB and FasterCache ask the pipeline for)
    return {
        "FirstBlockCache 0.05": FirstBlockCacheConfig(threshold=0.05),
        "FirstBlockCache 0.1": FirstBlockCacheConfig(threshold=0.1),
        "FirstBlockCache 0.2": FirstBlockCacheConfig(threshold=0.2),
        "PAB skip 2": PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2, current_timestep_callback=timestep),
        "PAB skip 3": PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=3, current_timestep_callback=timestep),
        **{
            f"TaylorSeer interval {n}": TaylorSeerCacheConfig(cache_interval=n, taylor_factors_dtype=torch.float32,
                                                               use_lite_mode=True)
            for n in (3, 4, 5, 6)
        },
        **{
            f"FasterCache skip {n}": FasterCacheConfig(
                spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=(-1, 681),
                current_timestep_callback=timestep, attention_weight_callback=lambda _: 0.3, is_guidance_distilled=True,
            )
            for n in (2, 3)
        },
        **{  # only once calibrated
            f"MagCache {threshold}": MagCacheConfig(threshold=threshold, num_inference_steps=steps, mag_ratios=mag_ratios)
            for threshold in (MAG_CACHE_THRESHOLDS if mag_ratios else ())
        },
    }


def calibrate_mag_cache(transformer, run, steps: int) -> list[float]:
    """MagCache's calibration run: no skipping; the conditional branch's ratios per step."""
    log, logger = CalibrationLog(), logging.getLogger("diffusers.hooks.mag_cache")
    level = logger.level
    logger.addHandler(log)
    logger.setLevel(logging.INFO)
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        run()
    finally:
        transformer.disable_cache()
        logger.removeHandler(log)
        logger.setLevel(level)
    if not log.ratios:
        raise RuntimeError("MagCache calibration logged no ratios")
    return log.ratios[0]


def regional_copy(transformer, cache=None):
    """A copy of the transformer with diffusers' `cache` config enabled (if any), then its
    repeated blocks compiled with diffusers' `compile_repeated_blocks()`, as a user combines
    them. What the cache's hooks do per step is traced too: where they change between calls,
    dynamo recompiles or breaks the graph (up to its recompile limit, then runs them eagerly),
    so the row records the graphs and graph breaks it met."""
    model = copy.deepcopy(transformer)
    if cache is not None:
        model.enable_cache(cache)
    model.compile_repeated_blocks()
    return model


class CapturedDense:
    """Dense Inductor replayed as CUDA graphs (`mode="reduce-overhead"`): the dense baseline for
    astraea's captured calls. Every call starts a graph step and its output is copied out, as the
    sampler keeps one branch's output while it calls the other."""

    def __init__(self, model):
        self.compiled = torch.compile(model, mode="reduce-overhead")

    def __call__(self, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return tuple(t.clone() for t in self.compiled(**kwargs))


def searched_schedules(model: str, steps: int, device: torch.device) -> dict[str, Schedule]:
    """{label: schedule} of those searched for this model and step count on this kind of device
    (a CPU's cost table says nothing about a GPU's, and back). The label names the speedup target
    (the search's, else the file name's last part), whether the search chose each step's reuse,
    and ", whole steps only" for a search over the levels 0 and 1."""
    found, paths = {}, {}
    for path in sorted(glob.glob(SEARCHED.format(model=model, steps=steps))):
        schedule = Schedule.load(path)
        search = schedule.meta.get("search", {})
        searched_on = search.get("cost_table", {}).get("device", "")
        if searched_on.startswith("cpu") == (device.type == "cpu"):  # costs.device_name: "cpu ..." or the GPU's name
            speedup = (search.get("target") or {}).get("speedup")
            target = f"{speedup:g}x" if speedup else path.rsplit("_", 1)[-1].removesuffix(".json")
            batch = search.get("cost_table", {}).get("shapes", {}).get("hidden_states", [1])[0]
            label = (f"{target} target" + (f", priced at batch {batch}" if batch != 1 else "")
                     + (", copy or forecast per step" if search.get("forecast") else "")
                     + (WHOLE_STEPS if search.get("levels") == [0.0, 1.0] else ""))
            if label in found:
                raise SystemExit(f"two schedules searched for the {label} on this kind of device, {paths[label]} "
                                 f"and {path}: move one out of {os.path.dirname(path)}")
            found[label], paths[label] = schedule, path
    return found


def astraea_methods(model: str, steps: int, device: torch.device) -> dict:
    """Dense and uniform budgets, every searched schedule of this model, step count and device
    kind in benchmarks/results (each also with its skipped steps forecasting from the block caches,
    where its file does not say each step's reuse: copy against forecast at the same budgets),
    ablations of the token score at 0.3 after 6 dense steps, and the 2x-target schedule with skipped
    steps reusing the other of the previous output and the block caches. Each method names every
    option it differs in, so one backend can run them in turn."""
    defaults = AstraeaConfig()
    base = dict(policy="astraea", weight_penalty=defaults.weight_penalty, skip=defaults.skip, reuse=defaults.reuse)
    methods = {
        DENSE_ASTRAEA: dict(base, schedule=1.0, full_steps=0),
        "astraea 0.5 (6 dense steps)": dict(base, schedule=0.5, full_steps=6),
        "astraea 0.3 (6 dense steps)": dict(base, schedule=0.3, full_steps=6),
        "astraea 0.5 (1 dense step)": dict(base, schedule=0.5, full_steps=1),
    }
    other_skip = {}  # the 2x-target schedule with the other reuse for skipped steps
    for label, schedule in searched_schedules(model, steps, device).items():
        # Run each as searched: schedules from before the skip option were searched with output reuse.
        skip = schedule.searched_option("skip") or defaults.skip
        methods[f"astraea searched ({label})"] = options = dict(base, schedule=schedule, full_steps=0, skip=skip)
        if schedule.reuse is None:
            forecast = tuple("forecast" if b == 0.0 else "copy" for b in schedule.budgets)
            methods[f"astraea searched ({label}), skips forecast"] = dict(
                options, skip="blocks", schedule=dataclasses.replace(schedule, reuse=forecast))
        if label.startswith("2x target") and WHOLE_STEPS not in label:
            other = next(s for s in SKIPS if s != skip)
            other_skip[f"ablation: {other} reuse for skips ({label})"] = dict(options, skip=other)
    methods.update(other_skip)
    ablation = dict(base, schedule=0.3, full_steps=6)
    methods["ablation: random tokens"] = dict(ablation, policy="random")
    methods["ablation: change only (no LSE)"] = dict(ablation, policy="delta")
    methods["ablation: no staleness penalty"] = dict(ablation, weight_penalty=0.0)
    return methods


class Timer:
    """Runs a generation to the device being done: its output, wall seconds and seconds in the
    transformer's calls (the medians of `repeats` runs) and, on a GPU, peak memory."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, generate, repeats: int = 1) -> tuple[object, float, float | None, float]:
        """`generate`: made by `main`'s `generate`, with its transformer's `CallTimer` as `calls`."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        seconds, calls = [], []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            with torch.no_grad():
                out = generate()
            if cuda:
                torch.cuda.synchronize(self.device)
            seconds.append(time.perf_counter() - start)
            calls.append(sum(generate.calls.take()) / 1e3)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else None
        return out, statistics.median(seconds), peak, statistics.median(calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models.add_arguments(parser)
    parser.set_defaults(model="reference")
    parser.add_argument("--prompts", type=int, default=8, help="evaluation prompts (reference models)")
    parser.add_argument("--seeds", type=int, default=2, help=f"held-out seeds of {HELD_OUT} (random Wan models)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="astraea launches every kernel instead of replaying calls as CUDA graphs")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="", help="added to the output names (e.g. the device, to keep a GPU run "
                        "of a model beside a CPU one)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="generations timed per method, their median taken (on a CPU the dense one timed beside each too)")
    parser.add_argument("--regional", action="store_true",
                        help="also on a CPU: dense regional compile, and every diffusers cache on a transformer compiled "
                             "with compile_repeated_blocks() (always on a GPU)")
    parser.add_argument("--compiled-dense", nargs="+", choices=sorted(COMPILED_DENSE.values()),
                        help="the compiled dense baselines to measure (default: all three on a GPU, regional with "
                             "--regional, none otherwise; at 81 frames of the Wan shape the whole-graph compile alone "
                             "takes ~100 s); with regional, every cache also runs on a regionally compiled transformer")
    parser.add_argument("--baseline-repeats", type=int,
                        help="generations timed per dense baseline, their median taken (default: 3 on a GPU, where one "
                             "eager generation of the small reference model once took 1.4x the others; else --repeats)")
    parser.add_argument("--only", metavar="REGEX", type=re.compile,
                        help="besides the dense baselines, run only the methods whose names match, and add their rows "
                             "to the results already at the output path")
    parser.add_argument("--replot", metavar="JSON", help="only redraw the table and plot of an earlier run's results")
    args = parser.parse_args()
    if args.compiled_dense and "inductor_graphs" in args.compiled_dense and not args.device.startswith("cuda"):
        parser.error("--compiled-dense inductor_graphs replays CUDA graphs: it needs --device cuda")
    if args.repeats < 1 or (args.baseline_repeats is not None and args.baseline_repeats < 1):
        parser.error(f"--repeats and --baseline-repeats must be at least 1, got {args.repeats}, {args.baseline_repeats}")
    if args.replot:
        return replot(args.replot)
    if args.model in SUBJECTS and args.batch != 1:
        parser.error("a reference model generates its --prompts in one batch; --batch is for random Wan models")
    device = torch.device(args.device)
    subject = ReferenceClips(args) if args.model in SUBJECTS else RandomWan(args)
    transformer, timer, gpu = subject.model, Timer(device), device.type == "cuda"
    where = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"

    rows, mag_ratios = {}, []
    wanted = args.only.search if args.only else lambda name: True  # noqa: E731
    run = time.strftime("%Y-%m-%d %H:%M:%S")  # names this run's rows among an earlier run's (--only)
    earlier = load_results(results_path(args.model, args.out, args.tag)) if args.only else None
    if earlier is not None:  # keep its rows, but for the dense baselines, measured again here
        if (earlier["setting"], earlier["device"]) != (subject.setting, where):
            parser.error(f"--only adds to results of the same setting and device; {args.out} holds "
                         f"{earlier['setting']!r} on {earlier['device']}")
        rows = {n: r for n, r in earlier["rows"].items() if not n.startswith("dense")}
        mag_ratios += earlier["magcache_ratios"]

    def generate(model):
        """One generation, after which the model's cache hooks are reset, as a pipeline resets them
        (`maybe_free_model_hooks`): a hook that counts steps (TaylorSeer) would otherwise run the
        next generation on from the last one's state. Its transformer calls are timed (`run.calls`)."""
        calls = CallTimer(model, device)

        def run():
            out = subject.run(calls)
            reset = getattr(model, "_reset_stateful_cache", None)
            if reset is not None:
                reset()
            return out
        run.calls = calls
        return run

    # Each method is timed --repeats times; on a GPU the dense runs at least three times (one
    # eager generation of the small reference model once took 1.4x the others).
    repeats = args.repeats
    baseline_repeats = args.baseline_repeats or max(repeats, 3 if gpu else 1)
    timer(generate(transformer))  # warm-up
    dense, dense_s, dense_gb, dense_calls = timer(generate(transformer), baseline_repeats)
    baselines, call_baselines = {"eager": dense_s}, {"eager": dense_calls}

    def record(name, out, seconds, peak_gb, calls_s, own=(dense_s, dense), extra=None):
        """`calls_s`: seconds in the transformer's calls; `own`: (seconds, output) of the dense run of
        the method's own lowering; `extra`: more fields of the row."""
        # A CPU's speed drifts over minutes: time dense again next to every method there.
        eager_s = dense_s if gpu or name.startswith("dense") else timer(generate(transformer), repeats)[1]
        row = {"seconds": seconds, "dense_seconds": eager_s, "speedup": eager_s / seconds, "peak_gb": peak_gb,
               "transformer_seconds": calls_s, **subject.metrics(out, dense), **(extra or {}), "run": run}
        if gpu:
            row["speedup_inductor"] = min(baselines[k] for k in COMPILED_DENSE.values() if k in baselines) / seconds
            row["speedup_calls"] = min(call_baselines[k] for k in COMPILED_DENSE.values() if k in baselines) / calls_s
            own_s, own_out = own
            mine = row if own_out is dense else subject.metrics(out, own_out)
            row.update(speedup_own=own_s / seconds, psnr_own=mine["psnr"], ssim_own=mine["ssim"])
        rows[name] = row
        print(f"{name:34} {row.get('speedup_inductor', row['speedup']):5.2f}x  PSNR {row['psnr']:6.2f}  "
              f"SSIM {row['ssim']:.3f}" + (f"  own dense: {row['speedup_own']:5.2f}x  PSNR {row['psnr_own']:6.2f}"
                                            f"  peak {peak_gb:.2f} GB" if gpu else ""), flush=True)
        # After every method: a cut-off run keeps its rows.
        write(rows, args.model, args.out, subject.setting, subject.columns, baselines, mag_ratios, where, gpu,
              {**vars(args), "only": args.only and args.only.pattern},
              {r["run"]: baselines if r["run"] == run else earlier["runs"][r["run"]] for r in rows.values()})

    # The dense baselines a user would compare with: the model under torch.compile, whole and by blocks.
    chosen = set(args.compiled_dense or (COMPILED_DENSE.values() if gpu else ["regional"] if args.regional else []))
    regional = "regional" in chosen
    compiled_dense = {}
    if "inductor" in chosen:
        compiled_dense["dense Inductor"] = torch.compile(transformer)
    if "inductor_graphs" in chosen:
        compiled_dense["dense Inductor, CUDA graphs"] = CapturedDense(transformer)
    if regional:
        compiled_dense["dense regional compile"] = regional_copy(transformer)
    measured = {}
    for name, model in compiled_dense.items():
        timer(generate(model))  # compiles (and captures)
        measured[name] = timer(generate(model), baseline_repeats)
    baselines.update({COMPILED_DENSE[name]: seconds for name, (_, seconds, _, _) in measured.items()})
    call_baselines.update({COMPILED_DENSE[name]: calls_s for name, (_, _, _, calls_s) in measured.items()})
    for name, (out, seconds, peak, calls_s) in measured.items():
        record(name, out, seconds, peak, calls_s, own=(seconds, out))
    regional_dense = None  # (seconds, output) of dense regional compile: the own baseline of the caches compiled so
    if regional:
        out, seconds, _, _ = measured["dense regional compile"]
        regional_dense = (seconds, out)
    record("dense eager", dense, dense_s, dense_gb, dense_calls)

    torch._dynamo.reset()
    ours = astraea_methods(args.model, args.steps, device)
    ours = {name: options for name, options in ours.items()  # its dense first: the others' own baseline
            if name == DENSE_ASTRAEA or wanted(name)} if any(map(wanted, ours)) else {}
    if ours:
        backend = astraea.backend(schedule=0.5, cuda_graphs=args.cuda_graphs)
        compiled = torch.compile(transformer, backend=backend)
        timer(generate(compiled))  # compiles; every method below reuses the compilation
        with torch.compiler.set_stance("fail_on_recompile"):
            for name, options in ours.items():
                backend.update(**options)
                if gpu:  # new selection options: their call graphs are captured in a first run
                    timer(generate(compiled))
                dense_run = name == DENSE_ASTRAEA
                out, seconds, peak, calls_s = timer(generate(compiled), baseline_repeats if dense_run else repeats)
                if dense_run:
                    astraea_dense = (seconds, out)
                record(name, out, seconds, peak, calls_s, own=astraea_dense)
        del backend, compiled  # free astraea's caches and graphs before measuring the others' memory
    torch._dynamo.reset()
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()

    now = {"t": 1000.0}
    spy = TimestepSpy(transformer, now)
    chosen = lambda name: wanted(name) or wanted(f"{name}{REGIONAL}")  # noqa: E731  (eager or compiled)
    if any(chosen(f"MagCache {threshold}") for threshold in MAG_CACHE_THRESHOLDS):
        mag_ratios[:] = calibrate_mag_cache(transformer, generate(spy), args.steps)
    for name, config in diffusers_methods(now, mag_ratios, args.steps).items():
        if not chosen(name):
            continue
        if wanted(name):
            transformer.enable_cache(config)
            try:
                result = timer(generate(spy), repeats)
            finally:
                transformer.disable_cache()
            record(name, *result)  # a CPU times dense next: with the cache off
        if regional and wanted(f"{name}{REGIONAL}"):  # the same cache on a transformer whose blocks are compiled
            torch._dynamo.reset()
            counters.clear()
            compiled_spy = TimestepSpy(regional_copy(transformer, config), now)
            timer(generate(compiled_spy))  # compiles
            result = timer(generate(compiled_spy), repeats)
            graphs = {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}
            record(f"{name}{REGIONAL}", *result, own=regional_dense, extra=graphs)
            del compiled_spy


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both speedup and fidelity, by speedup."""
    front, best = [], float("-inf")
    for speedup, fid in sorted(points, key=lambda p: (-p[0], -p[1])):
        if fid > best:
            front.append((speedup, fid))
            best = fid
    return front[::-1]


def results_path(model: str, out: str, tag: str) -> str:
    """The results' path without its suffix (.json, .md, .png)."""
    return os.path.join(out, f"peers_{model}" + (f"_{tag}" if tag else ""))


def load_results(name: str) -> dict | None:
    """An earlier run's results at `name` (.json), every row naming the run that measured it, or None."""
    if not os.path.exists(name + ".json"):
        return None
    with open(name + ".json") as f:
        data = json.load(f)
    if "runs" not in data:  # written before rows named their run: all of one run
        data["runs"] = {"earlier": data["baseline_seconds"]}
        for row in data["rows"].values():
            row["run"] = "earlier"
    return data


def write(rows: dict, model: str, out: str, setting: str, columns, baselines: dict, mag_ratios: list[float],
          where: str, gpu: bool, args: dict, runs: dict) -> None:
    """JSON, markdown table and plot of `rows`; `runs`: the dense baselines of each run that
    measured a row (`baselines`: this run's)."""
    os.makedirs(out, exist_ok=True)
    name = results_path(model, out, args.get("tag"))
    rows = {**{n: r for n, r in rows.items() if n.startswith("dense")}, **rows}  # the baselines first
    with open(name + ".json", "w") as f:
        json.dump({"setting": setting, "device": where, "gpu": gpu, "args": args, "baseline_seconds": baselines,
                   "magcache_ratios": mag_ratios, "runs": runs, "rows": rows}, f, indent=1)
    speedups = [("speedup over the fastest dense compiled", "speedup_inductor")] if gpu else []
    if gpu and all("speedup_calls" in r for r in rows.values()):  # runs since the calls were timed
        speedups.append(("its transformer calls' speedup", "speedup_calls"))
    speedups.append(("speedup over dense eager", "speedup"))
    own = gpu and all("psnr_own" in r for r in rows.values())  # the own-lowering view: GPU runs since it exists
    table = [(h, k, ".2f") for h, k in speedups] + list(columns)
    if own:
        table += [("speedup over own dense", "speedup_own", ".2f"), ("PSNR dB vs own dense", "psnr_own", ".2f"),
                  ("SSIM vs own dense", "ssim_own", ".3f")]
    table += [("peak GB", "peak_gb", ".2f")] if gpu else []
    lines = [f"{setting}; {where}", "",
             "| method | " + " | ".join(h for h, _, _ in table) + " |", "|---" * (len(table) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(format(r[k], fmt) for _, k, fmt in table) + " |" for n, r in rows.items()]
    if len(runs) > 1:  # rows of several runs (--only): say which, and against which baselines
        lines.append("")
        for run, seconds in runs.items():
            names = ", ".join(n for n, r in rows.items() if r.get("run") == run)
            dense = ", ".join(f"{k} {v:.3f} s" for k, v in seconds.items())
            lines.append(f"Run {run} (dense baselines: {dense}): {names}.")
    with open(name + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clock = " (GPU wall time)" if gpu else " (CPU wall time)"
    panels = [(speedups[0][1], speedups[0][0] + clock, "psnr", columns[0][0] + " against dense eager")]
    if len(speedups) > 1 and speedups[1][1] == "speedup_calls":  # what the methods change, without the decode and prompts they share
        panels.append(("speedup_calls", "transformer calls' speedup over the fastest dense compiled" + clock, "psnr",
                       columns[0][0] + " against dense eager"))
    elif own:
        panels.append(("speedup_own", "speedup over own dense" + clock, "psnr_own", columns[0][0] + " against own dense"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (field, xlabel, key, ylabel) in zip(axes[0], panels):
        scatter_fronts(ax, rows, field, key)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:  # a front is drawn once a side has points
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(name + ".png", dpi=130)
    plt.close(fig)  # written after every method: keep one figure open, not one per method


def scatter_fronts(ax, rows: dict, field: str, key: str) -> None:
    """Every method at (rows' `field`, `key`), with each side's Pareto front."""
    whole = lambda n: WHOLE_STEPS in n  # noqa: E731
    sides = {"astraea": ("tab:red", lambda n: n.startswith("astraea") and not whole(n), True),
             "astraea, whole steps only": ("tab:orange", lambda n: n.startswith("astraea") and whole(n), True),
             "astraea ablations": ("tab:pink", lambda n: n.startswith("ablation"), False),
             "diffusers caches": ("tab:gray", lambda n: not n.startswith(("astraea", "ablation", "dense"))
                                  and not n.endswith(REGIONAL), True),
             "diffusers caches, regionally compiled": ("tab:blue", lambda n: n.endswith(REGIONAL), True)}
    for side, (colour, member, front_line) in sides.items():
        points = {n: (r[field], r[key]) for n, r in rows.items()  # astraea at 1.0 is a dense baseline: off the plot
                  if member(n) and n != DENSE_ASTRAEA and r[key] != float("inf")}
        for n, (x, y) in points.items():
            ax.scatter(x, y, color=colour, s=14)
            ax.annotate(n, (x, y), fontsize=5)
        front = pareto(list(points.values()))
        if front and front_line:  # the best fidelity on offer at each speed or more
            ax.step(*zip(*front), where="pre", color=colour, alpha=0.6, label=f"{side} (Pareto front)")


def replot(path: str) -> None:
    """Table and plot again from a results JSON (the measurements themselves are not redone)."""
    data = load_results(path.removesuffix(".json"))
    args = data["args"]
    columns = (ReferenceClips if args["model"] in SUBJECTS else RandomWan).columns
    gpu = data.get("gpu", any(r.get("peak_gb") is not None for r in data["rows"].values()))
    write(data["rows"], args["model"], os.path.dirname(path) or ".", data["setting"], columns,
          data["baseline_seconds"], data["magcache_ratios"], data["device"], gpu, args, data["runs"])


if __name__ == "__main__":
    main()
