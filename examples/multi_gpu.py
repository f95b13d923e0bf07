"""Generate with astraea on several GPUs (or CPU processes), inside diffusers' context parallelism.

    torchrun --nproc-per-node 2 examples/multi_gpu.py                 # Ulysses over 2 ranks
    torchrun --nproc-per-node 2 examples/multi_gpu.py --cfg 2         # one guidance branch per rank
    torchrun --nproc-per-node 4 examples/multi_gpu.py --cfg 2         # Ulysses 2 x guidance 2

Uses the shipped reference model, so it runs offline; on a machine without GPUs the ranks
are CPU processes talking through gloo. The ranks generate the same clips twice, with the
engine alone (dense) and with astraea, and rank 0 prints the time of each, how close the
sparse clips stay to the dense ones, and how well each set follows its prompts.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import astraea
import astraea.parallel
from astraea.reference.evaluate import evaluation_prompts, score
from astraea.reference.model import generate, load_reference
from astraea.search.fidelity import compare


def clips_and_seconds(backend, args, prompts) -> tuple[torch.Tensor, float]:
    """One generation of the prompts on a freshly parallelised reference model."""
    torch._dynamo.reset()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    transformer, encoder = load_reference(device=device)
    mesh = astraea.parallel.enable(transformer, cfg=args.cfg)
    model = torch.compile(transformer, backend=backend)
    embeds, negative = encoder.encode([p.text for p in prompts]), encoder.encode([""])
    generate(model, embeds, negative, args.steps, args.guidance, args.seed, mesh=mesh)  # compiles
    start = time.perf_counter()
    clips = generate(model, embeds, negative, args.steps, args.guidance, args.seed, mesh=mesh)
    return clips.cpu(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", type=int, default=1, choices=(1, 2), help="split the guidance branches over the ranks")
    parser.add_argument("--schedule", type=float, default=0.5, help="budget of the steps after the dense ones")
    parser.add_argument("--full-steps", type=int, default=6, help="first steps that run dense")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    prompts = evaluation_prompts(args.prompts)
    dense, dense_s = clips_and_seconds("inductor" if torch.cuda.is_available() else "eager", args, prompts)
    config = astraea.AstraeaConfig(schedule=args.schedule, full_steps=args.full_steps)
    sparse, sparse_s = clips_and_seconds(astraea.backend(config), args, prompts)
    if dist.get_rank() == 0:
        fidelity = compare(sparse, dense)
        print(f"{dist.get_world_size()} ranks (guidance split {args.cfg}), {args.steps} steps, schedule {args.schedule} "
              f"after {args.full_steps} dense steps")
        print(f"dense {dense_s:.1f} s, astraea {sparse_s:.1f} s: {dense_s / sparse_s:.2f}x")
        print(f"astraea against dense: PSNR {fidelity.psnr:.2f} dB, SSIM {fidelity.ssim:.3f}")
        print(f"prompt accuracy: dense {score(dense, prompts)['accuracy']:.3f}, astraea {score(sparse, prompts)['accuracy']:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
