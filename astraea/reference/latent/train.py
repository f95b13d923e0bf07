"""Train reference model v2 in resumable calls bounded by wall time.

    python -m astraea.reference.latent.train --stage autoencoder --minutes 6 --out DIR
    python -m astraea.reference.latent.train --stage transformer --minutes 7 --total-minutes 14 --resume AE_DIR --out DIR
    python -m astraea.reference.latent.train --stage transformer --minutes 7 --resume DIR --out DIR2

Stage `autoencoder` trains the Wan VAE on random 17x128x128 windows of freshly rendered clips
(it is convolutional, so windows teach it the full clip at an eighth of the cost): an L1 in
which the objects' pixels weigh more (they are a few percent of the frame, and a plain L1 is
met by the background alone), plus an L1 on spatial gradients (edges are what blur first), plus
a small KL, which keeps the latents smooth enough to be generated. The loss reads the decoder's
output before `decode`'s final clamp to [-1, 1] (a clamped pixel has no gradient: a decoder that
overshoots stays stuck), and the posterior's log-variance starts at `initial_logvar`, not 0 (a
fresh encoder's unit-variance noise drowns its means, and the decoder then learns the blur that
lost the first training's objects). The call ends by checking
whole reconstructed clips with the semantic checks: the ceiling of what generation can pass.
Stage `transformer` freezes the VAE at its float16 weights (those a weights file holds),
measures the latent statistics on a pool of encoded clips, and trains the transformer
and prompt encoder with rectified flow: x_t = (1 - t) x0 + t noise, the velocity noise - x0 as
target, t logit-normal then shifted as in sampling, one prompt in ten empty for guidance. The
pool is partly re-encoded from fresh clips as it trains: `refresh` clips every `refresh_every`
steps, so encoding costs a fraction of a step. On an H200 (benchmarks/NOTES.md) 8 clips every
step took 147 ms a step and 2 clips every step 107 ms, beside 66 ms of training: most of a refresh
is a fixed cost, whatever the number of clips. So 8 clips every 4th step (the same turnover, a clip
drawn about 16 times before it is replaced) should buy about 1.7 times the steps per minute of 2
every step (predicted from those figures, not yet measured).

Learning rate: warm-up, then constant, then a linear decay to zero over the last fifth of the
stage's total budget, counted in training seconds across calls (saved in the checkpoint).
A schedule over each call alone would re-warm and re-anneal every call: a saw-tooth that
spends half of each call at low rates and kicks the averaged weights at every restart. A
cosine over the total needs the total fixed in advance; with a constant phase, extending
`--total-minutes` on resume changes nothing already done, and any call can be made the last
by ending the total with it. Every call writes its checkpoint shards, training.json and
loss.png to DIR; a transformer call also writes reference_latent.safetensors (the averaged
weights of all three models in float16, what `load_latent_reference` reads). A call that ends
its stage keeps no optimizer state; extending the stage starts AdamW afresh, warmed up again.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import checks, scenes
from ..evaluate import score
from ..train import plot, update_averages
from .autoencoder import CONFIG as AUTOENCODER, build_autoencoder, encode, fit_stats
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .model import CONFIG as TRANSFORMER, SHIFT, build_transformer, save_weights, shifted
from .text import tokenize

DEFAULTS = {
    "autoencoder": dict(autoencoder=AUTOENCODER, batch_size=16, frames=17, size=128, lr=5e-4, warmup=100, ema=0.999,
                        edge=0.5, kl=1e-4, object_weight=10.0, initial_logvar=-6.0, validation_clips=32, checked_clips=8, log_every=50),
    "transformer": dict(transformer=TRANSFORMER, batch_size=32, frames=scenes.FRAMES, size=scenes.SIZE, pool=2048,
                        refresh=8, refresh_every=4, lr=3e-4, warmup=200, ema=0.999, text_dropout=0.1, shift=SHIFT,
                        validation_clips=64, log_every=50),
}
DECAY = 0.2  # final fraction of the stage budget over which the learning rate falls to zero
VALIDATION_SEED = 2**31 - 1


def learning_rate(base: float, step: int, warmup: int, progress: float) -> float:
    """Warm-up over `warmup` steps, constant, then linear to zero over the last DECAY of the budget."""
    return base * min(1.0, (step + 1) / warmup) * min(1.0, max(0.0, (1.0 - progress) / DECAY))


def window(clips: torch.Tensor, frames: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """One random window of `frames` x `size` x `size` of a batch of clips (the whole clip when it is that size)."""
    f0 = rng.integers(0, scenes.FRAMES - frames + 1)
    y0, x0 = rng.integers(0, scenes.SIZE - size + 1, 2)
    return clips[:, :, f0 : f0 + frames, y0 : y0 + size, x0 : x0 + size]


def clips_and_ids(rng, n, config, device):
    clip_scenes = scenes.sample_scenes(rng, n)
    clips = window(scenes.render(clip_scenes, device), config["frames"], config["size"], rng)
    return clips, tokenize([p.text for p in clip_scenes.prompts()]).to(device)


def object_weighted_l1(recon: torch.Tensor, clips: torch.Tensor, object_weight: float) -> torch.Tensor:
    """Mean absolute error over clips [B, 3, F, H, W] in which object pixels (the only ones with
    a channel above 0: palette colours) weigh `object_weight` times a background pixel. Objects
    are a few percent of a frame, and a plain L1 is met by the background alone: the first
    training's reconstructions kept no palette colour."""
    weight = 1 + (object_weight - 1) * (clips.amax(1, keepdim=True) > 0)
    return ((recon - clips).abs() * weight).sum() / (weight.sum() * clips.shape[1])


