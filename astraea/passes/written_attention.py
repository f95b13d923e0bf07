"""Collapse attention written out by hand into one SDPA node, so the analysis sees attention.

Research code often computes attention as `softmax(q @ k^T * scale [+ bias]) @ v` instead of
calling `F.scaled_dot_product_attention`. Followed op by op, the first product contracts
over the channels and the second over the keys' token axis, which the token rules call
token mixing, so such a model would run dense. This pass finds the pattern in the graph:

    scores = matmul(q, kt)         # kt is k transposed in its last two dims
    scores = scores * c  or  / c   # any number of Python-number scalings (optional)
    scores = scores + bias         # an additive mask (optional; after the scalings, as SDPA adds it),
                                   # or a mask written on the scores (below)
    probs  = softmax(scores, -1)   # optionally cast before and after, and dropout with p = 0
    out    = matmul(probs, v)

or, as diffusers' classic `AttnProcessor` and the research code built on it write the scores,
`baddbmm(empty, q, kt, beta=0, alpha=c)` or `baddbmm(bias, q, kt, beta=1, alpha=c)` (heads
folded into the batch, `[B * H, N, d]`); either product may be written as an einsum
(`...id,...jd->...ij`, then `...ij,...jd->...id`, as einops-style code writes them). It replaces
the pattern with `F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=c)`, which
computes the same function. Intermediate values used anywhere else (attention maps returned to
the caller, for instance) leave the pattern as it is.

A mask is as often written on the scores as added to them: `scores.masked_fill(~mask, fill)`
(or `masked_fill_`, its result what the softmax reads), fill -inf or another at most MASK_VALUE
(-1e9, the dtype's lowest), or, as CogVideoX's SAT `standard_attention` writes it,
`scores * m - 10000.0 * (1 - m)` with m a bool mask cast to numbers. Either becomes the additive
mask `zeros.masked_fill(where, fill)`, of the mask's shape and q's dtype. A score filled and a
score plus the fill both weigh exactly 0 after the softmax, so the weights are eager's, but where
the fill is no mask to begin with: scores that spread as far as the fill (-10000.0 against scores
of 1e5 masks nothing in eager), and rows with no key left (NaN in eager with -inf, 0 from SDPA;
uniform over all keys in eager with a finite fill, as from SDPA where the fill swamps the scores,
-1e9 or the dtype's lowest, but about the unmasked row's weights with -10000.0). Added rather
than SDPA's bool mask for that last case.
"""

from __future__ import annotations

import math
import operator
import re

import torch
import torch.fx as fx
import torch.nn.functional as F

from .fake_values import node_with_value
from .graph_edits import edit_each
from .rules import CASTS, dtype_of, shape_of

