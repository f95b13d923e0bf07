"""The token rule of each op, registered in a table (as Inductor registers lowerings).

A rule takes the propagation state and a node whose inputs carry the token axis, and returns
where the output's token axis is: an int dim, a tuple of dims for a tuple output, or None for
an output without one (sizes, dtypes). It raises `Mix` when the op mixes tokens in a way the
rewrite cannot follow; the token axis is then lost from that node on and the block holding it
stays dense, with the message as its reason. A rule may set the output's `Layout` (the
segments of its token axis); otherwise the output keeps its token inputs' layout.

Ops are looked up as ("call_function", callable) or ("call_method", name). An op with no rule
mixes tokens as far as the analysis knows.
"""

from __future__ import annotations

import math
import operator
from typing import Callable

import torch
import torch.fx as fx

from ..ops import ulysses  # noqa: F401  (registers torch.ops.astraea.ulysses_attention)
from .layout import Layout

F = torch.nn.functional

RULES: dict[tuple[str, object], Callable] = {}

# Attention ops with SDPA's (query, key, value, attn_mask) signature; Ulysses attention is
# what `ulysses.collapse_ulysses_attention` makes of a sequence-parallel one.
SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention, torch.ops.astraea.ulysses_attention}
# Methods whose second tensor gives only a dtype/device: it is neither gathered nor aligned.
DTYPE_FROM_SECOND = {"type_as", "to", "type"}
RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"}
PERMUTE_METHODS = {"permute", "transpose", "swapaxes", "movedim"}
PERMUTE_FUNCTIONS = {torch.permute, torch.transpose, torch.swapaxes, torch.movedim}
# Methods that only regroup a tensor's elements (a view, or a copy in the same order).
LAYOUT_METHODS = {"reshape", "view", "permute", "transpose", "contiguous", "flatten", "unflatten"}
# Methods that only change a tensor's dtype.
CASTS = {"float", "to", "type_as", "half", "bfloat16"}


SPLIT = "reshape that splits or merges the token axis"


class Mix(Exception):
    """Raised by a rule when its op mixes tokens or cannot be followed."""


def register(*functions, methods=()):
    """Register a rule for torch functions and for tensor method names."""
    def wrap(rule):
        for f in functions:
            RULES["call_function", f] = rule
        for m in methods:
            RULES["call_method", m] = rule
        return rule
    return wrap


def rule_for(node: fx.Node) -> Callable | None:
    try:
        return RULES.get((node.op, node.target))
    except TypeError:  # an unhashable target
        return None


def shape_of(node) -> tuple[int, ...] | None:
    """The node's tensor shape, or None: not a tensor, or a size known only at run time (the
    output of torch.nonzero, with dynamo capturing data-dependent shapes)."""
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    if isinstance(value, torch.Tensor):
        try:
            return tuple(int(s) for s in value.shape)
        except RuntimeError:  # GuardOnDataDependentSymNode
            return None
    return None


