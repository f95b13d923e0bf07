"""Expand `nn.MultiheadAttention`'s functional call into its projections and one SDPA, so the
analysis sees attention.

Dynamo keeps `F.multi_head_attention_forward` (what `nn.MultiheadAttention` calls, on sequence-first
[L, B, E] tensors) as one node, which the token rules cannot follow: a DiT built on
`nn.MultiheadAttention` ran dense. Where the call is plain attention (no masks, no added key/value
biases or zero attention, no dropout, its weights output unused), this pass writes it out as the
function computes it: the three input projections, heads split, `scaled_dot_product_attention`,
heads merged, the output projection. Any other call is left as it is.
"""

from __future__ import annotations

import inspect
import operator

import torch.fx as fx
import torch.nn.functional as F

from .fake_values import node_with_value
from .graph_edits import edit_each
from .rules import shape_of

SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def expand_multihead_attention(gm: fx.GraphModule) -> int:
    """Write out each plain `F.multi_head_attention_forward` call in `gm`; returns how many."""
    return edit_each(gm, lambda n: n.op == "call_function" and n.target is F.multi_head_attention_forward, _expand)


def _expand(graph: fx.Graph, node: fx.Node) -> int:
    try:
        a = SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError:
        return 0
    a.apply_defaults()
    a = a.arguments
    plain = all(a[name] is None for name in ("bias_k", "bias_v", "key_padding_mask", "attn_mask", "static_k",
                                            "static_v")) and not a["add_zero_attn"] and not a["is_causal"]
    outputs = [u for u in node.users]
    if not plain or (a["dropout_p"] and a["training"]) or len(shape_of(a["query"]) or ()) != 3 or not all(
        u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in outputs
    ):
        return 0
    heads, meta = a["num_heads"], node.meta

    def new(op, target, *args, **kwargs):
        return node_with_value(graph, op, target, args, kwargs, meta)

    with graph.inserting_before(node):
        if a["use_separate_proj_weight"]:
            weights = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
        else:
            chunks = new("call_method", "chunk", a["in_proj_weight"], 3)
            weights = tuple(new("call_function", operator.getitem, chunks, i) for i in range(3))
        biases = (None,) * 3
        if a["in_proj_bias"] is not None:
            chunks = new("call_method", "chunk", a["in_proj_bias"], 3)
            biases = tuple(new("call_function", operator.getitem, chunks, i) for i in range(3))
        q, k, v = (  # [L, B, E] -> [B, H, L, E / H]
            new("call_method", "permute", new("call_method", "unflatten",
                                               new("call_function", F.linear, x, w, b), -1, (heads, -1)), 1, 2, 0, 3)
            for x, w, b in zip((a["query"], a["key"], a["value"]), weights, biases)
        )
        o = new("call_function", F.scaled_dot_product_attention, q, k, v)
        o = new("call_method", "flatten", new("call_method", "permute", o, 2, 0, 1, 3), 2)  # [L, B, E]
        o = new("call_function", F.linear, o, a["out_proj_weight"], a["out_proj_bias"])
    for u in outputs:
        u.replace_all_uses_with(o)
        graph.erase_node(u)
    graph.erase_node(node)
    return 1