MATMUL = {torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm"}
SOFTMAX = {F.softmax, torch.softmax, "softmax"}
TRANSPOSES = {torch.transpose, "transpose", torch.swapaxes, "swapaxes"}
MUL = {operator.mul, torch.mul, "mul"}
DIV = {operator.truediv, torch.div, "div"}
ADD = {operator.add, torch.add, "add"}
SUB = {operator.sub, torch.sub, "sub"}
FILLS = {torch.masked_fill, "masked_fill", "masked_fill_"}
BADDBMM = {torch.baddbmm, "baddbmm"}
EINSUM = {torch.einsum, torch.functional.einsum}
# A fill at most this masks: exp(fill - the row's largest score) is 0 even in float64 while the
# scores spread less than 9000 or so, so filling a score and adding the fill to it give the same
# weights. A fill with a larger value (0, say) is no mask, and stays as it is.
MASK_VALUE = -1e4


def collapse_written_attention(gm: fx.GraphModule) -> int:
    """Replace each hand-written attention in `gm` by one SDPA node; returns how many."""
    return edit_each(gm, lambda n: _is(n, SOFTMAX) and _softmax_dim(n) in (-1, _ndim(n) - 1), _collapse)


def _collapse(graph: fx.Graph, softmax: fx.Node) -> int:
    probs = [softmax]  # softmax, then casts and zero dropout, each used only by the next
    while (user := _only_user(probs[-1])) is not None and (
        _is(user, CASTS) or (_is(user, {F.dropout, "dropout"}) and _zero_dropout(user))
    ):
        probs.append(user)
    out = _only_user(probs[-1])
    product = _product(out, "probs") if out is not None else None
    if product is None or product[0] is not probs[-1]:
        return 0
    chain = []  # from the softmax's input back to q @ k^T, each used only by the one before
    v = product[1]
    scale, bias, node = 1.0, None, softmax.args[0]
    while isinstance(node, fx.Node) and _only_user(node) is not None:
        chain.append(node)
        if _is(node, MUL) and _number(node.args[1]):
            scale, node = scale * node.args[1], node.args[0]
        elif _is(node, MUL) and _number(node.args[0]):
            scale, node = scale * node.args[0], node.args[1]
        elif _is(node, DIV) and _number(node.args[1]):
            scale, node = scale / node.args[1], node.args[0]
        elif _is(node, ADD) and bias is None and scale == 1.0 and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
            node, bias = node.args if _is(node.args[0], MATMUL | MUL | DIV | BADDBMM | EINSUM) else node.args[::-1]
        elif bias is None and scale == 1.0 and (fill := _masked_fill(node) or _sat_mask(node)) is not None:
            node, bias, inner = fill  # bias: (where, fill), an additive mask once the pattern is whole
            chain += inner
        elif _is(node, CASTS) and len(node.args) == 1 and not node.kwargs:  # an upcast before the softmax
            node = node.args[0]
        else:
            break
    if not chain or chain[-1] is not node or _ndim(node) < 3:
        return 0
    unused = None  # baddbmm's input when beta is 0: left without users
    if _is(node, BADDBMM):
        scores = _baddbmm_scores(node, bias is None and scale == 1.0)
        if scores is None:
            return 0
        q, kt, alpha, added = scores
        scale *= alpha
        if node.args[0] is not added:
            unused = node.args[0]
        bias = added if added is not None else bias
    elif (scores := _product(node, "scores")) is not None:
        q, kt = scores
    else:
        return 0
    def new(op, target, *args, **kwargs):
        return node_with_value(graph, op, target, args, kwargs, out.meta)

    with graph.inserting_before(out):
        if isinstance(bias, tuple):
            bias = _fill_bias(new, *bias, dtype_of(node))
        k = kt if _is(node, EINSUM) else _untransposed(graph, kt)  # an einsum's scores take k as it is
        folded = _ndim(q) == 3  # heads folded into the batch: SDPA on [1, B * H, N, d], as its CPU kernels need 4 dims
        if folded:
            q, k, v = (new("call_method", "unsqueeze", t, 0) for t in (q, k, v))
            bias = new("call_method", "unsqueeze", bias, 0) if bias is not None and _ndim(bias) == 3 else bias
        kwargs = {"scale": float(scale)} | ({"attn_mask": bias} if bias is not None else {})
        sdpa = new("call_function", F.scaled_dot_product_attention, q, k, v, **kwargs)
        if folded:
            sdpa = new("call_method", "squeeze", sdpa, 0)
    out.replace_all_uses_with(sdpa)
    for dead in [out, *reversed(probs), *chain]:
        graph.erase_node(dead)
    if k is not kt and not kt.users:
        graph.erase_node(kt)
    if unused is not None and not unused.users and unused.op == "call_function" and unused.target is torch.empty:
        graph.erase_node(unused)
    return 1


def _product(node: fx.Node, kind: str) -> tuple[fx.Node, fx.Node] | None:
    """The operands of a batched product of attention: `kind` "scores", q k^T (a matmul of q and
    k^T, or an einsum `...id,...jd->...ij` of q and k); "probs", p v (a matmul, or an einsum
    `...ij,...jd->...id`); None for anything else."""
    if _is(node, MATMUL):
        return tuple(node.args) if len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args) else None
    if not _is(node, EINSUM) or node.kwargs or len(node.args) != 3 or not isinstance(node.args[0], str):
        return None
    equation, a, b = node.args
    terms = re.fullmatch(r"([^,]+),([^,]+)->(.+)", equation.replace(" ", ""))
    if terms is None or not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    (x, y, z), batch = terms.groups(), terms.group(3)[:-2]
    last = set(x[-2:] + y[-2:])
    if not all(t[:-2] == batch and len(t) == len(batch) + 2 for t in (x, y, z)) or len(last) != 3 or last & set(batch):
        return None
    i, c = x[-2:]
    wanted = (y[-2] + c, i + y[-2]) if kind == "scores" else (c + y[-1], i + y[-1])
    return (a, b) if (y[-2:], z[-2:]) == wanted else None


def _masked_fill(node: fx.Node):
    """(scores, (where, fill), []) of `masked_fill(scores, where, fill)` (`where` bool) as a mask
    on the scores: the fill at most MASK_VALUE, and `where` no larger than the scores; None for
    anything else."""
    if not _is(node, FILLS) or len(node.args) != 3 or node.kwargs:
        return None
    scores, where, fill = node.args
    if dtype_of(where) != torch.bool or not _number(fill) or fill > MASK_VALUE or not _keeps_shape(node, scores):
        return None
    return scores, (where, fill), []


