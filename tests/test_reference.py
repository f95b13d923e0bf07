"""The shipped reference model: its data, prompt encoder, weights, sampler and semantic checks."""

import dataclasses
import shutil

import numpy as np
import pytest
from pathlib import Path

import torch

from astraea.reference.checks import CHECKS, check_clip, check_clips, summarize
from astraea.reference.data import (
    COLOURS, DIRECTIONS, FRAMES, SHAPES, SIZE, Prompt, make_clips, render, scenes_for,
)
from astraea.reference.model import WEIGHTS, WeightsError, generate, load_reference
from astraea.reference.text import MAX_TOKENS, PromptEncoder, tokenize


@pytest.fixture(scope="module")
def clips():
    return make_clips(seed=11, n=16)


@pytest.fixture(scope="module")
def reference():
    return load_reference()


def failed(result):
    return {name for name, ok in result.passed.items() if not ok}


def rerendered(prompts, change, seed=5):
    """Clips of `prompts`, and of the prompts `change` makes of them, drawn with the same sizes and places."""
    changed = [change(p) for p in prompts]
    return render(scenes_for(prompts, np.random.default_rng(seed))), render(scenes_for(changed, np.random.default_rng(seed)))


def each(change):
    """A prompt change that applies `change(object, index)` to every object."""
    return lambda p: Prompt(tuple(change(o, i) for i, o in enumerate(p.objects)), p.background)


def test_same_seed_gives_same_clips_and_prompts():
    a, pa = make_clips(seed=3, n=4)
    b, pb = make_clips(seed=3, n=4)
    assert torch.equal(a, b) and pa == pb


def test_different_seeds_give_different_clips():
    a, pa = make_clips(seed=3, n=4)
    b, pb = make_clips(seed=4, n=4)
    assert not torch.equal(a, b) and pa != pb


def test_clips_are_video_tensors_in_range(clips):
    video, prompts = clips
    assert video.shape == (16, 3, FRAMES, SIZE, SIZE) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert {len(p.objects) for p in prompts} == {1, 2}


def test_prompt_text_reads_back(clips):
    for prompt in clips[1]:
        assert Prompt.parse(prompt.text) == prompt
    assert clips[1][0].text.startswith("a ") and clips[1][0].text.endswith(" background")


@pytest.mark.parametrize("text", [
    "a red circle moving left",
    "a red blob moving left on a plain background",
    "red circle moving left on a plain background",
    "a red circle moving left and a red square moving up on a plain background",
])
def test_malformed_prompts_are_refused(text):
    with pytest.raises(ValueError):
        Prompt.parse(text)


def test_tokenizer_pads_and_refuses_unknown_words():
    ids = tokenize(["a red circle moving left on a plain background", ""])
    assert ids.shape == (2, MAX_TOKENS)
    assert (ids[0, :9] > 0).all() and (ids[0, 9:] == 0).all() and (ids[1] == 0).all()
    with pytest.raises(ValueError, match="purple"):
        tokenize(["a purple circle moving left on a plain background"])


def test_empty_prompt_encodes_to_zeros():
    embeds = PromptEncoder().encode(["", "a red circle moving left on a plain background"])
    assert (embeds[0] == 0).all() and (embeds[1, :9] != 0).any(-1).all()


def test_known_good_clips_pass_every_check(clips):
    assert summarize(check_clips(*clips)) == {**dict.fromkeys(CHECKS, 1.0), "accuracy": 1.0}


def test_wrong_colour_fails_only_colour(clips):
    prompts = clips[1][:8]

    def recolour(prompt):
        unused = [c for c in COLOURS if c not in {o.colour for o in prompt.objects}]
        return each(lambda o, i: dataclasses.replace(o, colour=unused[i]))(prompt)

    good, bad = rerendered(prompts, recolour)
    for g, b, prompt in zip(good, bad, prompts):
        assert failed(check_clip(g, prompt)) == set()
        assert failed(check_clip(b, prompt)) == {"colour"}


