"""Which dimension of every tensor in the graph is the token axis, and where tokens mix.

The analysis finds the token count N from the self-attentions (scaled_dot_product_attention
whose query and key lengths agree), finds where the token stream begins (the first tensor
with an axis of N entries that feeds the values of every self-attention), and propagates the
token axis forward op by op. Each op either keeps every token's row independent of the
other rows (token-wise: the rewrite may run it on any subset of rows), or mixes rows. The
only mixing the rewrite understands is self-attention through its keys and values; any other
mixing, or an op this module does not know, makes the axis "opaque" from there on, and
every block containing such a node stays dense with that reason.

Tensors that do not derive from the token stream but carry N rows along the axis they are
combined on (RoPE tables, per-token masks) are "tables": the rewrite gathers them with the
tokens.
"""

from __future__ import annotations

import math
import operator
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..runtime import ulysses  # noqa: F401  (registers torch.ops.astraea.ulysses_attention)

F = torch.nn.functional

# Attention ops with SDPA's (query, key, value, attn_mask) signature; Ulysses attention is
# what `ulysses.collapse_ulysses_attention` makes of a sequence-parallel one.
SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention, torch.ops.astraea.ulysses_attention}

ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.neg, operator.mod, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
    operator.ge, operator.and_, operator.or_, operator.iadd, operator.imul, operator.isub,
    operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.neg, torch.exp, torch.log,
    torch.sin, torch.cos, torch.tanh, torch.sigmoid, torch.sqrt, torch.rsqrt, torch.abs,
    torch.clamp, torch.where, torch.maximum, torch.minimum, torch.erf, torch.square,
    torch.reciprocal, torch.lerp, torch.addcmul, torch.float_power, torch.real,
    F.gelu, F.silu, F.relu, F.dropout, F.mish, F.softplus, F.leaky_relu, F.elu, F.hardswish,
    F.sigmoid, torch.exp2, torch.log1p, torch.expm1,
    torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like, torch.rand_like,
    torch.randn_like,
}
ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "pow", "neg", "exp", "log", "sin", "cos", "tanh", "sigmoid",
    "sqrt", "rsqrt", "abs", "clamp", "clamp_min", "clamp_max", "float", "half", "bfloat16",
    "double", "to", "type_as", "type", "contiguous", "clone", "detach", "square", "reciprocal",
    "masked_fill", "lerp", "addcmul", "erf", "exp2", "float_power",
    "__add__", "__mul__", "__sub__", "__truediv__", "__radd__", "__rmul__", "__rsub__",
}
# Ops that change only the layout of the dims; the token axis is followed through shapes.
RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"}
RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze}
PERMUTE_METHODS = {"permute", "transpose", "swapaxes", "movedim", "mT"}
PERMUTE_FUNCTIONS = {torch.permute, torch.transpose, torch.swapaxes, torch.movedim}
SPLIT_METHODS = {"chunk", "split", "unbind", "tensor_split"}
SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.unbind, torch.tensor_split}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate, torch.stack}
LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear}
NORM_FUNCTIONS = {F.layer_norm, torch.layer_norm, torch.rms_norm, getattr(F, "rms_norm", None)} - {None}
# Ops along given dims: (position of the dims argument, default dims). Token-wise unless one of
# the dims is the token axis; no dims at all (roll without dims flattens) counts as mixing.
ALONG_DIMS = {
    "softmax": (1, None), "log_softmax": (1, None), "normalize": (2, 1), "flip": (1, None),
    "roll": (2, None), "cumsum": (1, None), "cumprod": (1, None), "logcumsumexp": (1, None),
}
ALONG_DIMS_KEYWORDS = ("dim", "dims")
REDUCTIONS = {"mean", "sum", "amax", "amin", "var", "std", "logsumexp", "prod"}
EXPAND_METHODS = {"expand", "expand_as"}
# In-place element-wise methods: token-wise, but they write into their first argument.
MUTATING_METHODS = {"add_", "sub_", "mul_", "div_", "copy_", "clamp_", "fill_", "masked_fill_", "zero_"}
# Methods whose second tensor gives only a dtype/device: it is neither gathered nor aligned.
DTYPE_FROM_SECOND = {"type_as", "to"}
METADATA_METHODS = {"size", "dim", "numel", "stride", "is_contiguous", "element_size"}


