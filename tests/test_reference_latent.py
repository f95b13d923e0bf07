"""Reference model v2: scenes, prompts, checks, autoencoder, resumable training and weights loading."""

import contextlib
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from astraea.reference.latent import scenes
from astraea.reference.latent.autoencoder import CONFIG as AUTOENCODER, build_autoencoder, decode, encode, latent_shape
from astraea.reference.latent.checkpoint import CheckpointError, load_checkpoint
from astraea.reference.checks import summarize
from astraea.reference.latent import checkpoint
from astraea.reference.latent.checks import CHECKS, check_clips
from astraea.reference.latent.model import CONFIG as TRANSFORMER, WeightsError, load_latent_reference
from astraea.reference.model import sha256
from astraea.reference.latent.scenes import FRAMES, SIZE, ObjectPrompt, Prompt, make_clips, render, scenes_for
from astraea.reference.latent.text import MAX_TOKENS, PromptEncoder, detokenize, tokenize
from astraea.reference.latent.train import DECAY, DEFAULTS, TransformerStage, learning_rate, object_weighted_l1, train

TINY_AUTOENCODER = dict(AUTOENCODER, base_dim=4, z_dim=4, num_res_blocks=1)
TINY = {
    "autoencoder": dict(autoencoder=TINY_AUTOENCODER, batch_size=1, frames=5, size=32, validation_clips=1, checked_clips=0,
                        log_every=1),
    "transformer": dict(transformer=dict(TRANSFORMER, num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                         out_channels=4, ffn_dim=32, num_layers=1, text_dim=16),
                        batch_size=2, frames=5, size=32, pool=2, refresh=1, validation_clips=1, log_every=1),
}


@pytest.fixture(scope="module")
def clips():
    return make_clips(seed=11, n=12)


def test_same_seed_gives_same_scenes_and_prompts():
    a = scenes.sample_scenes(np.random.default_rng(3), 2)
    b = scenes.sample_scenes(np.random.default_rng(3), 2)
    c = scenes.sample_scenes(np.random.default_rng(4), 2)
    assert all(np.array_equal(x, y) for x, y in zip(vars(a).values(), vars(b).values()))
    assert a.prompts() == b.prompts() != c.prompts()
    assert torch.equal(render(a), render(b))


def test_clips_are_video_tensors_in_range(clips):
    video, prompts = clips
    assert video.shape == (12, 3, FRAMES, SIZE, SIZE) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert {len(p.objects) for p in prompts} == {1, 2, 3}


def test_static_camera_keeps_the_background_and_a_pan_moves_it():
    obj = (ObjectPrompt("circle", "red", "left", "slow"),)
    still, pan = (render(scenes_for([Prompt(obj, "wavy", camera)], np.random.default_rng(0)))[0]
                  for camera in ("static", "panning right"))
    covered = torch.nn.functional.max_pool2d((still > -0.3).any(0).any(0)[None].float(), 9, 1, 4)[0]
    background = covered == 0  # pixels no object, nor its antialiased edge, ever comes near
    assert background.float().mean() > 0.5
    assert torch.allclose(still[:, 0][:, background], still[:, -1][:, background], atol=1e-6)
    assert (pan[:, 0][:, background] - pan[:, -1][:, background]).abs().mean() > 0.05


def test_prompt_text_reads_back_through_the_tokenizer(clips):
    texts = [p.text for p in clips[1]]
    assert detokenize(tokenize(texts)) == texts
    assert [Prompt.parse(t) for t in texts] == clips[1]
    assert texts[0].startswith("a ") and ", camera " in texts[0]


@pytest.mark.parametrize("text", [
    "a fast red circle moving left on a wavy background",
    "a red circle moving left on a wavy background, camera static",
    "a fast red circle moving left on a plain background, camera static",
    "a fast red circle moving left on a wavy background, camera spinning",
    "a fast red circle moving left and a slow red square moving up on a wavy background, camera static",
])
def test_malformed_prompts_are_refused(text):
    with pytest.raises(ValueError):
        Prompt.parse(text)


def test_empty_prompt_encodes_to_zeros_and_unknown_words_are_named():
    embeds = PromptEncoder(16).encode(["", "a slow red circle moving up on a wavy background, camera static"])
    assert embeds.shape == (2, MAX_TOKENS, 16) and not embeds[0].any() and embeds[1, 0].any()
    with pytest.raises(ValueError, match="purple"):
        tokenize(["a slow purple circle moving up on a wavy background, camera static"])