def test_wrong_shape_fails_only_shape(clips):
    prompts = clips[1][:8]
    good, bad = rerendered(prompts, each(lambda o, i: dataclasses.replace(o, shape=SHAPES[SHAPES.index(o.shape) - 1])))
    for g, b, prompt in zip(good, bad, prompts):
        assert failed(check_clip(g, prompt)) == set()
        assert failed(check_clip(b, prompt)) == {"shape"}


def test_reversed_motion_fails_only_direction(clips):
    prompts = clips[1][:8]
    opposite = {name: next(n for n, v in DIRECTIONS.items() if v == (-x, -y)) for name, (x, y) in DIRECTIONS.items()}
    good, bad = rerendered(prompts, each(lambda o, i: dataclasses.replace(o, direction=opposite[o.direction])))
    for g, b, prompt in zip(good, bad, prompts):
        assert failed(check_clip(g, prompt)) == set()
        assert failed(check_clip(b, prompt)) == {"direction"}


def test_missing_object_fails_count(clips):
    video, prompts = clips
    two = next(i for i, p in enumerate(prompts) if len(p.objects) == 2)
    lonely = rerendered([Prompt(prompts[two].objects[:1], prompts[two].background)], lambda p: p)[0][0]
    assert failed(check_clip(lonely, prompts[two])) == {"count", "colour", "shape", "direction"}


def test_shuffled_frames_fail_smoothness(clips):
    video, prompts = clips
    shuffled = video[:, :, torch.randperm(FRAMES, generator=torch.Generator().manual_seed(0))]
    assert summarize(check_clips(shuffled, prompts))["smooth"] == 0.0


