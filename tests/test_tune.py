"""`astraea.tune` on real diffusers pipelines (tiny random weights, built offline): the search
runs the pipeline's own `__call__` (UniPC for Wan, LTX's packed latents, batched CFG, Wan 2.2's
two transformers), and the schedule it writes runs at another step count and is refused on
another model."""

from __future__ import annotations

import json

import pytest
import torch

import astraea
from astraea import ScheduleError
from astraea.cli import main
from astraea.search import SearchError, SearchSettings
from astraea.search.pipeline import PipelineError, PipelineWorkload
from tests import pipelines
from tests.pipelines import prompt_arguments

STEPS = 6
SPEEDUP = 1.05  # on a CPU a skip costs 50-90% of a dense step (host work dominates these tiny models, more so on a loaded machine), and a budget below 1 about what a dense step does: a small target keeps room for the search
SETTINGS = SearchSettings(population=4, offspring=4, generations=2)
# On a CPU a budget between 0 and 1 costs what a dense step does (host work dominates these tiny
# models), so only skips buy time: the search picks which steps to skip. With a level 0.5 as well,
# a loaded machine's table can make uniform 0.5 fit, and a mix the three calibration seeds
# preferred lost to it by 2.5 dB on the held-out seeds once (benchmarks/NOTES.md).
LEVELS = (0.0, 1.0)


def _prompts(inputs: dict) -> tuple[list[dict], dict]:
    """Two prompts (the builder's, and other random embeddings of the same shapes), and the setting."""
    prompt, setting = prompt_arguments(inputs)
    g = torch.Generator().manual_seed(7)
    other = {k: torch.randn(v.shape, generator=g) if k in ("prompt_embeds", "pooled_prompt_embeds") else v
             for k, v in prompt.items()}
    return [prompt, other], setting


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