MAX_SOURCE_TRIES = 8  # candidate token sources tried before giving up


class Opaque(str):
    """Why a tensor's token axis cannot be followed (a token-mixing or unknown op)."""


@dataclass
class TokenAxis:
    """Result of the analysis: the token axis of each token-carrying node.

    tdim[node] is an int (the token dim), a tuple of ints (tuple outputs), or an Opaque
    reason. tables[node] lists (input, dim) pairs of non-stream inputs that must be gathered
    with the tokens. self_attention lists SDPA nodes whose keys/values are token tensors.
    mutations lists in-place writes (setitem, x.add_(...)) as (node, mutated input).
    """

    num_tokens: int | None = None
    source: fx.Node | None = None
    grid: tuple[int, ...] | None = None
    tdim: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)
    self_attention: list = field(default_factory=list)
    cross_attention: list = field(default_factory=list)
    mutations: list = field(default_factory=list)
    reason: str | None = None

    def is_token(self, node) -> bool:
        """A tensor (int axis) or tuple of tensors (tuple of axes) with a followed token axis."""
        return isinstance(node, fx.Node) and isinstance(self.tdim.get(node), (int, tuple))

    def opaque(self, node) -> Opaque | None:
        value = self.tdim.get(node)
        return value if isinstance(value, Opaque) else None


def shape_of(node) -> tuple[int, ...] | None:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    if isinstance(value, torch.Tensor):
        return tuple(int(s) for s in value.shape)
    return None


def sdpa_args(node: fx.Node):
    """(query, key, value, attn_mask) of a scaled_dot_product_attention call."""
    names = ("query", "key", "value", "attn_mask")
    args = list(node.args) + [None] * (4 - len(node.args))
    return tuple(node.kwargs.get(n, args[i]) for i, n in enumerate(names))


def find_token_axis(gm: fx.GraphModule) -> TokenAxis:
    """Run the analysis on a dynamo (torch-level) graph."""
    result = TokenAxis()
    nodes = list(gm.graph.nodes)
    attentions = [n for n in nodes if n.op == "call_function" and n.target in SDPA]
    lengths = []
    for n in attentions:
        q, k, v, _ = sdpa_args(n)
        qs, ks = shape_of(q), shape_of(k)
        if qs and ks and qs[-2] == ks[-2]:
            lengths.append(qs[-2])
    if not lengths:
        result.reason = "no self-attention (scaled_dot_product_attention with equal query and key lengths) found"
        return result
    n_tokens = Counter(lengths).most_common(1)[0][0]
    result.num_tokens = n_tokens
    expected, value_ancestors = 0, None
    for n in attentions:
        q, k, v, _ = sdpa_args(n)
        if shape_of(q) and shape_of(k) and shape_of(q)[-2] == n_tokens == shape_of(k)[-2]:
            expected += 1
            anc = _ancestors(v)
            value_ancestors = anc if value_ancestors is None else value_ancestors & anc
    order = {n: i for i, n in enumerate(nodes)}
    candidates = sorted(
        (n for n in value_ancestors or () if shape_of(n) and n_tokens in shape_of(n) and not is_module_state(n)),
        key=order.get,
    )
    if not candidates:
        result.reason = f"no tensor with {n_tokens} tokens feeds every self-attention"
        return result
    # A channel count can equal the token count: try each axis of N entries, keep the first
    # that turns every self-attention into one. Channels come last in these graphs, so axes
    # before the last are tried first, each group earliest node first.
    tries = sorted(
        ((source, dim) for source in candidates for dim, size in enumerate(shape_of(source)) if size == n_tokens),
        key=lambda sd: (sd[1] == len(shape_of(sd[0])) - 1, order[sd[0]]),
    )
    first = None
    for source, dim in tries[:MAX_SOURCE_TRIES]:
        trial = TokenAxis(num_tokens=n_tokens, source=source, grid=_grid(source, n_tokens))
        trial.tdim[source] = dim
        _Propagator(trial, order).run(nodes[order[source] + 1:])
        if len(trial.self_attention) == expected:
            return trial
        first = first or trial
    return first


