"""Triton kernels of astraea: gathered-query flash attention with per-row LSE, and the fused
merge of fresh rows into a block's cache. Their plain-PyTorch references import without
Triton (`merge_reference`); the kernels load on first use. The library launches them from
its own ops (`astraea.ops.sparse`: astraea::sparse_attention and astraea::merge_rows), which
Inductor treats as opaque nodes."""

import importlib

_HOMES = {
    "gathered_attention": "gathered_attention", "gathered_attention_reference": "gathered_attention",
    "merge_rows": "merge", "merge_rows_reference": "merge_reference", "rows_major": "layout",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'astraea.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value  # the function, not the submodule of the same name the import set
    return value
