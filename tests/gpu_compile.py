"""Compile the Triton kernels, as their launchers launch them, for an H100/H200 (sm_90) without a
GPU: Triton's own compiler down to ptxas's binary, and the shared memory each block asks for
(over the limit, the launch fails on the GPU). The interpreter the CPU tests run kernels in
executes Python and never exercises Triton's code generation, where a kernel can fail that the
interpreter runs fine. Run as `python -m tests.gpu_compile FORM...` in a process without
TRITON_INTERPRET (its patches break code generation in the process that uses it).
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

TARGET = ("cuda", 90, 32)  # Hopper: what the device machine has
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float8_e4m3fn: "fp8e4nv",
                torch.int32: "i32", torch.int64: "i64"}
# name: (cache dtype, keeps slopes, forecasts, per sample); x is bf16, as on the GPU.
MERGE_FORMS = {
    "copying": (torch.bfloat16, False, False, False),
    "copying-fp8-per-sample": (torch.float8_e4m3fn, False, False, True),
    "slopes": (torch.bfloat16, True, False, False),
    "slopes-per-sample": (torch.bfloat16, True, False, True),
    "forecasting": (torch.bfloat16, True, True, False),
    "forecasting-fp32-per-sample": (torch.float32, True, True, True),
}


# The attention kernel as `gathered_attention` launches it on a GPU: (dtype, head dim, TMA loads). Not fp32
# at head dim 128: its "ieee" dot takes 19 s to compile (its three-TF32-product dot would need 262,160 bytes of
# shared memory, which is why it is not used there).
ATTENTION_FORMS = {
    "attention-bf16-d64-tma": (torch.bfloat16, 64, True), "attention-bf16-d128-tma": (torch.bfloat16, 128, True),
    "attention-bf16-d128": (torch.bfloat16, 128, False), "attention-fp32-d64": (torch.float32, 64, False),
}
SHARED_BYTES = 232_448  # the most shared memory a block may use on an H100/H200 (227 KB); over it, a launch fails


def can_compile() -> bool:
    """Whether this Triton has the CUDA back end and its ptxas."""
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


class Launch:
    """Stands in for a Triton kernel: records the arguments of its launch instead of running it."""

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.args, self.kwargs = args, kwargs
        return record


def compile_launch(kernel, args, kwargs):
    """`kernel` compiled for TARGET with the types of the launch's `args` and its constants."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    signature = {name: "*" + TRITON_TYPES[a.dtype] if isinstance(a, torch.Tensor) else "fp32" if isinstance(a, float)
                 else "i32" for name, a in zip(kernel.arg_names, args)}
    signature.update({name: "constexpr" for name in kwargs})
    return triton.compile(ASTSource(kernel, signature, kwargs), target=GPUTarget(*TARGET), options=options)


def compile_merge(form: str, tokens: int = 70, width: int = 96, selected: int = 29, batch: int = 2):
    """The merge kernel as `merge_rows` launches it for `form` (MERGE_FORMS)."""
    merge = importlib.import_module("astraea.kernels.merge")
    cache_dtype, slopes, forecast, per_sample = MERGE_FORMS[form]
    samples = batch if per_sample else 1
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(tokens, generator=g)[:selected] for _ in range(samples)])
    x, rows = torch.randn(batch, tokens, width).bfloat16(), torch.randn(batch, selected, width).bfloat16()
    cache = torch.zeros(batch, tokens, width).to(cache_dtype)
    change, lse_state = torch.zeros(samples, tokens), torch.zeros(samples, tokens)
    lse_rows = torch.zeros(batch, 3, selected)
    extra = ()
    if slopes:
        extra = (torch.zeros(batch, tokens, width).to(cache_dtype), torch.zeros(samples, tokens, dtype=torch.int32),
                 torch.ones(samples, selected), forecast)
    kernel, launch = merge._merge_rows_kernel, Launch()
    merge._merge_rows_kernel = launch
    try:
        merge.merge_rows(x, rows, idx, cache, change, lse_rows, lse_state, *extra)
    finally:
        merge._merge_rows_kernel = kernel
    return compile_launch(kernel, launch.args, launch.kwargs)


def compile_attention(form: str):
    """The attention kernel with the tiles, stages and dot precision `gathered_attention` picks on
    a GPU for `form` (ATTENTION_FORMS); the launch's scalars are strides and sizes (i32) and the scale."""
    attention = importlib.import_module("astraea.kernels.gathered_attention")
    dtype, head_dim, tma = ATTENTION_FORMS[form]
    kernel, tiles = attention._gathered_attention_kernel, attention.tiles(dtype, tma)
    options = {k: tiles.pop(k) for k in ("num_warps", "num_stages")}
    pointer = "*" + TRITON_TYPES[dtype]
    signature = {name: pointer for name in ("Q", "K", "V", "Out")} | {"KB": "*fp32", "Lse": "*fp32"}
    signature |= {name: "i32" for name in kernel.arg_names[6:kernel.arg_names.index("qk_scale")]} | {"qk_scale": "fp32"}
    constants = dict(HAS_BIAS=False, HEAD_DIM=head_dim, USE_TMA=tma, UPCAST=False,
                     DOT_PRECISION=attention._dot_precision(dtype, head_dim), **tiles)
    signature |= {name: "constexpr" for name in constants}
    signature = {name: signature[name] for name in kernel.arg_names}
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget(*TARGET), options=options)


def main(forms: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("run without TRITON_INTERPRET: the interpreter's patches break code generation")
    failed = []
    for form in forms or [*MERGE_FORMS, *ATTENTION_FORMS]:
        try:
            compiled = compile_merge(form) if form in MERGE_FORMS else compile_attention(form)
            shared = compiled.metadata.shared
            if shared > SHARED_BYTES:
                raise RuntimeError(f"uses {shared} bytes of shared memory, over the {SHARED_BYTES} a block may have")
        except Exception as error:  # every form is tried; the report names each failure
            failed.append(form)
            print(f"{form}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            continue
        print(f"{form}: sm_90 binary of {len(compiled.asm['cubin'])} bytes, {shared} bytes of shared memory",
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