def is_module_state(node: fx.Node) -> bool:
    """A parameter or buffer input, as opposed to call data.

    Dynamo records where each input came from; a module's `_parameters[...]` or `_buffers[...]`
    is state, however the module was reached (through `self`, or a hook's wrapped forward).
    """
    if node.op != "placeholder":
        return False
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return str(node.target).lower().startswith("l_self")
    name = source.name() if callable(source.name) else source.name  # e.g. "L['self']._modules['proj']._parameters['weight']"
    return re.search(r"\b_(parameters|buffers)\b", name) is not None


def _ancestors(node: fx.Node) -> set:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    seen.add(node)
    return seen


def _grid(source: fx.Node, n_tokens: int) -> tuple[int, ...] | None:
    """Frames x height x width of the token axis, when it was made by flattening a video grid
    (possibly moved to its place by a transpose or permute since)."""
    while (source.op == "call_method" and source.target in PERMUTE_METHODS) or (
        source.op == "call_function" and source.target in PERMUTE_FUNCTIONS
    ):
        source = source.args[0]
    if source.op == "call_method" and source.target == "flatten" or (
        source.op == "call_function" and source.target is torch.flatten
    ):
        parent = source.args[0]
        shape = shape_of(parent)
        start = source.args[1] if len(source.args) > 1 else source.kwargs.get("start_dim", 0)
        end = source.args[2] if len(source.args) > 2 else source.kwargs.get("end_dim", -1)
        if shape:
            end = end % len(shape)
            dims = shape[start:end + 1]
            if math.prod(dims) == n_tokens and len(dims) == 3:
                return tuple(dims)
    return None