def dtype_of(node) -> torch.dtype | None:
    """The node's tensor dtype, or None: not a tensor."""
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def target_name(node: fx.Node) -> str:
    """What the node calls, by name: a method's, or a function's or op's `__name__`."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def describe(node: fx.Node) -> str:
    return f"{node.op} {target_name(node)} ({node.name})"


def sdpa_args(node: fx.Node):
    """(query, key, value, attn_mask) of a scaled_dot_product_attention call."""
    names = ("query", "key", "value", "attn_mask")
    args = list(node.args) + [None] * (4 - len(node.args))
    return tuple(node.kwargs.get(n, args[i]) for i, n in enumerate(names))


def _tensor_inputs(node):
    return [a for a in node.all_input_nodes if shape_of(a) is not None]


# ---- element-wise ops: every token input on one axis, other inputs broadcast or gathered ----
def broadcast(p, node, tensor_args=None):
    tensor_args = _tensor_inputs(node) if tensor_args is None else tensor_args
    out_shape = shape_of(node)
    if out_shape is None:
        raise Mix("output shape unknown")
    out_dims, layouts = set(), set()
    for a in tensor_args:
        t = p.td(a)
        if isinstance(t, int) and shape_of(a) is not None:
            out_dims.add(t + len(out_shape) - len(shape_of(a)))
            layouts.add(p.layout(a))
    if len(out_dims) != 1:
        raise Mix(f"inputs disagree on the token axis (dims {sorted(out_dims)} of the output)")
    if len(layouts) != 1:
        raise Mix(f"inputs hold different segments of the token axis ({', '.join(sorted(l.describe() for l in layouts))})")
    out, layout = out_dims.pop(), layouts.pop()
    for a in tensor_args:
        if p.td(a) is None and shape_of(a) is not None:
            p.table(node, a, out - (len(out_shape) - len(shape_of(a))), layout)
    return out


ELEMENTWISE_FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.neg, operator.mod, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
    operator.ge, operator.and_, operator.or_, operator.iadd, operator.imul, operator.isub,
    operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.neg, torch.exp, torch.log,
    torch.sin, torch.cos, torch.tanh, torch.sigmoid, torch.sqrt, torch.rsqrt, torch.abs,
    torch.clamp, torch.where, torch.maximum, torch.minimum, torch.erf, torch.square,
    torch.reciprocal, torch.lerp, torch.addcmul, torch.float_power, torch.real,
    F.gelu, F.silu, F.relu, F.dropout, F.mish, F.softplus, F.leaky_relu, F.elu, F.hardswish,
    F.sigmoid, torch.exp2, torch.log1p, torch.expm1, F.relu6,
    torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like, torch.rand_like,
    torch.randn_like,
)
ELEMENTWISE_METHODS = (
    "add", "sub", "mul", "div", "pow", "neg", "exp", "log", "sin", "cos", "tanh", "sigmoid",
    "sqrt", "rsqrt", "abs", "clamp", "clamp_min", "clamp_max", "float", "half", "bfloat16",
    "double", "contiguous", "clone", "detach", "square", "reciprocal", "masked_fill", "lerp",
    "addcmul", "erf", "exp2", "float_power", "bool", "int", "long", "elu", "relu",
    "__add__", "__mul__", "__sub__", "__truediv__", "__radd__", "__rmul__", "__rsub__",
)
register(*ELEMENTWISE_FUNCTIONS, methods=ELEMENTWISE_METHODS)(broadcast)


@register(methods=sorted(DTYPE_FROM_SECOND))
def dtype_cast(p, node):
    """x.to(y) / x.type_as(y): y only gives a dtype; a token y with a non-token x is not token data."""
    if p.td(node.args[0]) is None:
        return None
    return broadcast(p, node, _tensor_inputs(node)[:1])


@register(methods=("add_", "sub_", "mul_", "div_", "copy_", "clamp_", "fill_", "masked_fill_", "zero_"))
def mutating(p, node):
    """In-place element-wise methods: token-wise, but they write into their first argument."""
    p.r.mutations.append((node, node.args[0]))
    return broadcast(p, node)


@register(methods=("size", "dim", "numel", "stride", "is_contiguous", "element_size"))
def metadata(p, node):
    return None


@register(getattr)
def attribute(p, node):
    """x.shape or x.dtype carry no token data; x.mT / x.T are transposes, x.real / x.imag
    element-wise views."""
    x, name = node.args[:2]
    t, nd = p.td(x), len(shape_of(x) or ())
    if name in ("real", "imag"):
        return t
    if name in ("mT", "mH") or (name in ("T", "H") and nd == 2):
        return {nd - 1: nd - 2, nd - 2: nd - 1}.get(t, t)
    if shape_of(node) is not None:
        raise Mix(f"tensor attribute {name} is not known to be token-wise")
    return None


# ---- ops over channels ---------------------------------------------------------------------
@register(F.linear, torch._C._nn.linear)
def linear(p, node):
    x, w = node.args[0], node.args[1]
    t = p.td(x)
    if p.td(w) is not None or t is None:
        raise Mix("linear layer whose weights derive from the tokens")
    if t == len(shape_of(x)) - 1:
        raise Mix("contraction over the token axis")
    return t + len(shape_of(node)) - len(shape_of(x))


@register(torch.matmul, operator.matmul, torch.bmm, methods=("matmul", "bmm"))
def matmul(p, node):
    """x @ w with the token axis among x's rows, w's columns or the batch dims: token-wise. Both
    operands' token axes contracted together (values^T keys of linear attention): a summary of
    every token, with no token axis; `summary` records it. Any other contraction of the token
    axis mixes tokens."""
    x, w = node.args[0], node.args[1]
    tx, tw = p.td(x), p.td(w)
    nx_, nw, nout = len(shape_of(x)), len(shape_of(w)), len(shape_of(node))
    if min(nx_, nw) < 2:
        raise Mix("matrix-vector product with token data")
    if tx is not None and tw is not None:
        if tx == nx_ - 1 and tw == nw - 2:
            return summary(p, node, (x, w))
        if tx < nx_ - 2 and tw < nw - 2 and tx + nout - nx_ == tw + nout - nw and p.layout(x) == p.layout(w):
            return tx + nout - nx_  # a product per token (batch dims)
        raise Mix("product of two token tensors (token mixing)")
    token, t, n, other = (x, tx, nx_, w) if tx is not None else (w, tw, nw, x)
    if t == (nx_ - 1 if token is x else nw - 2):
        raise Mix("contraction over the token axis")
    out = t + nout - n
    if t < n - 2:  # tokens in a batch dim: a weight with a batch dim of its own there is a table
        p.table(node, other, out - (nout - len(shape_of(other))), p.layout(token))
    return out


def summary(p, node, tokens) -> None:
    """A reduction over the token axis of token tensors (linear attention's key/value summary,
    a token-pooled gate): shared by every token, it is computed from all of them, so whatever
    feeds it runs on every token, like the keys and values of softmax attention."""
    layouts = {p.layout(a) for a in tokens}
    if len(layouts) != 1 or layouts.pop().folded:
        raise Mix("reduction over a token axis regrouped with the frames or across different segments")
    p.r.summaries.append(node)
    if len(tokens) > 1:  # tokens paired with tokens: attention, not a pooling (nor a norm, when
        p.r.linear_attention.append(node)  # a try takes the channels for the tokens)
    return None


@register(torch.einsum)
def einsum(p, node):
    """einsum over token tensors: token-wise where the token letter reaches the output, a
    summary where every operand's token letter is summed away (linear attention written as
    einsum)."""
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if "->" not in equation:
        raise Mix("einsum without an explicit output")
    inputs, output = equation.replace(" ", "").split("->")
    subscripts = [_expand_ellipsis(s, len(shape_of(a))) for s, a in zip(inputs.split(","), operands)]
    output = _expand_ellipsis(output, len(shape_of(node)))
    tokens = [(a, s[p.td(a)]) for a, s in zip(operands, subscripts) if p.td(a) is not None]
    letters = {letter for _, letter in tokens}
    if len(letters) != 1 or len({p.layout(a) for a, _ in tokens}) != 1:
        raise Mix("einsum whose operands carry the token axis under different letters or segments")
    letter, layout = letters.pop(), p.layout(tokens[0][0])
    if letter not in output:
        return summary(p, node, [a for a, _ in tokens])
    out = output.index(letter)
    for a, s in zip(operands, subscripts):
        if p.td(a) is None and letter in s:
            p.table(node, a, s.index(letter), layout)
    return out


def _expand_ellipsis(subscript: str, ndim: int) -> str:
    """The subscript with its '...' spelt out as upper-case letters (einsum's own letters are
    lower case in practice): the last ones of the alphabet, since broadcast dims line up from
    the right."""
    if "..." not in subscript:
        return subscript
    count = ndim - (len(subscript) - 3)
    return subscript.replace("...", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[26 - count:])


@register(F.layer_norm, torch.layer_norm, torch.rms_norm, *([F.rms_norm] if hasattr(F, "rms_norm") else []))
def norm(p, node):
    x = node.args[0]
    normalized = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    k = len(normalized) if isinstance(normalized, (list, tuple)) else 1
    t = p.td(x)
    if any(p.td(a) is not None for a in node.all_input_nodes[1:]):
        raise Mix("normalisation weights derived from the tokens")
    if t >= len(shape_of(x)) - k:
        raise Mix("normalisation over the token axis")
    return t


REDUCTIONS = ("mean", "sum", "amax", "amin", "var", "std", "logsumexp", "prod", "norm")


@register(*(getattr(torch, r) for r in REDUCTIONS), torch.linalg.vector_norm, methods=REDUCTIONS)
def reduction(p, node):
    """A reduction over channel dims is token-wise; over the token axis it is a summary."""
    x = node.args[0]
    t, nd = p.td(x), len(shape_of(x))
    is_norm = node.target in ("norm", torch.norm, torch.linalg.vector_norm)
    position = 2 if is_norm else 1  # norm(x, ord, dim, keepdim)
    dim = node.kwargs.get("dim", node.args[position] if len(node.args) > position else None)
    if dim is None:
        raise Mix("reduction over every dim, tokens included")
    dims = {d % nd for d in (dim if isinstance(dim, (list, tuple)) else (dim,))}
    if t in dims:
        return summary(p, node, (x,))
    if node.target in ("std", "var", torch.std, torch.var):
        position += 1  # std(x, dim, unbiased, keepdim)
    keepdim = node.kwargs.get("keepdim", node.args[position + 1] if len(node.args) > position + 1 else False)
    return t if keepdim else t - sum(d < t for d in dims)


def along_dims(position, default):
    """Ops along given dims (position of the dims argument, default dims): token-wise unless
    one of them is the token axis; no dims at all (roll without dims flattens) mixes."""
    def rule(p, node):
        x = node.args[0]
        t, nd = p.td(x), len(shape_of(x))
        dims = next((node.kwargs[k] for k in ("dim", "dims") if k in node.kwargs), None)
        if dims is None:
            dims = node.args[position] if len(node.args) > position else default
        if dims is None:
            raise Mix(f"{describe(node)} works over every dim")
        dims = dims if isinstance(dims, (list, tuple)) else (dims,)
        if not all(isinstance(d, int) for d in dims) or t in {d % nd for d in dims}:
            raise Mix(f"{describe(node)} works along the token axis")
        return t
    return rule


for _name, (_position, _default) in {
    "softmax": (1, None), "log_softmax": (1, None), "normalize": (2, 1), "flip": (1, None),
    "roll": (2, None), "cumsum": (1, None), "cumprod": (1, None), "logcumsumexp": (1, None),
    "repeat_interleave": (2, None),
}.items():
    _functions = [f for f in (getattr(torch, _name, None), getattr(F, _name, None)) if f is not None]
    register(*_functions, methods=(_name,))(along_dims(_position, _default))


PAD = (F.pad, torch._C._nn.pad)


def pad_arguments(node: fx.Node) -> tuple:
    """(widths, mode, value) of an F.pad node."""
    def arg(position, name, default):
        return node.kwargs.get(name, node.args[position] if len(node.args) > position else default)
    return arg(1, "pad", None), arg(2, "mode", "constant"), arg(3, "value", None)


@register(*PAD)
def pad(p, node):
    """Padding the channel dims (a head dim padded to a size the attention kernels take) is
    token-wise. Constant padding of the token axis (its length rounded up for a kernel or a
    sequence-parallel split) joins segments of padding rows to its ends, computed in full like
    text; any other padding of it mixes tokens."""
    x = node.args[0]
    t, nd = p.td(x), len(shape_of(x))
    widths, mode, _ = pad_arguments(node)
    padded = {nd - 1 - i // 2 for i, w in enumerate(widths) if not isinstance(w, int) or w}
    if t not in padded:
        return t
    at = 2 * (nd - 1 - t)
    before, after = widths[at], widths[at + 1] if at + 1 < len(widths) else 0
    layout = p.layout(x)
    if mode != "constant" or layout.folded or not all(isinstance(w, int) and w >= 0 for w in (before, after)):
        raise Mix(f"{describe(node)} pads the token axis other than with constant rows at its ends")
    parts = [Layout((w,), None) for w in (before,) if w] + [layout] + [Layout((w,), None) for w in (after,) if w]
    p.r.layout[node] = parts[0].concat(*parts[1:])
    return t


# ---- layout ops ----------------------------------------------------------------------------
@register(torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze, torch.view_as_complex,
          torch.view_as_real, methods=sorted(RESHAPE_METHODS) + ["expand", "expand_as"])
def reshape(p, node):
    """Follow the axis through a shape change: it is the output dim of the same length whose
    preceding dims hold the same number of elements as the input's (view_as_complex drops the
    trailing (real, imaginary) pair, view_as_real adds it: complex RoPE)."""
    x = node.args[0]
    t, ins, outs = p.td(x), shape_of(x), shape_of(node)
    if outs is None:
        raise Mix("output shape unknown")
    if node.target in ("expand", "expand_as"):
        return None if t is None else t + len(outs) - len(ins)  # c.expand_as(x): c's values, not tokens
    before, n = math.prod(ins[:t]), ins[t]
    for j, size in enumerate(outs):
        if size == n and math.prod(outs[:j]) == before:
            return j
    layout, rest_in = p.layout(x), math.prod(ins[t + 1:])
    for j, size in enumerate(outs):
        if math.prod(outs[j + 1:]) != rest_in:
            continue
        # The token dim merged with dims before it into one, the tokens fastest: factorised
        # attention, [B, S, F, C] -> [B * S, F, C] (positions into the batch), or [B, F, S, C]
        # -> [B, F * S, C] (a flat stream of (frame, position) pairs)
        if layout.only_video and size > n and size % n == 0 and math.prod(outs[:j]) * size == before * n \
                and before % math.prod(outs[:j]) == 0:
            p.r.layout[node] = layout.fold()
            return j
        # And back: a folded dim split with the tokens as its last factor
        if layout.folded and size == layout.total and j > 0 and math.prod(outs[:j + 1]) == before * n:
            p.r.layout[node] = layout.unfold()
            return j
    raise Mix(SPLIT)


@register(methods=("repeat",))
def repeat(p, node):
    """x.repeat(*sizes): tiles each dim (new ones lead); token-wise while the token axis is
    tiled once (keys repeated over heads for grouped-query attention)."""
    x, sizes = node.args[0], node.args[1:]
    sizes = sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)) else sizes
    t = p.td(x) + len(sizes) - len(shape_of(x))
    if sizes[t] != 1:
        raise Mix("repeats the token axis")
    return t


@register(*PERMUTE_FUNCTIONS, methods=sorted(PERMUTE_METHODS))
def permute(p, node):
    x = node.args[0]
    t, nd = p.td(x), len(shape_of(x))
    rest = node.args[1:]
    if node.target in ("permute", torch.permute):
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        dims = node.kwargs.get("dims", dims)
        perm = [d % nd for d in dims]
    elif node.target in ("movedim", torch.movedim):
        src, dst = rest[0] % nd, rest[1] % nd
        perm = [d for d in range(nd) if d != src]
        perm.insert(dst, src)
    else:
        a, b = (d % nd for d in rest[:2])
        perm = list(range(nd))
        perm[a], perm[b] = perm[b], perm[a]
    return perm.index(t)


@register(torch.chunk, torch.split, torch.split_with_sizes, torch.unbind, torch.tensor_split,
          methods=("chunk", "split", "split_with_sizes", "unbind", "tensor_split"))
def split(p, node):
    """Splits along channels keep the axis in every piece; a split along the token axis is
    followed where it cuts exactly at segment boundaries (text from video)."""
    x = node.args[0]
    t, nd = p.td(x), len(shape_of(x))
    is_unbind = node.target in ("unbind", torch.unbind)
    position = 1 if is_unbind else 2
    dim = node.kwargs.get("dim", node.args[position] if len(node.args) > position else 0) % nd
    value = node.meta.get("example_value")
    count = len(value) if isinstance(value, (list, tuple)) else 1
    if dim != t:
        p.r.layout[node] = (p.layout(x),) * count
        return tuple([t - 1 if is_unbind and dim < t else t] * count)
    if is_unbind or not isinstance(value, (list, tuple)):
        raise Mix("split along the token axis")
    layout, start, pieces = p.layout(x), 0, []
    for piece in value:
        stop = start + int(piece.shape[t])
        covered = layout.segments(start, stop)
        if covered is None:
            raise Mix(f"split along the token axis that cuts a segment ({layout.describe()} at {start}:{stop})")
        pieces.append(layout.sub(*covered))
        start = stop
    p.r.layout[node] = tuple(pieces)
    return tuple([t] * count)


@register(torch.cat, torch.concat, torch.concatenate, torch.stack)
def cat(p, node):
    """Along channels: every token input on one axis. Along the token axis: the output's axis is
    the run of the inputs' segments; inputs that are not token data become segments that are
    always computed (text joined to video for joint attention)."""
    seq = node.args[0]
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    outs = shape_of(node)
    stack = node.target is torch.stack
    tokens = [a for a in seq if p.td(a) is not None]
    ts = {p.td(a) + len(outs) - len(shape_of(a)) - stack for a in tokens}
    if len(ts) != 1:
        raise Mix("concatenated inputs disagree on the token axis")
    t = ts.pop()
    dim %= len(outs)
    if not stack and dim == t:
        layout = Layout((), None)
        for a in seq:
            shape = shape_of(a) if isinstance(a, fx.Node) else None
            if shape is None:
                raise Mix("concatenation along the token axis with an input of unknown shape")
            part = p.layout(a) if p.td(a) is not None else Layout((shape[t],), None)
            layout = layout.concat(part)
            if layout is None:
                raise Mix("concatenation of two tensors that both hold the video tokens")
        p.r.layout[node] = layout
        return t
    layouts = {p.layout(a) for a in tokens}
    if len(layouts) != 1:
        raise Mix("concatenated inputs hold different segments of the token axis")
    layout = layouts.pop()
    for a in seq:
        if isinstance(a, fx.Node) and p.td(a) is None:
            p.table(node, a, t - (len(outs) - len(shape_of(a))) + stack, layout)
    return t + 1 if stack and dim <= t else t


@register(operator.getitem)
def getitem(p, node):
    src, index = node.args
    t = p.td(src)
    if t is None:
        raise Mix("indexes a tensor with token data")  # only the index carries tokens
    if isinstance(t, tuple):
        layouts = p.r.layout.get(src)
        if isinstance(layouts, tuple):
            p.r.layout[node] = layouts[index] if isinstance(index, int) else layouts[index]
        return t[index] if isinstance(index, int) else tuple(t[index])
    ndim = len(shape_of(src))
    out = index_axis(t, ndim, index)
    if out is not None:
        return out
    covered = _segment_slice(p, src, t, ndim, index)
    if covered is not None:
        p.r.layout[node] = covered[1]
        return covered[0]
    picked = _small_segment_rows(p, src, t, ndim, index, node)
    if picked is not None:
        return picked
    raise Mix(f"indexing along the token axis ({p.layout(src).describe()} rows)")


def _small_segment_rows(p, src, t: int, ndim: int, index, node) -> int | None:
    """Rows picked out of a tensor of small segments only (text), by a slice or an index
    tensor along the token axis and nothing else advanced: every row of such a tensor is
    computed, so any may be picked; the pick is one small segment."""
    layout, part = p.layout(src), token_index(t, ndim, index)
    others = [i for i in normalise_index(index, ndim) if i is not part]
    if layout.has_video or layout.folded or any(isinstance(i, fx.Node) for i in others):
        return None
    if not isinstance(part, slice) and not (isinstance(part, fx.Node) and len(shape_of(part) or ()) == 1):
        return None
    out, shape = index_axis(t, ndim, _whole_token_dim(t, ndim, index)), shape_of(node)
    if out is None or shape is None:
        return None
    p.r.layout[node] = Layout((shape[out],), None)
    return out


def _segment_slice(p, src, t: int, ndim: int, index):
    """(token dim of `src[index]`, its layout) when `index` slices whole segments along the
    token axis (the text or the video part of a joint tensor), else None: with a step, or
    cutting a segment, the tokens are mixed up."""
    part = token_index(t, ndim, index)
    layout = p.layout(src)
    if isinstance(part, slice) and part.step in (None, 1):
        start, stop, _ = part.indices(layout.total)
        covered = layout.segments(start, stop)
        out = index_axis(t, ndim, _whole_token_dim(t, ndim, index))
        if covered is not None and out is not None:  # None: advanced indexing moved the dims
            return out, layout.sub(*covered)
    return None


@register(operator.setitem)
def setitem(p, node):
    dst, index, value = node.args
    t = p.td(dst)
    if t is None:
        raise Mix("writes token values into a tensor without a token axis")
    ndim = len(shape_of(dst))
    out, layout = index_axis(t, ndim, index), p.layout(dst)
    if out is None:  # a write into whole segments (RoPE applied to the video part of a joint q/k)
        covered = _segment_slice(p, dst, t, ndim, index)
        if covered is None:
            raise Mix("indexed write along the token axis, not of whole segments")
        out, layout = covered
    if isinstance(value, fx.Node) and shape_of(value) is not None and p.td(value) is None:
        sub = shape_of(value)
        p.table(node, value, out - (len(indexed_shape(shape_of(dst), index)) - len(sub)), layout)
    elif isinstance(value, fx.Node) and p.td(value) is not None and p.layout(value) != layout:
        raise Mix("writes tokens of other segments into the token axis")
    p.r.mutations.append((node, dst))
    return None


def normalise_index(index, ndim):
    index = index if isinstance(index, tuple) else (index,)
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    out = []
    for i in index:
        if i is Ellipsis:
            out.extend([slice(None)] * (ndim - consumed))
        else:
            out.append(i)
    return out


def index_axis(t: int, ndim: int, index) -> int | None:
    """Where dim `t` lands after `x[index]`, or None when the index touches it."""
    dim_in, dim_out = 0, 0
    for i in normalise_index(index, ndim):
        if i is None:
            dim_out += 1
            continue
        if dim_in == t:
            return dim_out if isinstance(i, slice) and i == slice(None) else None
        if isinstance(i, slice):
            dim_out += 1
        elif not isinstance(i, int):
            return None  # advanced indexing re-orders dims: not followed
        dim_in += 1
    return dim_out + (t - dim_in)


def token_index(t: int, ndim: int, index):
    """The entry of `index` that applies to dim `t` (slice(None) when none does)."""
    dim_in = 0
    for i in normalise_index(index, ndim):
        if i is None:
            continue
        if dim_in == t:
            return i
        dim_in += 1
    return slice(None)


def _whole_token_dim(t: int, ndim: int, index):
    """`index` with its entry for dim `t` replaced by a full slice."""
    out, dim_in = [], 0
    for i in normalise_index(index, ndim):
        if i is not None and dim_in == t:
            i = slice(None)
        if i is not None:
            dim_in += 1
        out.append(i)
    return tuple(out)


def indexed_shape(shape, index):
    return torch.empty(shape, device="meta")[index].shape


# ---- attention -----------------------------------------------------------------------------
@register(*SDPA)
def attention(p, node):
    """Self-attention when keys and values carry the video tokens (any other segments with
    them); cross-attention when they carry no token data. Queries may be any segments, or
    none: another stream (audio) attending to the video (a key/value reader)."""
    q, k, v, mask = sdpa_args(node)
    tq, tk, tv = p.td(q), p.td(k), p.td(v)
    nq = len(shape_of(q))
    if mask is not None and p.td(mask) is not None:
        raise Mix("attention mask derived from the tokens")
    if tq is not None and tq < nq - 2 and tq == tk == tv and p.layout(q) == p.layout(k) == p.layout(v) \
            and p.layout(q).unfold().only_video and mask is None:
        # Tokens in a batch dim of the attention (factorised attention across frames: each
        # token's frames attend to each other): every token's attention is its own.
        return tq
    if tq is not None and tq != nq - 2:
        raise Mix("query token axis is not the sequence axis")
    keys_video = tk is not None and p.layout(k).has_video
    if not keys_video and (tv is None or not p.layout(v).has_video):
        if (tk is None) != (tv is None):
            raise Mix("attention whose keys and values disagree on carrying tokens")
        if mask is not None and tq is not None:
            p.table(node, mask, len(shape_of(mask)) - 2, p.layout(q))
        p.r.cross_attention.append(node)
        return tq
    if tk != nq - 2 or tv != nq - 2 or p.layout(k) != p.layout(v):
        raise Mix("attention whose keys/values carry tokens in an unsupported way")
    if tq is None:  # another stream's queries (audio) over every video token: no token axis out
        if mask is not None and shape_of(mask)[-1] != 1:
            raise Mix("a mask over the video keys of another stream's attention")
        p.r.kv_readers.append(node)
        return None
    if mask is not None:
        shape = shape_of(mask)
        if shape is None or shape[-1] not in (1, p.layout(k).total):
            raise Mix("self-attention mask that does not span the keys")
        p.table(node, mask, len(shape) - 2, p.layout(q))  # rows of a per-query mask go with their queries
    p.r.self_attention.append(node)
    return tq
