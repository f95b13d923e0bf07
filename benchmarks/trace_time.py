"""How long dynamo takes to trace a Wan transformer three ways, and what astraea's analysis makes
of one block traced on its own: the measurements behind tracing one block, not the model.

- the whole model (what `torch.compile(model, backend="astraea")` traces today);
- one block, as diffusers' `compile_repeated_blocks()` traces it (every block reuses the trace);
- the whole model with the block class's forward marked `torch.compiler.nested_compile_region`;
- then astraea's two ways in, trace and analysis and rewrite included (lowered "eager", as on a
  CPU): `torch.compile(model, backend="astraea")` and `astraea.compile_blocks(model)`.

Each is traced with the "eager" backend (no lowering), on 30 blocks of small width: the trace's
cost depends on the code traced, not on the tensors' sizes. Runs on a CPU.

    python benchmarks/trace_time.py
"""

from __future__ import annotations

import time
import warnings

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

import astraea

LAYERS = 30


def build() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=32, ffn_dim=128, num_layers=LAYERS, cross_attn_norm=True, rope_max_seq_len=32,
    ).eval()


def first_call(model) -> float:
    x, text = torch.randn(1, 16, 3, 16, 16), torch.randn(1, 16, 64)
    started = time.perf_counter()
    with torch.no_grad():
        model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text)
    return time.perf_counter() - started


def main() -> None:
    torch._dynamo.reset()
    whole = first_call(torch.compile(build(), backend="eager"))
    torch._dynamo.reset()
    model = build()
    model.compile_repeated_blocks(backend="eager")
    regional = first_call(model)
    torch._dynamo.reset()
    forward = WanTransformerBlock.forward
    WanTransformerBlock.forward = torch.compiler.nested_compile_region(forward)
    try:
        nested = first_call(torch.compile(build(), backend="eager"))
    finally:
        WanTransformerBlock.forward = forward
    print(f"dynamo, {LAYERS} Wan blocks: whole model {whole:.2f} s, one block (compile_repeated_blocks) "
          f"{regional:.2f} s, nested_compile_region {nested:.2f} s")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._dynamo.reset()
        astraea_whole = first_call(torch.compile(build(), backend="astraea", options={"schedule": 1.0}))
        torch._dynamo.reset()
        model = build()
        astraea.compile_blocks(model, schedule=1.0)
        astraea_blocks = first_call(model)
    print(f"astraea's first call, {LAYERS} Wan blocks: torch.compile {astraea_whole:.2f} s, "
          f"compile_blocks {astraea_blocks:.2f} s")

    torch._dynamo.reset()
    model, seen = build(), {}
    hook = model.blocks[0].register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    first_call(model)
    hook.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print("astraea.explain on one block:", astraea.explain(model.blocks[0], *seen["args"], **seen["kwargs"]))


if __name__ == "__main__":
    main()
