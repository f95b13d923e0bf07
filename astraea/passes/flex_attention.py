"""`flex_attention` that SDPA computes the same becomes one SDPA node, so the analysis sees attention.

diffusers' `"flex"` attention backend, and research code that tries FlexAttention, call
`torch.nn.attention.flex_attention.flex_attention`; dynamo records it as the higher-order op
`flex_attention(q, k, v, score_mod, block_mask, scale, kernel_options, score_buffers,
mask_buffers)`, with `score_mod` and the block mask's `mask_mod` as subgraphs, which the token
rules do not know: such a model ran dense. Its semantics (torch's own reference,
`math_attention`) are `softmax(where(mask_mod(b, h, q, kv), score_mod(q @ k^T * scale, b, h, q,
kv), -inf)) @ v`, and on a GPU the kernel also skips every block the block mask does not list.
Where both functions take one of these forms, and the block lists leave out nothing the mask
keeps, the call is one SDPA node:

| `score_mod` | `mask_mod` | SDPA |
|---|---|---|
| none (returns the score) | none (a constant true: flex's default) | plain |
| `score + bias[b, h, q_idx, kv_idx]` | none | `attn_mask=bias` (added after scaling, as SDPA adds it) |
| none | `q_idx >= kv_idx` | `is_causal=True` (both aligned to the top left) |
| none | `mask[b, h, q_idx, kv_idx]` (bool) | `attn_mask=mask` |

diffusers' backend writes the first three of these for no mask, a float mask and `is_causal`,
and the last for a bool mask. The block lists are trusted only where they are flex's default
(one block of every token: no mask given) or were computed in the graph from the mask function
itself (`create_block_mask`, from the mask's tensor alone); a block mask built any other way can
be sparse attention of its own (Kandinsky 6 SR's NABLA lists blocks around each query block
with a mask_mod that keeps everything). Fewer key/value heads give `enable_gqa`. Any other
function (a document mask, a sliding window, a soft-cap), a call whose log-sum-exp is read, or
one whose query and key batches differ, stays as it is, and the block stays dense. The code that
built the block mask goes with the call (`graph_edits.drop_dead_code`).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._functorch import predispatch

from .fake_values import node_with_value
from .graph_edits import ancestors, drop_dead_code, edit_each
from .rules import dtype_of, shape_of

FLEX = getattr(torch.ops.higher_order, "flex_attention", None)
EMPTY_BLOCK = 1 << 30  # the block size of flex_attention's mask when none is given (`_LARGE_SPARSE_BLOCK_SIZE`)
_VMAP_RESULT = predispatch._remove_batch_dim


def attention_from_flex(gm: fx.GraphModule) -> int:
    """Replace each `flex_attention` call in `gm` that SDPA computes the same by one SDPA node;
    returns how many."""
    if FLEX is None:
        return 0
    return edit_each(gm, lambda n: n.op == "call_function" and n.target is FLEX, _replace, cleanup=drop_dead_code)


def _replace(graph: fx.Graph, call: fx.Node) -> int:
    q, k, v, score_mod, block_mask, scale = call.args[:6]
    score_buffers, mask_buffers = (list(a) for a in call.args[7:9])
    outputs = list(call.users)
    if not outputs or any(u.target is not operator.getitem or u.args[1] != 0 for u in outputs):
        return 0  # only the output may be read, not the log-sum-exp or the maxima
    shapes = [shape_of(t) for t in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes) or shapes[0][0] != shapes[1][0]:
        return 0
    root = graph.owning_module
    bias = _score_bias(_subgraph(root, score_mod), score_buffers)
    mask = _mask(_subgraph(root, block_mask[-1]), mask_buffers)
    if bias is None or mask is None or (bias is not True and mask is not True):
        return 0  # an unknown function, or a bias and a mask at once
    if not (_empty(block_mask) if mask is True else _made_by_the_mask(block_mask, mask)):
        return 0  # its lists of blocks may leave out blocks its mask_mod keeps: sparse attention (NABLA)
    kwargs = {"scale": scale}
    if mask == "causal":
        kwargs["is_causal"] = True
    elif mask is not True:
        kwargs["attn_mask"] = mask
    elif bias is not True:
        kwargs["attn_mask"] = bias
    if shapes[1][1] != shapes[0][1]:
        kwargs["enable_gqa"] = True
    with graph.inserting_before(call):
        sdpa = node_with_value(graph, "call_function", F.scaled_dot_product_attention, (q, k, v), kwargs, call.meta)
    for user in outputs:
        user.replace_all_uses_with(sdpa)
        graph.erase_node(user)
    graph.erase_node(call)
    return 1


def _empty(block_mask: tuple) -> bool:
    """The block mask flex_attention makes when given none: one block of every token."""
    return tuple(block_mask[-3:-1]) == (EMPTY_BLOCK, EMPTY_BLOCK)


def _made_by_the_mask(block_mask: tuple, mask) -> bool:
    """The block lists were computed in the graph by evaluating a mask function (under vmap, as
    `create_block_mask` does) from nothing but `mask`'s tensor (or, causal, from no input)."""
    allowed = ancestors([mask]) if isinstance(mask, fx.Node) else set()
    made_from = ancestors(t for t in block_mask[:-1] if isinstance(t, fx.Node)) - allowed
    return (any(n.target is _VMAP_RESULT for n in made_from)
            and not any(n.op in ("placeholder", "get_attr") for n in made_from))


