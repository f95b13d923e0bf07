"""Does astraea's reading of `flex_attention` as SDPA hold against flex's own GPU kernel?

On the CPU flex runs its reference, which reads the mask function alone; on a GPU, compiled, its
kernel also skips every block the block mask does not list (`astraea/passes/flex_attention.py`
trusts the block lists only where they cannot leave out what the mask keeps). This compares, on
CUDA, each model compiled by Inductor (flex's kernel), astraea at budget 1.0 (SDPA in its
place) and the model run eagerly (flex's reference, the functions on every pair): Wan (tiny) on
diffusers' "flex" backend, and the generated test DiT with a flex block mask
(`create_block_mask`). Inductor's CPU lowering of flex fails on these tiny shapes, so this is a
GPU check; it prints one line per model with the three gaps.

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


@torch.no_grad()
def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("needs a GPU: on the CPU flex_attention runs its reference, not its kernel")
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
