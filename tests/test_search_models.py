"""The search's sampler and named workloads, on the eager models (no compiler involved)."""

import numpy as np
import pytest
import torch

import astraea.reference.model as reference_model
from astraea.reference import subjects
from astraea.reference.data import sample_scenes
from astraea.search.models import random_wan, reference

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: these models run on one thread too


def test_reference_workload_samples_as_the_reference_model_does(monkeypatch):
    # Defaults included: a search must score schedules on the sampler the model runs with.
    torch.manual_seed(0)
    transformer, encoder = reference_model.build_model()
    transformer.eval().requires_grad_(False)
    monkeypatch.setattr(subjects, "load_reference", lambda device, dtype: (transformer, encoder))
    workload = reference(num_steps=2)
    seed = 3
    ours = workload.decoder(workload.generate(transformer, seed).latent)
    prompt = sample_scenes(np.random.default_rng(seed), 1).prompts()[0].text
    with torch.no_grad():
        theirs = reference_model.generate(
            transformer, encoder.encode([prompt]), encoder.encode([""]), num_steps=2, seed=seed
        )
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_a_generation_resumed_from_its_own_latent_ends_where_it_would():
    workload = random_wan("tiny", frames=3, height=8, width=8, num_steps=5)
    entering = {}
    whole = workload.generate(workload.model, 1, on_step=lambda step, latent: entering.setdefault(step, latent))
    assert sorted(entering) == [0, 1, 2, 3, 4]
    resumed = workload.generate(workload.model, 1, start=(3, entering[3]))
    torch.testing.assert_close(resumed.latent, whole.latent, rtol=0, atol=0)
    assert torch.equal(resumed.noise, whole.noise)


def test_random_wan_settings():
    workload = random_wan("tiny", frames=3, height=8, width=8, num_steps=4, guidance=1.0)
    assert workload.calls_per_step == 1
    assert workload.shapes() == {"hidden_states": (1, 4, 3, 8, 8), "encoder_hidden_states": (1, 16, 32)}
    noise, cond, uncond = workload.inputs(0)
    assert not torch.equal(cond, uncond) and not torch.equal(noise.flatten()[:32], cond.flatten()[:32])
    assert torch.equal(random_wan("tiny", frames=3, height=8, width=8, num_steps=4).inputs(0)[0], noise)
    with pytest.raises(ValueError, match="unknown Wan preset 'huge'"):
        random_wan("huge", frames=3, height=8, width=8, num_steps=4)


def test_a_batched_generation_is_its_clips_generated_one_by_one():
    """Clip i of seed s at batch B is seed s * B + i's prompt sampled from the batch's noise for
    that clip: the same as a generation of one clip started from that noise."""
    batched = random_wan("tiny", frames=3, height=8, width=8, num_steps=3, batch=3)
    single = random_wan("tiny", frames=3, height=8, width=8, num_steps=3)
    assert batched.shapes() == {"hidden_states": (3, 4, 3, 8, 8), "encoder_hidden_states": (3, 16, 32)}
    noise, cond, uncond = batched.inputs(2)
    for i in range(3):
        _, own_cond, own_uncond = single.inputs(2 * 3 + i)
        assert torch.equal(cond[i : i + 1], own_cond) and torch.equal(uncond[i : i + 1], own_uncond)
    whole = batched.generate(batched.model, 2)
    assert torch.equal(whole.noise, noise) and whole.latent.shape == noise.shape
    for i in range(3):
        one = single.generate(single.model, 2 * 3 + i, start=(0, noise[i : i + 1]))
        torch.testing.assert_close(one.latent, whole.latent[i : i + 1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(whole.latent[0], whole.latent[1])  # each clip its own prompt and noise


@pytest.mark.parametrize("batch", [0, -1, 1.5, True])
def test_a_batch_that_is_not_a_number_of_clips_is_refused(batch):
    with pytest.raises(ValueError, match="batch must be a whole number of clips"):
        random_wan("tiny", frames=3, height=8, width=8, num_steps=3, batch=batch)