def _subgraph(root: fx.GraphModule, node) -> fx.Graph | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    module = getattr(root, node.target, None)
    return module.graph if isinstance(module, fx.GraphModule) else None


def _parts(graph: fx.Graph) -> tuple[list[fx.Node], object]:
    """The subgraph's placeholders and what it returns."""
    nodes = list(graph.nodes)
    return [n for n in nodes if n.op == "placeholder"], nodes[-1].args[0]


def _score_bias(graph: fx.Graph | None, buffers: list):
    """True for a `score_mod` that returns the score; the graph node of `bias` for one that
    returns `score + bias[b, h, q, kv]`; None otherwise."""
    if graph is None:
        return None
    inputs, result = _parts(graph)
    if result is inputs[0]:
        return True
    if not (isinstance(result, fx.Node) and result.target in (operator.add, torch.add) and len(result.args) == 2):
        return None
    score, read = result.args if result.args[0] is inputs[0] else result.args[::-1]
    return _indexed_buffer(read, inputs[1:5], inputs[5:], buffers) if score is inputs[0] else None


def _mask(graph: fx.Graph | None, buffers: list):
    """True for a `mask_mod` that is a constant true; "causal" for `q >= kv`; the graph node of
    `mask` for `mask[b, h, q, kv]` of a bool mask; None otherwise."""
    if graph is None:
        return None
    inputs, result = _parts(graph)
    if _constant_true(result):
        return True
    if isinstance(result, fx.Node) and (
            (result.target is operator.ge and result.args == (inputs[2], inputs[3]))
            or (result.target is operator.le and result.args == (inputs[3], inputs[2]))):
        return "causal"
    mask = _indexed_buffer(result, inputs[:4], inputs[4:], buffers)
    return mask if dtype_of(mask) == torch.bool else None


def _constant_true(node) -> bool:
    if node is True:
        return True
    if not isinstance(node, fx.Node):
        return False
    if (node.op == "call_method" and node.target == "new_ones") or node.target in (torch.ones, torch.ones_like):
        return node.kwargs.get("dtype") is torch.bool
    return False


def _indexed_buffer(read, indices: list[fx.Node], placeholders: list[fx.Node], buffers: list):
    """The outer graph's node for `buffer[b, h, q, kv]` read in a subgraph (the buffer one of its
    trailing placeholders, the index its four index inputs in order); None otherwise."""
    if not (isinstance(read, fx.Node) and read.target is operator.getitem and read.args[0] in placeholders):
        return None
    if tuple(read.args[1]) != tuple(indices) or len(placeholders) != len(buffers):
        return None
    buffer = buffers[placeholders.index(read.args[0])]
    shape = shape_of(buffer) if isinstance(buffer, fx.Node) else None
    return buffer if shape is not None and len(shape) == 4 else None
