"""`astraea.compile_blocks` against `torch.compile(model, backend="astraea")` on the GPU: the
same schedule (dense, sparse, skipped and sparse steps) on the Wan2.1-1.3B shape at 33 frames,
bf16; are the per-call records equal, and how far apart are the final latents? (On the CPU in
fp32 the two are bit-identical: tests/test_blockwise.py; on the GPU they lower different graphs.)

    python benchmarks/blocks_against_whole.py
"""

from __future__ import annotations

import logging
import warnings

import torch

import astraea
from astraea.search.models import random_wan

SCHEDULE = [1.0, 0.5, 0.0, 0.25, 0.5, 1.0]


def run(blockwise: bool) -> tuple[torch.Tensor, list]:
    """The second generation's latent and its call records (the first compiles)."""
    torch._dynamo.reset()
    workload = random_wan("wan2.1-1.3b", frames=9, height=60, width=104, num_steps=len(SCHEDULE),
                          dtype=torch.bfloat16, device="cuda")
    if blockwise:
        backend = astraea.compile_blocks(workload.model, schedule=SCHEDULE)
        fn = workload.model
    else:
        backend = astraea.backend(schedule=SCHEDULE)
        fn = torch.compile(workload.model, backend=backend)
    workload.generate(fn, seed=0)
    latent = workload.generate(fn, seed=0).latent
    records = [(r.step, r.branch, r.budget, r.tokens) for r in backend.runners[0].records][-2 * len(SCHEDULE):]
    return latent, records


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/blocks_against_whole.py needs a CUDA device")
    warnings.simplefilter("ignore")
    logging.getLogger("astraea").setLevel(logging.WARNING)
    whole, whole_records = run(blockwise=False)
    blocks, block_records = run(blockwise=True)
    print("records equal:", whole_records == block_records, block_records)
    error = float((blocks.float() - whole.float()).norm() / whole.float().norm())
    print(f"relative L2, compile_blocks against torch.compile: {error:.4f}")


if __name__ == "__main__":
    main()