def test_noise_fails_every_check(clips):
    noise = torch.rand(4, 3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert summarize(check_clips(noise, clips[1][:4]))["accuracy"] == 0.0


def test_shipped_weights_load_with_their_checksum_and_generate(reference):
    transformer, encoder = reference
    assert type(transformer).__name__ == "WanTransformer3DModel"
    embeds = encoder.encode(["a red circle moving left on a plain background"] * 2)
    video = generate(transformer, embeds, encoder.encode([""]), num_steps=2, guidance=3.0, seed=1)
    assert video.shape == (2, 3, FRAMES, SIZE, SIZE) and torch.isfinite(video).all()
    assert torch.equal(video, generate(transformer, embeds, encoder.encode([""]), num_steps=2, guidance=3.0, seed=1))


def test_corrupt_weights_are_refused(tmp_path):
    corrupt = tmp_path / "reference.safetensors"
    shutil.copyfile(WEIGHTS, corrupt)
    with open(corrupt, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(WeightsError, match="sha256"):
        load_reference(path=corrupt)
    with pytest.raises(WeightsError, match="not found"):
        load_reference(path=tmp_path / "missing.safetensors")


def test_sampler_calls_cond_then_uncond_with_one_timestep_per_step():
    calls = []

    class Recorder(torch.nn.Module):
        context = None

        def cache_context(self, name):
            recorder = self

            class Context:
                def __enter__(self):
                    recorder.context = name

                def __exit__(self, *exc):
                    recorder.context = None

            return Context()

        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict):
            calls.append((self.context, timestep, encoder_hidden_states[0, 0, 0].item()))
            return (torch.zeros_like(hidden_states),)

    cond, uncond = torch.ones(2, MAX_TOKENS, 4), torch.zeros(1, MAX_TOKENS, 4)
    generate(Recorder(), cond, uncond, num_steps=3, guidance=2.0)
    assert [(c[0], c[2]) for c in calls] == [("cond", 1.0), ("uncond", 0.0)] * 3
    assert all(calls[i][1] is calls[i + 1][1] for i in range(0, 6, 2))
    assert [c[1][0].item() for c in calls[::2]] == pytest.approx([1000.0, 2000 / 3, 1000 / 3])
    calls.clear()
    generate(Recorder(), cond, uncond, num_steps=3, guidance=1.0)
    assert [c[0] for c in calls] == ["cond"] * 3


def test_trained_model_draws_what_its_prompts_say(reference):
    transformer, encoder = reference
    texts = ["a red circle moving left on a plain background", "a green square moving down on a gradient background",
             "a blue triangle moving up-right on a plain background"]
    prompts = [Prompt.parse(t) for t in texts]
    video = generate(transformer, encoder.encode(texts), encoder.encode([""]), num_steps=20, guidance=2.0, seed=0)
    own = summarize(check_clips(video, prompts))
    other = summarize(check_clips(video, prompts[1:] + prompts[:1]))
    assert own["colour"] >= 2 / 3 and other["colour"] == 0.0
    assert own["accuracy"] > other["accuracy"] + 0.15


def test_demo_compares_dense_and_sparse_and_writes_its_files(tmp_path, capsys):
    from PIL import Image

    from astraea.cli import main
    from astraea.reference.demo import parse_schedule

    assert parse_schedule("0.5") == 0.5 and parse_schedule("1,0.5") == [1.0, 0.5] and parse_schedule("s.json") == "s.json"
    assert main(["demo", "--model", "reference", "--prompts", "1", "--steps", "3", "--full-steps", "1",
                 "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "speedup" in table and "sparse" in table and "schedules/reference.json" in table  # the shipped searched one
    assert "MODEL_CARD.md" in table
    assert Image.open(tmp_path / "dense_vs_sparse.gif").n_frames == FRAMES
    assert (tmp_path / "budgets.png").stat().st_size > 0 and (tmp_path / "recomputed.png").stat().st_size > 0


def test_the_recompute_map_follows_each_steps_budget(tmp_path):
    """Per step of the cond branch, the share of each latent frame's tokens recomputed: all at
    a dense step, none at a skipped one, the budget's share in between. A schedule on the time
    axis (as searches write them) plots too."""
    import astraea
    from astraea.reference.demo import RecomputeMap, plot_budgets
    from astraea.schedule import Schedule

    transformer, encoder = load_reference()
    torch._dynamo.reset()
    schedule = Schedule(budgets=(1.0, 0.0, 0.5), times=(1000.0, 2000 / 3, 1000 / 3))
    backend = astraea.backend(schedule=schedule, full_steps=0, skip="blocks")
    compiled = torch.compile(transformer, backend=backend)
    recomputed = RecomputeMap(backend)
    compiled.register_forward_hook(recomputed)
    generate(compiled, encoder.encode(["a red circle"]), encoder.encode([""]), num_steps=3, guidance=2.0)
    shares = torch.stack(recomputed.rows)  # [steps, frames]
    assert shares.shape == (3, backend.runners[-1].report.token_grid[0])
    assert (shares[0] == 1).all() and (shares[1] == 0).all()
    assert 0.3 < shares[2].mean() < 0.7
    plot_budgets(backend, 3, tmp_path / "budgets.png")
    assert (tmp_path / "budgets.png").stat().st_size > 0


def test_structure_hash_of_the_shipped_model_is_stable():
    """Schedules and cost tables name the structure hash they were made for; searched ones for
    the shipped model (benchmarks/results) must keep loading as the analysis changes."""
    import astraea

    transformer, encoder = load_reference()
    torch._dynamo.reset()
    be = astraea.backend(schedule=1.0)
    compiled = torch.compile(transformer, backend=be)
    with torch.no_grad():
        generate(compiled, encoder.encode(["a red circle"]), encoder.encode([""]), num_steps=1)
    assert be.reports[0].structure_hash == "918898071322d375-344912cc"
    # Searched schedules written before the hash named the attention geometry hold its first part.
    from astraea.schedule import Schedule

    searched = Path(__file__).resolve().parent.parent / "benchmarks/results/search_reference_20steps_1.8x.json"
    Schedule.load(searched).check_model(be.reports[0].structure_hash)