def unclamped_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """`vae.decode(latents)` as diffusers runs it (frame by frame, with its feature cache), but
    the decoder's own output, before the final clamp to [-1, 1]."""
    frames = []
    handle = vae.decoder.register_forward_hook(lambda module, args, out: frames.append(out))
    try:
        vae.decode(latents)
    finally:
        handle.remove()
    return torch.cat(frames, 2)


class AutoencoderStage:
    """Reconstruction of clip windows through the VAE's encode and decode."""

    def __init__(self, config, device, tensors=None, state=None):
        self.config, self.device = config, device
        vae = build_autoencoder(config["autoencoder"])
        with torch.no_grad():  # the quantiser's second half of channels is the posterior's log-variance
            vae.quant_conv.bias[vae.config.z_dim:] = config.get("initial_logvar", 0.0)
        self.models = {"autoencoder": vae.to(device)}

    def loss(self, rng, generator, autocast, step):
        clips, _ = clips_and_ids(rng, self.config["batch_size"], self.config, self.device)
        vae = self.models["autoencoder"]
        with autocast:
            posterior = vae.encode(clips).latent_dist
            recon = unclamped_decode(vae, posterior.sample(generator)).float()
        edge = sum((torch.diff(recon, dim=d) - torch.diff(clips, dim=d)).abs().mean() for d in (-1, -2))
        kl = 0.5 * (posterior.mean.float().square() + posterior.var.float() - 1 - posterior.logvar.float()).mean()
        l1 = object_weighted_l1(recon, clips, self.config.get("object_weight", 1.0))
        return l1 + self.config["edge"] * edge + self.config["kl"] * kl

    def frozen(self):
        return {}, {}

    @torch.no_grad()
    def finish(self, averages, out, autocast, metadata) -> dict:
        rng = np.random.default_rng(VALIDATION_SEED)
        clips, _ = clips_and_ids(rng, self.config["validation_clips"], self.config, self.device)
        vae = averages["autoencoder"].eval()
        with autocast:
            recon = torch.cat([vae(c[None]).sample.float() for c in clips])
        mse = (recon - clips).square().mean().item()
        record = {"validation_l1": (recon - clips).abs().mean().item(), "validation_psnr": 10 * np.log10(4 / mse)}
        if self.config.get("checked_clips", 0):  # whole clips: do the checks still pass on what it decodes?
            clips, prompts = scenes.make_clips(VALIDATION_SEED, self.config["checked_clips"], self.device)
            with autocast:
                recon = torch.cat([vae(c[None]).sample.float() for c in clips])
            record["reconstruction_checks"] = score(recon.cpu(), prompts, checks.check_clip)
        return record