BUILDERS = {
    "wan_unipc": pipelines.wan_unipc, "ltx_video": pipelines.ltx_video, "hunyuan_video": pipelines.hunyuan_video,
    "cogvideox": pipelines.cogvideox, "wan22_a14b": pipelines.wan22_a14b,
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def tuned(request, tmp_path_factory):
    torch._dynamo.reset()
    pipe, inputs = BUILDERS[request.param]()
    # A user's transformer already compiled for dense runs: tune searches on the module under it
    # and hands the pipeline back with its own compiled wrapper, not a timer or astraea's copy.
    found = pipe.transformer = torch.compile(pipe.transformer)
    prompts, setting = _prompts(inputs)
    output = tmp_path_factory.mktemp(request.param) / "schedule.json"
    result = astraea.tune(pipe, prompts, speedup=SPEEDUP, num_inference_steps=STEPS, output=output, seeds=3,
                          held_out=2, settings=SETTINGS, levels=LEVELS, progress=False, **setting)
    assert pipe.transformer is found  # left as found
    pipe.transformer = found._orig_mod  # the other tests compile it with astraea
    return request.param, pipe, inputs, result


def test_the_schedule_meets_the_target_and_beats_the_uniform_one_on_held_out_seeds(tuned):
    name, pipe, _, result = tuned
    originals = set(result.schedules)
    assert originals == ({"transformer", "transformer_2"} if name == "wan22_a14b" else {"transformer"})
    for slot, schedule in result.schedules.items():
        meta = schedule.meta["search"]
        assert meta["predicted_speedup"] >= SPEEDUP
        assert schedule.on_time_axis and len(schedule.times) == meta["num_steps"]
        held = result.held_out[slot]
        assert held.seeds == (3, 4)
        # scored on the pipeline's decoded frames, against its own dense output; the search's
        # candidates on the latents, the confirmed ones on the frames too
        assert held.chosen.decoded is not None
        assert all(c.fidelity.decoded is None for c in result.searches[slot].candidates)
        assert result.searches[slot].chosen.fidelity.decoded is not None and meta["proxy_decoded"] is False
        uniform = result.searches[slot].uniform
        # better where the search chose another schedule than the uniform one (it keeps the uniform
        # one when nothing beat it on the calibration seeds)
        assert held.uniform is not None and uniform is not None
        assert schedule.budgets == uniform.budgets or held.chosen.score > held.uniform.score, (slot, schedule.budgets)
    if name == "wan22_a14b":  # each transformer searched over its own steps, and their times do not overlap
        high, low = result.schedules["transformer"], result.schedules["transformer_2"]
        assert len(high.times) + len(low.times) == STEPS and min(high.times) > max(low.times)


def test_the_file_runs_at_another_step_count(tuned):
    name, pipe, inputs, result = tuned
    backends = {}
    try:
        for slot in result.schedules:
            schedule = result.path if len(result.schedules) == 1 else f"{result.path}#{slot}"
            backends[slot] = astraea.backend(schedule=schedule)
            setattr(pipe, slot, torch.compile(getattr(pipe, slot), backend=backends[slot]))
        pipe.set_progress_bar_config(disable=True)
        out = pipe(**inputs, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent")
        assert torch.isfinite(out.frames).all()
        timesteps = [float(t) for t in pipe.scheduler.timesteps]  # the 4 steps' times, as the transformers saw them
        for slot, backend in backends.items():
            records = [r for runner in backend.runners for r in runner.records]
            assert records, slot
            first = {}  # each branch's first call fills its caches: dense
            for r in records:
                expected = 1.0 if first.setdefault(r.branch, r) is r or r.step == 0 else \
                    result.schedules[slot].budget(r.step, timesteps[r.step])
                assert r.budget == expected, (slot, r)
    finally:
        for slot in backends:
            setattr(pipe, slot, getattr(pipe, slot)._orig_mod)


def test_the_file_is_refused_for_another_model(tuned, tmp_path):
    name, _, _, result = tuned
    if name != "wan_unipc":
        pytest.skip("one model's file is enough")
    other, inputs = pipelines.ltx_video()
    other.set_progress_bar_config(disable=True)
    other.transformer = torch.compile(other.transformer, backend=astraea.backend(schedule=result.path))
    with pytest.raises(Exception, match="schedule was made for model structure"):
        other(**inputs, num_inference_steps=2, output_type="latent")


def test_a_second_run_resumes_from_the_files_beside_the_schedule(tuned, capsys):
    name, pipe, inputs, result = tuned
    if name != "wan_unipc":
        pytest.skip("one pipeline is enough")
    prompts, setting = _prompts(inputs)
    again = astraea.tune(pipe, prompts, speedup=SPEEDUP, num_inference_steps=STEPS, output=result.path, seeds=3,
                         held_out=2, settings=SETTINGS, levels=LEVELS, progress=True, **setting)
    assert "cost table from" in capsys.readouterr().err
    assert again.schedule.budgets == result.schedule.budgets


def test_the_command_line_tunes_a_pipeline_that_takes_text(tmp_path, capsys):
    torch._dynamo.reset()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball moves left\n\na blue cube moves right slowly\n")
    output = tmp_path / "schedule.json"
    code = main(["tune", "tests.pipelines:wan_with_text", "--prompts", str(prompts), "--speedup", "1.05", "--steps",
                 "4", "-o", str(output), "--seeds", "1", "--held-out", "1", "--population", "4", "--offspring", "4",
                 "--generations", "1", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("transformer: 1 ") and "held-out seeds [1]" in printed
    saved = json.loads(output.read_text())
    assert saved["meta"]["tune"]["pipeline"] == "WanPipeline" and len(saved["times"]) == 4
    assert (tmp_path / "schedule.png").exists()


def test_bad_input_is_refused_before_any_generation():
    pipe, inputs = pipelines.wan_unipc()
    prompts, setting = _prompts(inputs)
    with pytest.raises(SearchError, match="exactly one target"):
        astraea.tune(pipe, prompts, speedup=2, latency_ms=10.0, **setting)
    with pytest.raises(PipelineError, match="non-empty list"):
        PipelineWorkload(pipe, "transformer", "a red ball", num_inference_steps=2, call_kwargs=setting)
    with pytest.raises(PipelineError, match="prompt 0 is a int"):
        PipelineWorkload(pipe, "transformer", [3], num_inference_steps=2, call_kwargs=setting)
    with pytest.raises(PipelineError, match=r"\['latents'\] are set by tuning itself"):
        PipelineWorkload(pipe, "transformer", prompts, num_inference_steps=2, call_kwargs={**setting, "latents": None})
    with pytest.raises(PipelineError, match="has no transformer 'transformer_2'"):
        PipelineWorkload(pipe, "transformer_2", prompts, num_inference_steps=2, call_kwargs=setting)
    with pytest.raises(SystemExit, match="package.module:function"):
        main(["tune", "nocolon", "--prompts", "x", "--speedup", "2"])


def test_a_named_schedule_must_be_named(tuned):
    name, _, _, result = tuned
    if name != "wan22_a14b":
        pytest.skip("a file of two schedules")
    with pytest.raises(ScheduleError, match="one schedule per transformer"):
        astraea.Schedule.load(result.path)
