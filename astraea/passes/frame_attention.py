"""Attention regrouped per frame into the batch becomes one attention masked to each query's frame.

Face- and audio-driven video models let each frame's tokens attend to that frame's own
conditioning (Wan-Animate's face adapter; per-frame audio tokens in talking-head research code):
the queries' token axis is split into (frames, positions) with the frames moved into the batch
(`q.unflatten(1, (T, -1)).flatten(0, 1)`), the keys and values come as [B * T, N, ...], and the
output is merged back the same way. The token rules cannot follow a token axis split into the
batch, so that attention ran on every token. It is the same as one attention of the whole
sequence over every frame's keys with each query masked to its own frame's (softmax gives the
masked keys exactly zero weight), which keeps the token axis whole: the mask has a row per
query, gathered with the queries as any mask is (a table). It reads T times the keys, which such
conditioning has few of.

Matched, with static sizes: an SDPA without a mask whose query is a chain of views of a tensor X
[B, S, heads, d] or [B, S, heads * d] that equals X's heads-first form split into T frames of
S / T positions with the frames moved into the batch; whose keys and values have batch B * T
and come from no tensor on the token grid (attention within each frame, factorised, is left to
the analysis: masked, it would read every frame's keys);
and whose output reaches, through views and casts only, a tensor [B, S, ...] equal to the
heads-first output merged back. Both chains are checked by the elements they read
(`index_maps.py`), so any spelling of the same regrouping matches and nothing else does.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from .fake_values import fake_mode_of, node_with_value
from . import index_maps
from .graph_edits import ancestors, drop_dead_code, edit_each
from .index_maps import Factors
from .rules import CASTS, LAYOUT_METHODS, dtype_of, sdpa_args, shape_of


def attention_across_frames(gm: fx.GraphModule) -> int:
    """Rewrite each per-frame attention of `gm` as one masked attention; returns how many."""
    return edit_each(gm, lambda n: n.op == "call_function" and n.target is F.scaled_dot_product_attention,
                     _replace, cleanup=drop_dead_code)  # torch._C._nn's SDPA is this same function


@dataclass(frozen=True)
class _PerFrame:
    """What a matched attention reads and where its merged output is."""

    x: fx.Node  # the queries before the regrouping: [B, S, heads, d] or [B, S, heads * d]
    batch: int
    frames: int
    positions: int  # tokens per frame
    heads: int
    head_dim: int
    keys_per_frame: int
    merged: fx.Node  # the output merged back to [B, S, ...]


def _replace(graph: fx.Graph, call: fx.Node) -> int:
    f = _match(call)
    if f is None:
        return 0
    _, k, v, _ = sdpa_args(call)
    example = f.x.meta["example_value"]

    def node(op, target, *args, **kwargs):
        return node_with_value(graph, op, target, args, kwargs, call.meta)

    def every_frame(t):  # keys or values [B * T, heads, N, d] as [B, heads, T * N, d]
        t = node("call_method", "unflatten", t, 0, (f.batch, f.frames))
        return node("call_method", "flatten", node("call_method", "transpose", t, 1, 2), 2, 3)

    def frame_of(length, per_frame):  # [length]: the frame of each position
        return node("call_function", operator.floordiv,
                    node("call_function", torch.arange, length, device=example.device), per_frame)

    with graph.inserting_before(call):
        query = f.x if len(shape_of(f.x)) == 4 else node("call_method", "unflatten", f.x, 2, (f.heads, f.head_dim))
        query = node("call_method", "transpose", query, 1, 2)
        with fake_mode_of([example]) or contextlib.nullcontext():  # fake values for the positions, as dynamo's are
            query_frame = frame_of(f.frames * f.positions, f.positions)
            key_frame = frame_of(f.frames * f.keys_per_frame, f.keys_per_frame)
        mask = node("call_function", operator.eq, node("call_method", "unsqueeze", query_frame, 1),
                    node("call_method", "unsqueeze", key_frame, 0))
        options = {name: call.kwargs[name] for name in ("scale", "enable_gqa") if name in call.kwargs}
        out = node("call_function", F.scaled_dot_product_attention, query=query, key=every_frame(k),
                   value=every_frame(v), attn_mask=mask, **options)
    with graph.inserting_before(f.merged):
        result = node("call_method", "reshape", node("call_method", "transpose", out, 1, 2), *shape_of(f.merged))
        if dtype_of(f.merged) != dtype_of(result):
            result = node("call_method", "to", result, dtype_of(f.merged))
    f.merged.replace_all_uses_with(result)
    return 1


def _match(call: fx.Node) -> _PerFrame | None:
    """The per-frame attention `call` is, or None: static sizes, no mask, and both chains of
    views read as the regrouping does."""
    q, k, v, mask = sdpa_args(call)
    if mask is not None or len(call.args) > 3 or call.kwargs.get("is_causal") or call.kwargs.get("dropout_p"):
        return None
    shapes = [shape_of(t) for t in (q, k, v)]
    if any(s is None or len(s) != 4 or not all(isinstance(n, int) for n in s) for s in shapes):
        return None
    chain_in = _views_back(q)
    x = chain_in[0].args[0] if chain_in else None
    x_shape = shape_of(x) if isinstance(x, fx.Node) else None
    if x_shape is None or len(x_shape) not in (3, 4) or not all(isinstance(n, int) for n in x_shape):
        return None
    (bt, heads, positions, d), (batch, tokens) = shapes[0], x_shape[:2]
    frames = bt // batch
    if frames < 2 or bt % batch or tokens != frames * positions or shapes[1][0] != bt or shapes[2][0] != bt:
        return None
    if tuple(x_shape[2:]) not in ((heads, d), (heads * d,)):
        return None
    if any(_on_the_grid(n, batch, tokens) for n in ancestors([k, v])):
        return None  # keys from the tokens themselves: attention within each frame (factorised), not conditioning
    factors = Factors()
    x_dims = factors.dims("x", x_shape)
    heads_first = ([("unflatten", (2, (heads, d)))] if len(x_shape) == 3 else []) + [("transpose", (1, 2))]
    if not factors.same(_run(factors, chain_in, x_dims), _apply(factors, x_dims, heads_first + _per_frame(frames))):
        return None
    chain_out = _views_forward(call, (batch, tokens))
    if not chain_out:
        return None
    merged = chain_out[-1]
    out_dims = factors.dims("out", (batch, heads, tokens, d))
    merged_back = [("transpose", (1, 2)), ("reshape", tuple(shape_of(merged)))]
    if not factors.same(_run(factors, chain_out, _apply(factors, out_dims, _per_frame(frames))),
                        _apply(factors, out_dims, merged_back)):
        return None
    return _PerFrame(x, batch, frames, positions, heads, d, shapes[1][2], merged)


def _on_the_grid(node: fx.Node, batch: int, tokens: int) -> bool:
    shape = shape_of(node)
    return shape is not None and len(shape) >= 2 and tuple(shape[:2]) == (batch, tokens)


def _views_back(node) -> list[fx.Node]:
    """The chain of views ending at `node`, first view first (empty if `node` is none)."""
    chain = []
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in LAYOUT_METHODS:
        chain.append(node)
        node = node.args[0]
    return chain[::-1]


def _views_forward(node: fx.Node, lead: tuple) -> list[fx.Node]:
    """The views and casts from `node`, each the only user of the one before, up to the first
    view whose shape starts with `lead`; empty if there is none."""
    chain = []
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_method" or user.target not in LAYOUT_METHODS | CASTS or user.args[0] is not node:
            return []
        chain.append(user)
        shape = shape_of(user)
        if user.target in LAYOUT_METHODS and shape is not None and tuple(shape[:2]) == lead:
            return chain
        node = user
    return []


def _run(factors: Factors, chain: list[fx.Node], dims):
    """`dims` through the chain's views (casts read nothing new); None where an argument is not
    a constant or an op is not a view."""
    for node in chain:
        if node.target not in CASTS:
            dims = None if node.kwargs else index_maps.apply(factors, dims, node.target, node.args[1:])
    return dims


def _apply(factors: Factors, dims, ops):
    for op, args in ops:
        dims = index_maps.apply(factors, dims, op, args)
    return dims


def _per_frame(frames: int) -> list:
    """[B, heads, S, d] split into frames moved into the batch: [B * frames, heads, S / frames, d]."""
    return [("unflatten", (2, (frames, -1))), ("transpose", (1, 2)), ("flatten", (0, 1))]