class Stopwatch:
    """Seconds spent in named parts of a call. On a GPU the parts are timed by CUDA events, read
    once at the end, so timing them adds no host sync to a training step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: dict[str, list] = {}

    def __call__(self, part: str, work):
        start, out = self._now(), work()
        self.spans.setdefault(part, []).append((start, self._now()))
        return out

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            length = lambda a, b: a.elapsed_time(b) / 1000  # noqa: E731
        else:
            length = lambda a, b: b - a  # noqa: E731
        return {part: round(sum(length(a, b) for a, b in spans), 3) for part, spans in self.spans.items()}


class TransformerStage:
    """Rectified flow on normalised latents of a frozen VAE, from a pool refreshed at every step."""

    def __init__(self, config, device, tensors, state):
        self.config, self.device = config, device
        transformer, encoder = build_transformer(config["transformer"])
        self.models = {"transformer": transformer.to(device), "text": encoder.to(device)}
        self.vae = build_autoencoder(state["autoencoder_config"])
        if state["stage"] == "autoencoder":  # the averaged weights, rounded as a weights file holds them
            weights = {k[len("ema.autoencoder."):]: v.half() for k, v in tensors.items() if k.startswith("ema.autoencoder.")}
        else:
            weights = {k[len("autoencoder."):]: v for k, v in tensors.items() if k.startswith("autoencoder.")}
        self.vae.load_state_dict({k: v.float() for k, v in weights.items()})
        self.vae.to(device).eval().requires_grad_(False)
        self.measure = state["stage"] == "autoencoder"  # statistics not measured yet
        self.pool = self.ids = None
        # Seconds of this call spent rendering and encoding clips (filling the pool, refreshing
        # it): what a step costs beyond the transformer's own training.
        self.encoding = Stopwatch(device)

    def _encode(self, rng, n, autocast):
        clips, ids = clips_and_ids(rng, n, self.config, self.device)
        with torch.no_grad(), autocast:
            return encode(self.vae, clips), ids

    def fill(self, rng, autocast):
        """Encode the pool; on the stage's first call, measure the latent statistics on it."""
        parts = [self._encode(rng, min(16, self.config["pool"] - k), autocast) for k in range(0, self.config["pool"], 16)]
        self.pool, self.ids = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if self.measure:
            self.pool, self.measure = fit_stats(self.vae, self.pool), False

    def loss(self, rng, generator, autocast, step):
        if self.pool is None:
            self.encoding("fill", lambda: self.fill(rng, autocast))
        config = self.config
        if step % config.get("refresh_every", 1) == 0:  # checkpoints older than the option refreshed every step
            fresh = rng.choice(config["pool"], config["refresh"], replace=False)
            self.pool[fresh], self.ids[fresh] = self.encoding("refresh", lambda: self._encode(rng, len(fresh), autocast))
        pick = torch.as_tensor(rng.choice(config["pool"], config["batch_size"], replace=False), device=self.device)
        ids = self.ids[pick] * torch.as_tensor(rng.random(len(pick)) >= config["text_dropout"], device=self.device)[:, None]
        return self.flow_loss(self.models, self.pool[pick], ids, generator, autocast)

    def flow_loss(self, models, x0, ids, generator, autocast):
        n = len(x0)
        t = shifted(torch.sigmoid(torch.randn(n, generator=generator, device=self.device)), self.config["shift"])
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        x_t = torch.lerp(x0, noise, t.view(-1, 1, 1, 1, 1))
        with autocast:
            velocity = models["transformer"](hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=models["text"](ids),
                                             return_dict=False)[0]
        return (velocity.float() - (noise - x0)).square().mean()

    def frozen(self):
        tensors = {f"autoencoder.{k}": v.half() for k, v in self.vae.state_dict().items()}
        return tensors, {"autoencoder_config": json.loads(json.dumps(dict(self.vae.config), default=list))}

    @torch.no_grad()
    def finish(self, averages, out, autocast, metadata) -> dict:
        rng = np.random.default_rng(VALIDATION_SEED)
        generator = torch.Generator(self.device).manual_seed(VALIDATION_SEED)
        models = {name: m.eval() for name, m in averages.items()}
        losses = []
        for k in range(0, self.config["validation_clips"], 16):
            x0, ids = self._encode(rng, min(16, self.config["validation_clips"] - k), autocast)
            losses.append(self.flow_loss(models, x0, ids, generator, autocast).item() * len(x0))
        sha = save_weights(out / "reference_latent.safetensors", self.vae, models["transformer"], models["text"], metadata)
        return {"validation_loss": sum(losses) / self.config["validation_clips"], "weights_sha256": sha,
                "encoding_seconds": self.encoding.seconds()}


STAGES = {"autoencoder": AutoencoderStage, "transformer": TransformerStage}