def test_checks_pass_on_the_clips_of_their_prompts(clips):
    summary = summarize(check_clips(*clips))
    assert all(summary[name] >= 0.9 for name in CHECKS), summary


def test_checks_fail_on_other_prompts_and_on_noise(clips):
    video, prompts = clips
    shuffled = summarize(check_clips(video[:8], prompts[1:9]))
    assert shuffled["accuracy"] <= 0.35, shuffled
    noise = summarize(check_clips(torch.rand(2, 3, FRAMES, SIZE, SIZE) * 2 - 1, prompts[:2]))
    assert noise["accuracy"] == 0, noise


def test_autoencoder_compresses_8x_in_space_and_4x_in_time():
    assert latent_shape() == (16, 9, 32, 32)
    assert latent_shape()[0] == TRANSFORMER["in_channels"] == TRANSFORMER["out_channels"]
    vae = build_autoencoder(TINY_AUTOENCODER)
    clip = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    latents = encode(vae, clip)
    assert latents.shape == (1, *latent_shape(TINY_AUTOENCODER, frames=9, size=32)) == (1, 4, 3, 4, 4)
    assert decode(vae, latents).shape == clip.shape


def test_learning_rate_warms_up_holds_and_anneals_to_zero():
    assert learning_rate(1.0, 0, 10, 0.0) == pytest.approx(0.1)
    assert learning_rate(1.0, 50, 10, 0.5) == 1.0
    assert learning_rate(1.0, 50, 10, 1 - DECAY) == pytest.approx(1.0)
    assert learning_rate(1.0, 50, 10, 1 - DECAY / 2) == pytest.approx(0.5)
    assert learning_rate(1.0, 50, 10, 1.0) == 0.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    train("autoencoder", root / "ae", 1, max_steps=1, config=TINY["autoencoder"])
    train("transformer", root / "t1", 1, resume=root / "ae", max_steps=1, config=TINY["transformer"])
    return root


def test_training_calls_write_checkpoints_weights_and_summaries(trained):
    for stage in ("ae", "t1"):
        assert {"training.json", "loss.png"} <= {p.name for p in (trained / stage).iterdir()}
    tensors, state = load_checkpoint(trained / "t1")
    assert state["stage"] == "transformer" and state["step"] == 1
    record = json.loads((trained / "t1" / "training.json").read_text())
    assert record["encoding_seconds"]["fill"] > 0 and record["encoding_seconds"]["refresh"] > 0
    assert state["autoencoder_config"]["latents_std"] != [1.0] * 4  # measured on the pool
    assert any(k.startswith("adam.") for k in tensors) and any(k.startswith("ema.text.") for k in tensors)
    weights = trained / "t1" / "reference_latent.safetensors"
    with safe_open(str(weights), "pt") as f:  # one key, no private config keys: the same sha256 in every process
        assert list(f.metadata()) == ["reference"]
        configs = json.loads(f.metadata()["reference"])["configs"]
    assert configs.keys() == {"autoencoder", "transformer"} and not any(k.startswith("_") for c in configs.values() for k in c)
    vae, transformer, encoder = load_latent_reference(path=weights, expected_sha256=None)
    assert vae.config.latents_std == state["autoencoder_config"]["latents_std"]
    # The VAE the transformer learned on is the autoencoder stage's averaged one, rounded as the file holds it.
    averaged = {k[len("ema.autoencoder."):]: v for k, v in load_checkpoint(trained / "ae")[0].items()
                if k.startswith("ema.autoencoder.")}
    assert averaged and all(torch.equal(v.half().float(), averaged[k].half().float()) for k, v in vae.state_dict().items())


def test_resuming_restores_the_state_exactly_and_continues_deterministically(trained):
    train("transformer", trained / "t2", 1, resume=trained / "t1", max_steps=0)
    before, after = load_checkpoint(trained / "t1"), load_checkpoint(trained / "t2")
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert {k: v for k, v in before[1].items() if k != "seconds"} == {k: v for k, v in after[1].items() if k != "seconds"}
    for name in ("a", "b"):
        train("transformer", trained / name, 1, resume=trained / "t1", max_steps=1)
    a, b = load_checkpoint(trained / "a"), load_checkpoint(trained / "b")
    assert a[1]["step"] == 2 and a[1]["rng"] == b[1]["rng"]
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert not torch.equal(a[0]["model.text.positions"], before[0]["model.text.positions"])


