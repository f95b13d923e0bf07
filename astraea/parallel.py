"""Several GPUs: diffusers' context parallelism (Ulysses) around an astraea-compiled model,
and classifier-free guidance with its two branches on two ranks.

    torchrun --nproc-per-node 2 my_script.py
        dist.init_process_group("nccl")
        mesh = astraea.parallel.enable(transformer, ulysses=2)
        model = torch.compile(transformer, backend="astraea", options={"schedule": 0.5})

diffusers shards the tokens at the first block and the RoPE tables, and gathers the output;
astraea's analysis sees each rank's shard (`passes/ulysses.py`), so every rank selects the
same number of tokens from its own shard, keeps its caches for its shard only, and sends
only its selected query rows through the all-to-all. With `cfg=2` the ranks also split into
two halves that run the conditional and the unconditional branch (`guidance`).
"""

from __future__ import annotations

import inspect
import logging
from unittest import mock

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import ConfigError


def enable(model: torch.nn.Module, ulysses: int | None = None, cfg: int = 1) -> DeviceMesh:
    """Shard `model`'s tokens over `ulysses` ranks (default: all ranks / cfg) with diffusers'
    context parallelism; returns the ("cfg", "ring", "ulysses") device mesh of the job.

    Needs `torch.distributed` initialised (torchrun), and a diffusers model with a context
    parallel plan. Refused, before anything changes, when the head count does not split.
    """
    from diffusers import ContextParallelConfig

    if not dist.is_initialized():
        raise ConfigError("astraea.parallel.enable: initialise torch.distributed first (e.g. run under torchrun)")
    world = dist.get_world_size()
    if cfg not in (1, 2) or world % cfg:
        raise ConfigError(f"cfg must be 1 or 2 and divide the {world} ranks, got {cfg}")
    ulysses = ulysses or world // cfg
    if ulysses * cfg != world:
        raise ConfigError(f"ulysses ({ulysses}) x cfg ({cfg}) must equal the world size ({world})")
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if heads is not None and heads % ulysses:
        fits = [d for d in range(1, heads + 1) if heads % d == 0 and world % d == 0]
        raise ConfigError(
            f"{heads} attention heads do not split over a Ulysses degree of {ulysses}; use a degree in {fits} "
            f"(with cfg=2 for the remaining factor of 2, where it fits)"
        )
    device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device, (cfg, 1, ulysses), mesh_dim_names=("cfg", "ring", "ulysses"))
    if ulysses == 1:
        return mesh  # guidance split over the ranks only
    if getattr(model, "_cp_plan", None) is None:
        raise ConfigError(f"{type(model).__name__} has no context-parallel plan in diffusers")
    config = ContextParallelConfig(ulysses_degree=ulysses, mesh=mesh["ring", "ulysses"])
    # diffusers places each rank on `rank % accelerator count`, which divides by zero on a
    # CPU-only host (gloo); there every rank runs on the one CPU device.
    count = torch.accelerator.device_count() or 1
    with mock.patch("torch.accelerator.device_count", return_value=count):
        model.enable_parallelism(config=config)
    _resolve_hook_signatures(model)
    _quiet_split_warning()
    return mesh


def _quiet_split_warning() -> None:
    """diffusers' split hook calls `logger.warning_once` whenever an input has no axis to
    split (Wan's 1-D timestep, which is meant to be shared by every rank). Only transformers
    defines `warning_once`, so without it the call fails, and with it dynamo breaks the
    graph there. That logger's `warning_once` becomes a no-op that dynamo is told to skip.
    (torch 2.11 then logs, harmlessly, that it cannot write this config entry in its compile
    metrics; torch 2.13 leaves the entry out of them.)"""
    logging.getLogger("diffusers.hooks.context_parallel").warning_once = _ignore
    torch._dynamo.config.ignore_logging_functions.add(_ignore)


def _ignore(*args, **kwargs) -> None:
    return None



def _resolve_hook_signatures(model: torch.nn.Module) -> None:
    """Have diffusers' split hooks look up their modules' forward signatures now.

    They do it lazily, with `inspect.signature`, on the first call; dynamo cannot trace that
    and would break the graph at every block of a model that was compiled before it ran.
    """
    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            meta = getattr(hook, "module_forward_metadata", None)
            if isinstance(hook, ContextParallelSplitHook) and meta is not None and meta.cached_parameter_indices is None:
                names = list(inspect.signature(meta._cls.forward).parameters)[1:]  # after `self`
                meta.cached_parameter_indices = {name: i for i, name in enumerate(names)}


def guidance(predict, cond, uncond, scale: float, mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Classifier-free guidance, `uncond + scale * (cond - uncond)`.

    `predict(context)` runs the model. Without a mesh, or with a "cfg" dimension of 1, both
    branches run here in turn; otherwise the first half of the ranks runs the conditional
    branch and the second half the unconditional one, and the two predictions are exchanged.
    """
    if mesh is None or mesh["cfg"].size() == 1:
        c, u = predict(cond), predict(uncond)
    else:
        group = mesh["cfg"].get_group()
        mine = predict(cond if mesh["cfg"].get_local_rank() == 0 else uncond).contiguous()
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine, group=group)
        c, u = both
    return torch.lerp(u, c, scale)  # u + scale * (c - u)
