"""Does astraea's reading of `flex_attention` as SDPA hold against flex's own GPU kernel?

On the CPU flex runs its reference, which reads the mask function alone; on a GPU, compiled, its
kernel also skips every block the block mask does not list (`astraea/passes/flex_attention.py`
trusts the block lists only where they cannot leave out what the mask keeps). This compares, on
CUDA, each model compiled by Inductor (flex's kernel), astraea at budget 1.0 (SDPA in its
place) and the model run eagerly (flex's reference, the functions on every pair): Wan (tiny) on
diffusers' "flex" backend, and the generated test DiT with a flex block mask
(`create_block_mask`). Inductor's CPU lowering of flex fails on these tiny shapes, so this is a
GPU check; it prints one line per model with the three gaps, after checking the op astraea puts
in flex's place where a mask differs between queries.

    python -m tests.flex_kernel_check
"""

from __future__ import annotations

import torch

import astraea
from tests.generated import GeneratedDiT, Knobs, example_inputs
from tests.models import wan


def cases(device: str):
    """(name, a call of the model given a compiled form of it, the model)."""
    family = wan()
    family.model.set_attention_backend("flex")
    model = family.model.to(device)
    x, t = torch.randn(family.latent_shape, device=device), torch.tensor([500.0], device=device)
    text = family.conditions[0].to(device)
    yield "Wan on the flex backend", lambda f: family.call(f, x, t, text), model
    k = Knobs(flex=True, score_mask=True)
    dit = GeneratedDiT(k).eval().to(device)
    inputs = [a.to(device) for a in example_inputs(k)]
    yield "generated DiT, flex block mask", lambda f: f(*inputs), dit


def per_query_mask_gaps(keys: int, queries: int = 24, heads: int = 2, dim: int = 16) -> tuple[float, float]:
    """max |out - reference|, max |lse - reference| of `astraea::sparse_attention` on the GPU with a
    bool mask that differs between queries (what a flex block mask becomes), its last key masked:
    the path through PyTorch's memory-efficient kernel with a bias, against float64 on the CPU."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g) for n in (queries, keys, keys))
    mask = (torch.arange(keys) < keys - 1).expand(1, heads, queries, keys)
    out, lse = torch.ops.astraea.sparse_attention(q.cuda(), k.cuda(), v.cuda(), scale=dim**-0.5, attn_mask=mask.cuda())
    scores = (q.double() @ k.double().transpose(-2, -1)) * dim**-0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    reference = scores.softmax(-1) @ v.double()
    return float((out.cpu().double() - reference).abs().max()), float((lse.cpu().double() - scores.logsumexp(-1)).abs().max())


@torch.no_grad()
def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("needs a GPU: on the CPU flex_attention runs its reference, not its kernel")
    for keys in (5, 24):
        out_gap, lse_gap = per_query_mask_gaps(keys)
        print(f"astraea::sparse_attention, a per-query mask over {keys} keys: max |out - fp64| {out_gap:.3g}, "
              f"max |lse - fp64| {lse_gap:.3g}", flush=True)
    for name, call, model in cases("cuda"):
        eager = call(model)  # flex's reference: the score and mask functions on every pair
        torch._dynamo.reset()
        kernel = call(torch.compile(model))
        torch._dynamo.reset()
        be = astraea.backend(schedule=1.0)
        out = call(torch.compile(model, backend=be))
        report = be.reports[0]
        gaps = {"astraea - flex kernel": out - kernel, "astraea - eager": out - eager, "flex kernel - eager": kernel - eager}
        print(f"{name}: {report.num_sparse_blocks} of {report.num_blocks} blocks sparse; max |output| "
              f"{float(eager.abs().max()):.3g}; " + ", ".join(f"max |{k}| {float(v.abs().max()):.3g}"
                                                         for k, v in gaps.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