def test_the_pool_takes_fresh_clips_every_refresh_every_steps(trained):
    """Refreshing pays a fixed cost per call, so it runs every `refresh_every` steps; counted in
    training steps, so a resumed call refreshes where an unbroken one would."""
    tensors, state = load_checkpoint(trained / "ae")
    state["autoencoder_config"] = state["config"]["autoencoder"]
    config = {**DEFAULTS["transformer"], **TINY["transformer"], "pool": 4, "refresh": 2, "refresh_every": 3}
    stage = TransformerStage(config, torch.device("cpu"), tensors, state)
    rng, generator, pools = np.random.default_rng(0), torch.Generator().manual_seed(0), []
    for step in range(4):
        stage.loss(rng, generator, contextlib.nullcontext(), step)
        pools.append(stage.pool.clone())
    assert [not torch.equal(a, b) for a, b in zip(pools, pools[1:])] == [False, False, True]


def test_stages_refuse_the_wrong_checkpoint(trained, tmp_path):
    with pytest.raises(CheckpointError, match="needs --resume"):
        train("transformer", tmp_path, 1, max_steps=1)
    with pytest.raises(CheckpointError, match="transformer checkpoint"):
        train("autoencoder", tmp_path, 1, resume=trained / "t1", max_steps=1)
    (tmp_path / "part").mkdir()
    shutil.copy(trained / "t1" / "checkpoint-1-of-1.safetensors", tmp_path / "part" / "checkpoint-1-of-2.safetensors")
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path / "part")


def test_a_checkpoint_larger_than_a_shard_is_split_and_read_back_exactly(monkeypatch, tmp_path):
    """What a device call returns is files of at most 16 MiB: the state is packed into shards."""
    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 4096)
    tensors = {f"w{i}": torch.randn(300) for i in range(10)}  # 1,200 bytes each: three to a shard
    paths = checkpoint.save_checkpoint(tmp_path, tensors, {"step": 3})
    assert [p.name for p in paths] == [f"checkpoint-{k}-of-4.safetensors" for k in (1, 2, 3, 4)]
    loaded, state = checkpoint.load_checkpoint(tmp_path)
    assert state == {"step": 3} and loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with pytest.raises(checkpoint.CheckpointError, match="more than a shard holds"):
        checkpoint.save_checkpoint(tmp_path, {"big": torch.zeros(2000)}, {})