def train(stage: str, out: str | Path, minutes: float, total_minutes: float | None = None, resume: str | Path | None = None,
          seed: int = 0, device: str | torch.device = "cpu", max_steps: int | None = None, config: dict | None = None) -> dict:
    """One training call; returns the record it writes to `out`/training.json.

    `config` overrides the stage's DEFAULTS for a new stage; a resumed stage keeps its own.
    """
    out, device = Path(out), torch.device(device)
    tensors, state = load_checkpoint(resume) if resume else ({}, {"stage": None})
    if stage == "transformer" and state["stage"] is None:
        raise CheckpointError("the transformer stage needs --resume: a checkpoint of the autoencoder stage or its own")
    if stage == "autoencoder" and state["stage"] == "transformer":
        raise CheckpointError(f"{resume} is a transformer checkpoint; the autoencoder stage cannot resume from it")
    continuing = state["stage"] == stage
    if continuing:
        config = state["config"]
    else:
        config = {**DEFAULTS[stage], **(config or {})}
        if stage == "transformer":
            state["autoencoder_config"] = state["config"]["autoencoder"]
    torch.manual_seed(seed)
    runner = STAGES[stage](config, device, tensors, state)
    averages = {name: copy.deepcopy(m).requires_grad_(False) for name, m in runner.models.items()}
    params = [p for m in runner.models.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config["lr"], betas=(0.9, 0.99), weight_decay=0.01)
    rng = np.random.default_rng(seed)
    step, seconds, curve, warm_start = 0, 0.0, [], 0  # warm_start: the optimizer's first step
    if continuing:
        for name, module in runner.models.items():
            module.load_state_dict({k[len(f"model.{name}."):]: v for k, v in tensors.items() if k.startswith(f"model.{name}.")})
            averages[name].load_state_dict({k[len(f"ema.{name}."):]: v for k, v in tensors.items() if k.startswith(f"ema.{name}.")})
        rng.bit_generator.state = state["rng"]
        step, seconds, curve = state["step"], state["seconds"], state["curve"]
        if state["optimizer"] is not None:
            optimizer.load_state_dict(_optimizer_state(tensors, state["optimizer"]))
            warm_start = state["warm_start"]
        else:  # a finished stage, extended: AdamW starts afresh, so it warms up again
            warm_start = step
    total = 60 * (total_minutes if total_minutes is not None else state["total_minutes"] if continuing else minutes)
    for model in runner.models.values():
        model.train()
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    window_loss, logged, first = torch.zeros((), device=device), 0, step
    start = time.perf_counter()
    while (call := time.perf_counter() - start) < 60 * minutes and seconds + call < total and step - first != max_steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config["lr"], step - warm_start, config["warmup"], (seconds + call) / total)
        generator = torch.Generator(device).manual_seed(int(rng.integers(2**62)))
        loss = runner.loss(rng, generator, autocast, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        update_averages(((averages[name], m) for name, m in runner.models.items()), min(config["ema"], (1 + step) / (10 + step)))
        window_loss += loss.detach()
        logged += 1
        step += 1
        if logged == config["log_every"]:
            curve.append((step, round(seconds + time.perf_counter() - start, 1), window_loss.item() / logged))
            window_loss.zero_()
            logged = 0
            print(f"{stage} step {step}  {curve[-1][1]:.0f}s  loss {curve[-1][2]:.4f}  lr {optimizer.param_groups[0]['lr']:.2e}", flush=True)
    seconds += time.perf_counter() - start

    out.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "config": config, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "steps": step, "clips_seen": step * config["batch_size"],
              "seconds": round(seconds, 1), "total_minutes": total / 60, "final_loss": curve[-1][2] if curve else None}
    record |= runner.finish(averages, out, autocast, {"steps": step, "seconds": round(seconds, 1)})
    frozen, extra = runner.frozen()
    checkpoint = {f"model.{name}.{k}": v for name, m in runner.models.items() for k, v in m.state_dict().items()}
    checkpoint |= {f"ema.{name}.{k}": v for name, m in averages.items() for k, v in m.state_dict().items()}
    # A call that ends the stage's budget keeps no optimizer state: its learning rate has fallen
    # to zero, and without AdamW's moments the checkpoint and the weights file fit what a device
    # call returns (64 MiB). Extending the stage (a larger --total-minutes) starts AdamW afresh.
    finished = seconds >= total
    optimizer_tensors, optimizer_state = ({}, None) if finished else _flatten_optimizer(optimizer.state_dict())
    shards = save_checkpoint(out, checkpoint | optimizer_tensors | frozen, {
        "stage": stage, "config": config, "step": step, "seconds": seconds, "total_minutes": total / 60,
        "curve": curve, "rng": rng.bit_generator.state, "optimizer": optimizer_state, "warm_start": warm_start, **extra})
    record["checkpoint_shards"] = [(p.name, p.stat().st_size) for p in shards]
    (out / "training.json").write_text(json.dumps(record | {"curve": curve}, indent=1))
    plot(curve, out / "loss.png", "reconstruction loss" if stage == "autoencoder" else "velocity loss", f"reference v2 {stage}")
    print(json.dumps(record, indent=1))
    return record


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW's per-parameter tensors as named tensors, and the rest as JSON."""
    tensors = {f"adam.{i}.{key}": value for i, entry in state["state"].items() for key, value in entry.items()}
    return tensors, {"param_groups": state["param_groups"], "params": list(state["state"])}


def _optimizer_state(tensors: dict[str, torch.Tensor], saved: dict) -> dict:
    state = {i: {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"adam.{i}.")} for i in saved["params"]}
    return {"state": state, "param_groups": saved["param_groups"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=tuple(STAGES), required=True)
    parser.add_argument("--minutes", type=float, required=True, help="wall-time budget of this call's training loop")
    parser.add_argument("--total-minutes", type=float, default=None,
                        help="the stage's budget over all its calls (default: the checkpoint's, or --minutes)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", type=Path, default=None, help="checkpoint directory of a previous call")
    parser.add_argument("--max-steps", type=int, default=None, help="stop earlier, after this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    train(args.stage, args.out, args.minutes, args.total_minutes, args.resume, args.seed, args.device, args.max_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