class _Propagator:
    """Forward pass over the nodes after the token source, applying each op's rule."""

    def __init__(self, result: TokenAxis, order: dict):
        self.r = result
        self.n = result.num_tokens
        self.order = order

    def run(self, nodes):
        for node in nodes:
            if node.op in ("placeholder", "get_attr", "output"):
                continue
            inputs = node.all_input_nodes
            if not any(a in self.r.tdim for a in inputs):
                continue  # does not depend on the token stream: shared by all tokens
            bad = next((self.r.tdim[a] for a in inputs if isinstance(self.r.tdim.get(a), Opaque)), None)
            if bad is not None:
                self.r.tdim[node] = Opaque(bad)
                continue
            try:
                out = self.rule(node)
            except _Mix as e:
                out = Opaque(f"{_describe(node)}: {e}")
            self.r.tdim[node] = out

    # ---- helpers -------------------------------------------------------------------------
    def td(self, a):
        return self.r.tdim.get(a) if isinstance(a, fx.Node) else None

    def table(self, node, arg, dim):
        """Record `arg` (a non-stream input) as a table to gather along `dim` if it has N rows."""
        shape = shape_of(arg)
        if shape is None or dim < 0 or dim >= len(shape) or shape[dim] == 1:
            return
        if shape[dim] != self.n:
            raise _Mix(f"input {arg.name} has {shape[dim]} rows where the token axis has {self.n}")
        self.r.tables.setdefault(node, []).append((arg, dim))

    def broadcast(self, node, tensor_args):
        out_shape = shape_of(node)
        if out_shape is None:
            raise _Mix("output shape unknown")
        out_dims = set()
        for a in tensor_args:
            t = self.td(a)
            if isinstance(t, int) and shape_of(a) is not None:
                out_dims.add(t + len(out_shape) - len(shape_of(a)))
        if len(out_dims) != 1:
            raise _Mix("inputs disagree on the token axis")
        out = out_dims.pop()
        for a in tensor_args:
            if self.td(a) is None and shape_of(a) is not None:
                self.table(node, a, out - (len(out_shape) - len(shape_of(a))))
        return out

    # ---- the rules -----------------------------------------------------------------------
    def rule(self, node):
        target, args = node.target, node.args
        tensors = [a for a in node.all_input_nodes if shape_of(a) is not None]
        if node.op == "call_method" and target in DTYPE_FROM_SECOND:
            if self.td(args[0]) is None:
                return None
            tensors = tensors[:1]
        if node.op == "call_function" and target in SDPA:
            return self.attention(node)
        if node.op == "call_function" and target is operator.getitem:
            return self.getitem(node)
        if node.op == "call_function" and target is operator.setitem:
            return self.setitem(node)
        if node.op == "call_method" and target in METADATA_METHODS or (
            node.op == "call_function" and target in (getattr,)
        ):
            return None
        if node.op == "call_method" and target in MUTATING_METHODS:
            self.r.mutations.append((node, args[0]))
            return self.broadcast(node, tensors)
        if (node.op == "call_function" and target in ELEMENTWISE_FUNCTIONS) or (
            node.op == "call_method" and target in ELEMENTWISE_METHODS
        ):
            return self.broadcast(node, tensors)
        if (node.op == "call_function" and target in LINEAR_FUNCTIONS) or (
            node.op == "call_function" and target in (torch.matmul, operator.matmul)
        ) or (node.op == "call_method" and target == "matmul"):
            return self.linear(node)
        if node.op == "call_function" and target in NORM_FUNCTIONS:
            return self.norm(node)
        if (node.op == "call_method" and target in REDUCTIONS) or (
            node.op == "call_function" and getattr(target, "__name__", None) in REDUCTIONS
            and getattr(torch, target.__name__, None) is target
        ):
            return self.reduction(node)
        name = target if node.op == "call_method" else getattr(target, "__name__", None)
        if name in ALONG_DIMS and (node.op == "call_method" or target in (getattr(torch, name, None), getattr(F, name, None))):
            return self.along_dims(node, *ALONG_DIMS[name])
        if (node.op == "call_method" and target in RESHAPE_METHODS) or (
            node.op == "call_function" and target in RESHAPE_FUNCTIONS
        ):
            return self.reshape(node)
        if (node.op == "call_method" and target in PERMUTE_METHODS) or (
            node.op == "call_function" and target in PERMUTE_FUNCTIONS
        ):
            return self.permute(node)
        if node.op == "call_method" and target in EXPAND_METHODS:
            return self.reshape(node)
        if (node.op == "call_method" and target in SPLIT_METHODS) or (
            node.op == "call_function" and target in SPLIT_FUNCTIONS
        ):
            return self.split(node)
        if node.op == "call_function" and target in CAT_FUNCTIONS:
            return self.cat(node)
        raise _Mix(f"{_describe(node)} is not known to be token-wise")

    def attention(self, node):
        q, k, v, mask = sdpa_args(node)
        tq, tk, tv = self.td(q), self.td(k), self.td(v)
        nq = len(shape_of(q))
        if mask is not None and self.td(mask) is not None:
            raise _Mix("attention mask derived from the tokens")
        if tq is not None and tq != nq - 2:
            raise _Mix("query token axis is not the sequence axis")
        if tk is None and tv is None:
            if mask is not None:
                self.table(node, mask, nq - 2)
            self.r.cross_attention.append(node)
            return tq
        if tk != nq - 2 or tv != nq - 2 or tq is None:
            raise _Mix("attention whose keys/values carry tokens in an unsupported way")
        if mask is not None:
            raise _Mix("masked self-attention")
        self.r.self_attention.append(node)
        return tq

    def linear(self, node):
        x, w = node.args[0], node.args[1]
        t = self.td(x)
        if self.td(w) is not None or t is None:
            raise _Mix("product of two token tensors (token mixing)")
        if t == len(shape_of(x)) - 1:
            raise _Mix("contraction over the token axis")
        return t + len(shape_of(node)) - len(shape_of(x))

    def norm(self, node):
        x = node.args[0]
        normalized = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        k = len(normalized) if isinstance(normalized, (list, tuple)) else 1
        t = self.td(x)
        if t >= len(shape_of(x)) - k:
            raise _Mix("normalisation over the token axis")
        for a in node.all_input_nodes[1:]:
            if self.td(a) is not None:
                raise _Mix("normalisation weights derived from the tokens")
        return t

    def reduction(self, node):
        """A reduction over channel dims is token-wise; over the token axis it mixes tokens."""
        x = node.args[0]
        t, nd = self.td(x), len(shape_of(x))
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dim is None:
            raise _Mix("reduction over every dim, tokens included")
        dims = {d % nd for d in (dim if isinstance(dim, (list, tuple)) else (dim,))}
        if t in dims:
            raise _Mix("reduction over the token axis")
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        return t if keepdim else t - sum(d < t for d in dims)

    def along_dims(self, node, position, default):
        x = node.args[0]
        t, nd = self.td(x), len(shape_of(x))
        dims = next((node.kwargs[k] for k in ALONG_DIMS_KEYWORDS if k in node.kwargs), None)
        if dims is None:
            dims = node.args[position] if len(node.args) > position else default
        if dims is None:
            raise _Mix(f"{_describe(node)} works over every dim")
        dims = dims if isinstance(dims, (list, tuple)) else (dims,)
        if not all(isinstance(d, int) for d in dims) or t in {d % nd for d in dims}:
            raise _Mix(f"{_describe(node)} works along the token axis")
        return t

    def reshape(self, node):
        """Follow the axis through a shape change by matching the products of the dims before it."""
        x = node.args[0]
        t, ins, outs = self.td(x), shape_of(x), shape_of(node)
        if outs is None:
            raise _Mix("output shape unknown")
        if node.target in ("expand", "expand_as"):
            return t + len(outs) - len(ins)
        before = math.prod(ins[:t])
        for j, size in enumerate(outs):
            if size == self.n and math.prod(outs[:j]) == before:
                return j
        raise _Mix("reshape that splits or merges the token axis")

    def permute(self, node):
        x = node.args[0]
        t, nd = self.td(x), len(shape_of(x))
        rest = node.args[1:]
        if node.target == "mT":
            perm = list(range(nd - 2)) + [nd - 1, nd - 2]
        elif node.target in ("permute", torch.permute):
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

    def split(self, node):
        x = node.args[0]
        t, nd = self.td(x), len(shape_of(x))
        is_unbind = node.target in ("unbind", torch.unbind)
        default_dim = 0
        dim = node.kwargs.get("dim", node.args[1 if is_unbind else 2] if len(node.args) > (1 if is_unbind else 2) else default_dim)
        dim %= nd
        if dim == t:
            raise _Mix("split along the token axis")
        out_t = t - 1 if is_unbind and dim < t else t
        value = node.meta.get("example_value")
        count = len(value) if isinstance(value, (list, tuple)) else 1
        return tuple([out_t] * count)

    def cat(self, node):
        seq = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        outs = shape_of(node)
        tokens = [a for a in seq if self.td(a) is not None]
        ts = {self.td(a) + len(outs) - len(shape_of(a)) - (node.target is torch.stack) for a in tokens}
        if len(ts) != 1:
            raise _Mix("concatenated inputs disagree on the token axis")
        t = ts.pop()
        stack = node.target is torch.stack
        dim %= len(outs)
        if not stack and dim == t:
            raise _Mix("concatenation along the token axis")
        for a in seq:
            if isinstance(a, fx.Node) and self.td(a) is None:
                self.table(node, a, t - (len(outs) - len(shape_of(a))) + stack)
        return t + 1 if stack and dim <= t else t

    def getitem(self, node):
        src, index = node.args
        t = self.td(src)
        if isinstance(t, tuple):
            return t[index] if isinstance(index, int) else tuple(t[index])
        out = _index_axis(t, len(shape_of(src)), index)
        if out is None:
            raise _Mix("indexing along the token axis")
        return out

    def setitem(self, node):
        dst, index, value = node.args
        t = self.td(dst)
        if t is None:
            raise _Mix("writes token values into a tensor without a token axis")
        out = _index_axis(t, len(shape_of(dst)), index)
        if out is None:
            raise _Mix("indexed write along the token axis")
        if isinstance(value, fx.Node) and shape_of(value) is not None:
            vt = self.td(value)
            sub = shape_of(value)
            if vt is None:
                self.table(node, value, out - (len(_indexed_shape(shape_of(dst), index)) - len(sub)))
        self.r.mutations.append((node, dst))
        return None


class _Mix(Exception):
    """Raised by a rule when its op mixes tokens or cannot be followed."""


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target} ({node.name})"


def _normalise_index(index, ndim):
    index = index if isinstance(index, tuple) else (index,)
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    out = []
    for i in index:
        if i is Ellipsis:
            out.extend([slice(None)] * (ndim - consumed))
        else:
            out.append(i)
    return out


def _index_axis(t: int, ndim: int, index) -> int | None:
    """Where dim `t` lands after `x[index]`, or None when the index touches it."""
    dim_in, dim_out = 0, 0
    for i in _normalise_index(index, ndim):
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


def _indexed_shape(shape, index):
    return torch.empty(shape, device="meta")[index].shape
