"""Triton kernels of astraea: gathered-query flash attention with per-row LSE, and the fused
merge of fresh rows into a block's cache. Importing registers the torch ops
astraea_kernels::gathered_attention and astraea_kernels::merge_rows."""
from .gathered_attention import gathered_attention, gathered_attention_reference
from .merge import merge_rows, merge_rows_reference

__all__ = ["gathered_attention", "gathered_attention_reference", "merge_rows", "merge_rows_reference"]
