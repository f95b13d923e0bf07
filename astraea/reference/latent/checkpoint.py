"""Training state in safetensors shards of at most 16 MiB each.

A training call runs on a machine whose results come back as at most eight files of 16 MiB,
and the next call resumes from them; so the state (float32 weights, their average, AdamW's
moments, plus JSON for step, clock, loss curve and the numpy generator) is packed greedily
into `checkpoint-K-of-N.safetensors` files under a byte limit, the JSON in the metadata of
the first. Nothing is rounded: loading gives back exactly what was saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SHARD_BYTES = 31 * 2**19  # 15.5 MiB of tensor bytes per shard; the rest of 16 MiB holds the header
PATTERN = "checkpoint-*-of-*.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing, incomplete or of another stage."""


def save_checkpoint(directory: str | Path, tensors: dict[str, torch.Tensor], state: dict) -> list[Path]:
    """Write `tensors` and the JSON-able `state` as shards in `directory`; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob(PATTERN):
        old.unlink()
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > SHARD_BYTES:
            raise CheckpointError(f"tensor {name} has {nbytes} bytes, more than a shard holds ({SHARD_BYTES})")
        if size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().to("cpu").contiguous()
        size += nbytes
    paths = [directory / f"checkpoint-{k + 1}-of-{len(shards)}.safetensors" for k in range(len(shards))]
    for k, (path, shard) in enumerate(zip(paths, shards)):
        save_file(shard, str(path), metadata={"state": json.dumps(state)} if k == 0 else {})
    return paths


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and state that `save_checkpoint` wrote to `directory`."""
    directory = Path(directory)
    paths = sorted(directory.glob(PATTERN), key=lambda p: int(p.name.split("-")[1]))
    if not paths:
        raise CheckpointError(f"no {PATTERN} in {directory}: nothing to resume from")
    count = int(paths[0].stem.split("-")[-1])
    if [p.name for p in paths] != [f"checkpoint-{k + 1}-of-{count}.safetensors" for k in range(count)]:
        raise CheckpointError(f"checkpoint {directory} is incomplete: has {[p.name for p in paths]}, expected {count} shards")
    with safe_open(str(paths[0]), "pt") as f:
        state = json.loads(f.metadata()["state"])
    tensors = {}
    for path in paths:
        tensors |= load_file(str(path))
    return tensors, state