def test_loading_refuses_missing_corrupt_and_foreign_weights(trained, tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_latent_reference(path=tmp_path / "absent.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    data = bytearray((trained / "t1" / "reference_latent.safetensors").read_bytes())
    data[-1] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        load_latent_reference(path=corrupt, expected_sha256=sha256(trained / "t1" / "reference_latent.safetensors"))
    foreign = trained / "ae" / "checkpoint-1-of-1.safetensors"
    assert load_file(str(foreign))
    with pytest.raises(WeightsError, match="no model configurations"):
        load_latent_reference(path=foreign, expected_sha256=None)


def test_the_autoencoder_loss_weighs_object_pixels_more():
    """An error on an object's pixels costs `object_weight` times the same error on the dark
    background; with weight 1 it is the plain mean absolute error."""
    clips, _ = make_clips(0, 1)
    objects = clips.amax(1, keepdim=True) > 0
    assert 0 < objects.float().mean() < 0.2
    on_objects, on_background = clips + 0.1 * objects, clips + 0.1 * ~objects
    ratio = object_weighted_l1(on_objects, clips, 10.0) / object_weighted_l1(on_background, clips, 10.0)
    n_obj, n_bg = objects.sum(), (~objects).sum()
    assert torch.isclose(ratio, 10 * n_obj / n_bg, rtol=1e-4)
    torch.testing.assert_close(object_weighted_l1(on_background, clips, 1.0), (on_background - clips).abs().mean())


def test_a_call_that_ends_its_stage_keeps_no_optimizer_state_and_can_be_extended(trained, tmp_path):
    """The last call of a stage writes weights and averages without AdamW's moments (so that a
    device call returns them); a larger total budget resumes it with a fresh optimizer."""
    train("transformer", tmp_path / "end", 0.0001, total_minutes=0.0001, resume=trained / "t1", max_steps=1)
    tensors, ended = load_checkpoint(tmp_path / "end")
    assert ended["optimizer"] is None and not any(k.startswith("adam.") for k in tensors)
    train("transformer", tmp_path / "more", 1, total_minutes=10, resume=tmp_path / "end", max_steps=1)
    tensors, state = load_checkpoint(tmp_path / "more")
    assert state["step"] == ended["step"] + 1 and any(k.startswith("adam.") for k in tensors)
    assert state["warm_start"] == ended["step"]  # the fresh optimizer warms up again


def test_the_autoencoder_loss_sees_the_decoder_before_the_clamp_and_starts_with_quiet_posteriors():
    """`decode` clamps to [-1, 1], where a pixel has no gradient; the loss reads the decoder's
    own output, which equals `decode` wherever it is in range and still has gradient beyond it.
    The posterior's log-variance starts at the configured value, so its noise starts small."""
    from astraea.reference.latent.train import AutoencoderStage, unclamped_decode

    vae = build_autoencoder(TINY_AUTOENCODER)
    with torch.no_grad():  # a decoder that overshoots: the case a clamped loss cannot recover from
        vae.decoder.conv_out.bias.fill_(3.0)
    latents = torch.randn(1, 4, 2, 4, 4, requires_grad=True)
    raw = unclamped_decode(vae, latents)
    clamped = vae.decode(latents).sample
    assert raw.shape == clamped.shape and raw.amax() > 1
    torch.testing.assert_close(raw.clamp(-1, 1), clamped)
    clamped.sum().backward()
    assert latents.grad.abs().sum() == 0  # every pixel saturated: nothing to learn from
    latents.grad = None
    raw.sum().backward()
    assert latents.grad.abs().sum() > 0
    assert not vae.decoder._forward_hooks  # the hook is gone after the call

    stage = AutoencoderStage({**TINY["autoencoder"], "initial_logvar": -6.0}, torch.device("cpu"))
    clips = make_clips(0, 1)[0][:, :, :5, :32, :32]
    logvar = stage.models["autoencoder"].encode(clips).latent_dist.logvar
    assert (logvar - -6.0).abs().max() < 1.0


def test_a_v2_weights_file_serves_the_demo_subject_and_the_search_workload(trained):
    """What the demo, peers.py and `astraea search --model reference-v2 --weights` run: clips
    decoded by the file's own VAE, through the same sampler, on the subject's prompts."""
    from astraea.reference.subjects import load_subject
    from astraea.reference.latent.model import SHIFT
    from astraea.search.models import reference

    weights = trained / "t1" / "reference_latent.safetensors"
    subject = load_subject("reference-v2", path=weights)
    prompts = subject.prompts(1)
    assert subject.latent_shape() == latent_shape(TINY_AUTOENCODER)
    clips = subject.generate(subject.transformer, prompts, 2)
    assert clips.shape == (1, 3, FRAMES, SIZE, SIZE) and clips.abs().max() <= 1
    assert set(subject.score(clips, prompts)) >= set(CHECKS) | {"accuracy", "mismatched"}
    workload = reference("reference-v2", num_steps=2, path=weights)
    trajectory = workload.generate(workload.model, seed=0)
    assert trajectory.latent.shape == (1, *subject.latent_shape()) and workload.shift == SHIFT
    assert workload.prediction == "velocity"
    assert workload.decoder(torch.zeros(1, 4, 2, 4, 4)).shape == (1, 3, 5, 32, 32)  # its VAE: 4x in time, 8x in space
    with pytest.raises(ValueError, match="only taken for reference-v2"):
        load_subject("reference", path=weights)


def test_the_shipped_weights_are_the_recorded_ones_and_trained():
    """The shipped file is the one its training record names and loads with that checksum; its
    VAE reconstructs a clip far better than an untrained one could, and its transformer's
    velocity at mid-noise is far closer to the true velocity than predicting zero."""
    from astraea.reference.latent.model import WEIGHTS, WEIGHTS_SHA256
    from astraea.reference.model import ASSETS

    record = json.loads((ASSETS / "training_v2_transformer.json").read_text())
    assert record["weights_sha256"] == WEIGHTS_SHA256 == sha256(WEIGHTS)
    vae, transformer, encoder = load_latent_reference()
    clips, prompts = make_clips(5, 1)
    clips = clips[:, :, :5, :128, :128]  # 2 x 16 x 16 latents (the VAE trained on such windows): a fraction of the cost
    with torch.no_grad():
        x0 = encode(vae, clips)
        psnr = 10 * torch.log10(4 / (decode(vae, x0) - clips).square().mean())
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        velocity = transformer(hidden_states=torch.lerp(x0, noise, 0.5), timestep=torch.tensor([500.0]),
                               encoder_hidden_states=encoder.encode([prompts[0].text]), return_dict=False)[0]
    assert psnr > 18, psnr
    assert (velocity - (noise - x0)).square().mean() < 0.5 * (noise - x0).square().mean()