def _sat_mask(node: fx.Node):
    """(scores, (m, -c), the form's other nodes) of SAT's `scores * m - c * (1 - m)`, c at
    least -MASK_VALUE: the scores filled with -c where m is 0, which it is only where m holds
    nothing but 0s and 1s, as the graph shows here: m a bool tensor cast to numbers, used by this
    form alone (so that nothing changes it in place); None for anything else."""
    if not _is(node, SUB) or len(node.args) != 2 or node.kwargs:
        return None
    kept, lowered = node.args
    c, one_minus = _times_number(lowered) or (None, None)
    if c is None or -c > MASK_VALUE or not _is(one_minus, SUB) or len(one_minus.args) != 2 or one_minus.kwargs:
        return None
    one, m = one_minus.args
    if not (_number(one) and one == 1 and _is(kept, MUL) and len(kept.args) == 2 and m in kept.args):
        return None
    scores = kept.args[1] if kept.args[0] is m else kept.args[0]
    if not (_is(m, CASTS) and dtype_of(m.args[0]) == torch.bool and set(m.users) == {kept, one_minus}):
        return None
    if any(_only_user(n) is not user for n, user in ((kept, node), (lowered, node), (one_minus, lowered))):
        return None
    return (scores, (m, -c), [lowered, one_minus, kept]) if _keeps_shape(node, scores) else None


def _times_number(node) -> tuple[float, fx.Node] | None:
    """(c, x) of `c * x` or `x * c`, c a Python number; None for anything else."""
    if not _is(node, MUL) or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    return (a, b) if _number(a) and isinstance(b, fx.Node) else (b, a) if _number(b) and isinstance(a, fx.Node) else None


def _fill_bias(new, where: fx.Node, fill: float, dtype: torch.dtype) -> fx.Node:
    """The additive mask of a fill: `fill` where `where` holds (bool) or is 0 (a 0/1 mask), else
    0, in q's `dtype`, as SDPA takes it, and of `where`'s shape, so that it carries no more of the
    scores' dims than the mask does (a key mask stays [B, 1, 1, N]), with at least the 2 dims SDPA
    takes. A finite fill is brought into `dtype`'s range: eager may fill scores upcast from q's
    dtype (-1e9 after float16 products), and it still masks there."""
    if math.isfinite(fill):
        fill = max(fill, torch.finfo(dtype).min)
    if dtype_of(where) != torch.bool:
        where = new("call_function", operator.eq, where, 0)
    for _ in range(2 - _ndim(where)):
        where = new("call_method", "unsqueeze", where, 0)
    zeros = new("call_function", torch.zeros_like, where, dtype=dtype)
    return new("call_method", "masked_fill", zeros, where, fill)


def _baddbmm_scores(node: fx.Node, may_add: bool):
    """(q, kt, alpha, bias or None) of `baddbmm(input, q, kt, beta=beta, alpha=alpha)` as attention
    scores: input ignored (beta 0) or added as the mask (beta 1, where nothing scales the sum
    after it: `may_add`); None for any other form."""
    if len(node.args) != 3 or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    if set(node.kwargs) - {"beta", "alpha"} or not (_number(alpha) and _number(beta)) or beta not in (0, 1):
        return None
    if beta == 1 and not may_add:
        return None
    return node.args[1], node.args[2], alpha, (node.args[0] if beta == 1 else None)


def _untransposed(graph: fx.Graph, kt: fx.Node) -> fx.Node:
    """k from k^T: the transpose's input when kt is a transpose of the last two dims, else a
    new transpose of kt."""
    nd = _ndim(kt)
    if _is(kt, TRANSPOSES) and {d % nd for d in kt.args[1:3]} == {nd - 2, nd - 1}:
        return kt.args[0]
    if kt.op == "call_function" and kt.target is getattr and kt.args[1] == "mT":
        return kt.args[0]
    return node_with_value(graph, "call_method", "transpose", (kt, -2, -1), {}, kt.meta)


def _zero_dropout(node: fx.Node) -> bool:
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    return p == 0 or training is False


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in targets


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _softmax_dim(node: fx.Node):
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)


def _ndim(node: fx.Node) -> int:
    value = node.meta.get("example_value")
    return value.dim() if isinstance(value, torch.Tensor) else -1


def _keeps_shape(mask: fx.Node, scores: fx.Node) -> bool:
    """Whether a mask on the scores keeps their shape: one that broadcasts them to more is no mask on them."""
    return shape_of(scores) is not None and shape_of(mask) == shape_of(scores)
