"""FlashAttention called directly becomes one SDPA node, so the analysis sees attention.

Research video-DiT code (Open-Sora's blocks, for one) often calls `flash_attn.flash_attn_func`
(or its packed forms) on [batch, tokens, heads, head_dim] instead of SDPA. Since 2.7, flash-attn
registers its kernel as the torch op `flash_attn::_flash_attn_forward`, which dynamo records as
it is: an op the token rules do not know, so such a model ran dense. The analysis and the
rewrite read attention one way, SDPA's; this pass replaces each call SDPA computes the same by

    F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                   scale=softmax_scale).transpose(1, 2).contiguous()

(heads first for SDPA, and contiguous as flash-attn's output is; `is_causal`, and `enable_gqa`
for fewer key/value heads, where the call has them). Arguments are read by name from the op's
schema. Calls with dropout, a window, a softcap or ALiBi, whose softmax statistics are read,
causal ones of unequal query and key lengths (flash-attn aligns those to the bottom right, SDPA
to the top left), and any with an argument this pass does not know stay as they are, as do
other kernels (`flash_attn_varlen_func`, as the original Wan and HunyuanVideo call it).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.operator_schemas import normalize_function

from .fake_values import node_with_value
from .graph_edits import edit_each
from .rules import shape_of

FLASH_FORWARD = "flash_attn::_flash_attn_forward"
# Options at which the call is plain attention; an option the op lacks counts as at its value.
PLAIN = {"dropout_p": 0.0, "window_size_left": -1, "window_size_right": -1, "softcap": 0.0,
         "alibi_slopes": None, "return_softmax": False}
KNOWN = {"q", "k", "v", "softmax_scale", "causal", *PLAIN}


def attention_from_library_ops(gm: fx.GraphModule) -> int:
    """Replace each plain FlashAttention call in `gm` by one SDPA node; returns how many."""
    return edit_each(gm, lambda n: n.op == "call_function" and _op_name(n.target) == FLASH_FORWARD, _replace)


def _replace(graph: fx.Graph, call: fx.Node) -> int:
    named = normalize_function(call.target, call.args, call.kwargs, normalize_to_only_use_kwargs=True)
    if named is None:
        return 0
    a, outputs = named.kwargs, list(call.users)
    if set(a) - KNOWN or not all(_at(a.get(name, value), value) for name, value in PLAIN.items()):
        return 0
    if not outputs or any(u.target is not operator.getitem or u.args[1] != 0 for u in outputs):
        return 0  # only the output may be read, not the softmax statistics
    q, k, v, causal = a["q"], a["k"], a["v"], a.get("causal", False)
    shapes = [shape_of(t) for t in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes) or not isinstance(causal, bool):
        return 0
    if causal and shapes[0][1] != shapes[1][1]:
        return 0

    def new(op, target, *args, **kwargs):
        return node_with_value(graph, op, target, args, kwargs, call.meta)

    kwargs = ({"is_causal": True} if causal else {}) | {"scale": a["softmax_scale"]}
    if shapes[1][2] != shapes[0][2]:
        kwargs["enable_gqa"] = True
    with graph.inserting_before(call):
        heads_first = [new("call_method", "transpose", t, 1, 2) for t in (q, k, v)]
        sdpa = new("call_function", F.scaled_dot_product_attention, *heads_first, **kwargs)
        out = new("call_method", "contiguous", new("call_method", "transpose", sdpa, 1, 2))
    for user in outputs:
        user.replace_all_uses_with(out)
        graph.erase_node(user)
    graph.erase_node(call)
    return 1


def _op_name(target) -> str | None:
    """'namespace::name' of a torch op, as called (the packet) or by its overload."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    if isinstance(target, torch._ops.OpOverload):
        return target.name()
    return None


def _at(value, plain) -> bool:
    return value is plain or (type(value) in (int, float) and value == plain)
