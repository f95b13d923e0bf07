"""Each token rule of `astraea.passes.rules`, one op at a time on a tiny graph.

A graph here is built node by node as dynamo records it (call_function / call_method, meta
`example_value` on the meta device), its inputs seeded with a token axis and a layout, and
the analysis' propagator run over it: the assertions are what the analysis concludes of the
op's output (its token dim and segments, or the reason it mixes tokens). Every op of the rule
table is the op under test of some case here, so a rule added without a test fails the suite.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import partial

import pytest
import torch
import torch.fx as fx

import astraea
from astraea.passes.layout import Layout
from astraea.passes.rules import RULES, describe
from astraea.passes.token_axis import TokenAxis, _Propagator

F = torch.nn.functional

# A joint token axis: 6 video tokens, then 3 text tokens. A token input without a layout holds
# the 6 video tokens alone.
JOINT = Layout((6, 3), 0)
VIDEO = Layout((6,), 0)
TEXT = Layout((3,), None)


@dataclass(eq=False)
class Input:
    """A graph input; `dim` makes it carry the token axis, with segments `layout`."""

    shape: tuple
    dim: int | None = None
    layout: Layout | None = None
    dtype: torch.dtype = torch.float32


class Call:
    """An op applied to inputs or other calls: a str target is a tensor method."""

    def __init__(self, target, *args, **kwargs):
        self.target, self.args, self.kwargs = target, args, kwargs

    @property
    def key(self):
        return ("call_method" if isinstance(self.target, str) else "call_function", self.target)

    def __repr__(self):
        return self.target if isinstance(self.target, str) else f"{self.target.__module__}.{self.target.__name__}"


def token(*shape, dim=1, layout=JOINT, dtype=torch.float32) -> Input:
    return Input(shape, dim, layout, dtype)


X = token(2, 9, 4)  # [batch, joint tokens, channels]
FOLDED = token(12, 3, 4, dim=0, layout=VIDEO.fold())  # [batch * 6 video tokens, frames, channels]
C = Input((4,))  # per channel: broadcast over the tokens
C9 = Input((2, 9, 4))  # as large as X without being token data
MASK = Input((4,), dtype=torch.bool)
Q = token(2, 2, 9, 4, dim=2)  # [batch, heads, joint tokens, head dim]
KV = Input((2, 2, 5, 4))  # keys/values of 5 text tokens, not token data


def run_method(name, obj, *args, **kwargs):
    attr = getattr(obj, name, None)
    if attr is None:  # not a Tensor method (dynamo never records it): evaluate the functional op
        return getattr(F, name)(obj, *args, **kwargs)
    return attr(*args, **kwargs) if callable(attr) else attr  # mT is a property


@dataclass
class Traced:
    """The analysis of one call's graph."""

    axis: TokenAxis
    node: fx.Node  # the op under test
    nodes: dict  # Input / Call -> its node


def follow(call: Call) -> Traced:
    """Build `call`'s graph and propagate the token axis from its token inputs."""
    graph, nodes = fx.Graph(), {}
    axis = TokenAxis(num_tokens=VIDEO.total)

    def build(arg, name=None):
        if isinstance(arg, (list, tuple)):
            return type(arg)(build(a) for a in arg)
        if not isinstance(arg, (Input, Call)):
            return arg
        if arg in nodes:
            return nodes[arg]
        if isinstance(arg, Input):
            node = graph.placeholder(f"in{len(nodes)}")
            node.meta["example_value"] = torch.empty(arg.shape, dtype=arg.dtype, device="meta")
            if arg.dim is not None:
                axis.tdim[node] = arg.dim
            if arg.layout is not None:
                axis.layout[node] = arg.layout
        else:
            args, kwargs = build(arg.args), {k: build(v) for k, v in arg.kwargs.items()}
            node = graph.create_node(*arg.key, args, kwargs, name=name)
            fn = partial(run_method, arg.target) if isinstance(arg.target, str) else arg.target
            values, kw_values = fx.node.map_arg((args, kwargs), lambda n: n.meta["example_value"])
            node.meta["example_value"] = fn(*values, **kw_values)
        nodes[arg] = node
        return node

    node = build(call, name="out")
    _Propagator(axis).run(list(graph.nodes))
    return Traced(axis, node, nodes)


def verdict(traced: Traced):
    """What the analysis concludes of the op's output: (token dim, layout), a tuple of each for
    a tuple output, None when the output holds no token axis, or the reason it mixes tokens."""
    axis, node = traced.axis, traced.node
    reason = axis.opaque(node)
    if reason is not None:
        return reason.removeprefix(f"{describe(node)}: ")
    dim = axis.tdim[node]
    if dim is None:
        return None
    return dim, axis.layout[node] if isinstance(dim, tuple) else axis.layout_of(node)


TESTED: set = set()


def cases(*rows):
    """pytest params of calls or (call, expected...) rows; each call's op counts as tested."""
    params = []
    for row in rows:
        call, *expected = row if isinstance(row, tuple) else (row,)
        TESTED.add(call.key)
        params.append(pytest.param(call, *expected, id=repr(call)))
    return params


# ---- element-wise ops ----------------------------------------------------------------------------
UNARY = (
    operator.neg, torch.neg, torch.exp, torch.log, torch.sin, torch.cos, torch.tanh, torch.sigmoid, torch.sqrt,
    torch.rsqrt, torch.abs, torch.erf, torch.square, torch.reciprocal, torch.real, torch.exp2, torch.log1p,
    torch.expm1, F.gelu, F.silu, F.relu, F.dropout, F.mish, F.softplus, F.leaky_relu, F.elu, F.hardswish, F.sigmoid,
    F.relu6, torch.empty_like, torch.zeros_like, torch.ones_like, torch.rand_like, torch.randn_like,
    "neg", "exp", "log", "sin", "cos", "tanh", "sigmoid", "sqrt", "rsqrt", "abs", "float", "half", "bfloat16",
    "double", "contiguous", "clone", "detach", "square", "reciprocal", "erf", "exp2", "bool", "int", "long", "elu",
    "relu",
)
WITH_CHANNELS = (  # (token tensor, per-channel tensor)
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.mod,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.iadd, operator.imul,
    operator.isub, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.maximum,
    torch.minimum, torch.float_power, torch.clamp,
    "add", "sub", "mul", "div", "pow", "float_power", "clamp", "__add__", "__mul__", "__sub__", "__truediv__",
    "__radd__", "__rmul__", "__rsub__",
)
BOOL_X = token(2, 9, 4, dtype=torch.bool)
OTHER_ELEMENTWISE = [
    Call(operator.and_, BOOL_X, MASK), Call(operator.or_, BOOL_X, MASK), Call(torch.where, MASK, X, C),
    Call(torch.lerp, X, C, 0.5), Call(torch.addcmul, X, C, C), Call(torch.full_like, X, 1.0),
    Call("clamp_min", X, 0.0), Call("clamp_max", X, 1.0), Call("masked_fill", X, MASK, 0.0), Call("lerp", X, C, 0.5),
    Call("addcmul", X, C, C),
]


@pytest.mark.parametrize("call, expected", cases(
    *[(Call(op, X), (1, JOINT)) for op in UNARY],
    *[(Call(op, X, C), (1, JOINT)) for op in WITH_CHANNELS],
    *[(call, (1, JOINT)) for call in OTHER_ELEMENTWISE],
    (Call(operator.mul, token(9, 4, dim=0), C9), (1, JOINT)),  # a lower-rank token input: the dim shifts
    (Call(operator.add, token(2, 6, 6, layout=None), token(2, 6, 6, dim=2, layout=None)),
     "inputs disagree on the token axis (dims [1, 2] of the output)"),
    (Call(operator.add, X, token(2, 9, 4, layout=Layout((3, 6), 1))),
     "inputs hold different segments of the token axis (3+video 6, video 6+3)"),
))
def test_broadcast(call, expected):
    """Element-wise ops keep each token's row to itself: the axis and its segments go through."""
    assert verdict(follow(call)) == expected


@pytest.mark.parametrize("call, expected", cases(
    (Call("to", X, torch.float64), (1, JOINT)),
    (Call("type_as", X, C), (1, JOINT)),
    (Call("type", X, torch.float16), (1, JOINT)),
    (Call("type_as", C9, X), None),  # only X's dtype reaches the output
    (Call("to", C9, X), None),
))
def test_dtype_cast(call, expected):
    """The second tensor of x.to(y) / x.type_as(y) gives a dtype, not data."""
    assert verdict(follow(call)) == expected


@pytest.mark.parametrize("call", cases(
    Call("add_", X, C), Call("sub_", X, C), Call("mul_", X, C), Call("div_", X, C), Call("copy_", X, C),
    Call("clamp_", X, 0.0), Call("fill_", X, 0.0), Call("masked_fill_", X, MASK, 0.0), Call("zero_", X),
))
def test_mutating(call):
    """In-place methods are element-wise, and the write into their first argument is recorded
    so that later reads of it are ordered after it."""
    traced = follow(call)
    assert verdict(traced) == (1, JOINT)
    assert traced.axis.mutations == [(traced.node, traced.nodes[X])]


@pytest.mark.parametrize("call", cases(
    Call("size", X), Call("dim", X), Call("numel", X), Call("stride", X),
    Call("is_contiguous", X), Call("element_size", X),
))
def test_metadata(call):
    """Sizes and flags of a token tensor are not token data."""
    assert verdict(follow(call)) is None


@pytest.mark.parametrize("call, expected", cases(
    (Call(getattr, X, "shape"), None),
    (Call(getattr, X, "dtype"), None),
    (Call(getattr, X, "mT"), (2, JOINT)),  # dynamo records x.mT as getattr(x, "mT")
    (Call(getattr, Call(getattr, X, "mT"), "mT"), (1, JOINT)),
    (Call(getattr, X, "real"), (1, JOINT)),
    (Call(getattr, X, "grad"), None),  # no tensor here: nothing to follow
))
def test_attribute(call, expected):
    """Tensor attributes: metadata carries no token data, transposes and views follow the axis."""
    assert verdict(follow(call)) == expected


# ---- ops over channels ---------------------------------------------------------------------------
W = Input((5, 4))  # a linear layer's weight
W_T = Input((4, 5))


@pytest.mark.parametrize("call, expected", cases(
    (Call(F.linear, X, W), (1, JOINT)),
    (Call(torch.matmul, X, W_T), (1, JOINT)),
    (Call(operator.matmul, X, W_T), (1, JOINT)),
    (Call("matmul", X, W_T), (1, JOINT)),
    (Call(torch.matmul, token(9, 4, dim=0), Input((2, 4, 5))), (1, JOINT)),  # batched by the weight: the dim shifts
    (Call(torch.bmm, X, Input((2, 4, 5))), (1, JOINT)),
    (Call("bmm", X, Input((2, 4, 5))), (1, JOINT)),
    (Call(torch.matmul, Input((2, 3, 4)), Call("transpose", X, 1, 2)), (2, JOINT)),  # tokens as columns
    (Call(torch.matmul, token(2, 9, 3, 4), token(2, 9, 4, 5)), (1, JOINT)),  # a product per token
    (Call(torch.matmul, X, Call("transpose", X, 1, 2)), "product of two token tensors (token mixing)"),
    (Call(torch.matmul, token(2, 4, 9, dim=2), Input((9, 5))), "contraction over the token axis"),
    (Call(torch.matmul, Input((2, 5, 9)), X), "contraction over the token axis"),
    (Call(F.linear, X, token(5, 4, dim=0, layout=None)), "linear layer whose weights derive from the tokens"),
    (Call(torch.matmul, X, Input((4,))), "matrix-vector product with token data"),
))
def test_linear(call, expected):
    """A product over the channels is token-wise; one over the tokens mixes them."""
    assert verdict(follow(call)) == expected


def test_per_token_weights_of_a_product_are_gathered_with_the_tokens():
    weights = Input((2, 9, 4, 5))
    traced = follow(Call(torch.matmul, token(2, 9, 1, 4), weights))
    assert verdict(traced) == (1, JOINT)
    assert [(a, dim) for a, dim, _ in traced.axis.tables[traced.node]] == [(traced.nodes[weights], 1)]


@pytest.mark.parametrize("call, pairs", cases(
    (Call(torch.matmul, Call("transpose", X, 1, 2), X), True),  # values^T keys: linear attention
    (Call(torch.einsum, "bnc,bnd->bcd", X, X), True),
    (Call(torch.einsum, "...nc,...nd->...cd", [X, X]), True),
    (Call("sum", X, 1), False),
    (Call(torch.amax, X, dim=(-2, -1)), False),
    (Call(torch.norm, X, dim=-2), False),
))
def test_a_reduction_over_the_tokens_is_a_summary(call, pairs):
    """A reduction over the token axis has no token axis out and reads every token: the
    analysis lists it among the summaries (whose inputs run on every token); one that pairs
    tokens with tokens is a linear attention (a block's self-attention)."""
    traced = follow(call)
    assert verdict(traced) is None
    assert traced.node in traced.axis.summaries
    assert (traced.node in traced.axis.linear_attention) == pairs


@pytest.mark.parametrize("call, expected", cases(
    (Call(torch.einsum, "bnc,cd->bnd", X, W_T), (1, JOINT)),
    (Call(torch.einsum, "...c,cd->...d", X, W_T), (1, JOINT)),
    (Call(torch.einsum, "bnc,bnc->bn", X, C9), (1, JOINT)),  # C9 has a row per token: a table
    (Call(torch.einsum, "bnc,bmc->bnm", X, X), "einsum whose operands carry the token axis under different letters or segments"),
    (Call(torch.einsum, "bnc,cd", X, W_T), "einsum without an explicit output"),
))
def test_einsum(call, expected):
    """einsum follows the token axis by its letter."""
    assert verdict(follow(call)) == expected


def test_mixed_values_joined_back_to_the_stream_are_gathered_like_a_table():
    """An op that mixes tokens (here a roll along them) loses the axis, but adding its output,
    of the token tensor's own shape, back to the stream keeps the stream: the mixed values are
    computed on every token and gathered with the rows. Any other use of them stays lost."""
    mixed = Call(torch.roll, X, 1, 1)
    traced = follow(Call(operator.add, X, Call(operator.mul, mixed, C)))
    assert verdict(traced) == (1, JOINT)
    assert traced.node in traced.axis.joins
    assert [a.target for a, _, _ in traced.axis.tables[traced.node]] == [operator.mul]
    lost = follow(Call("sum", Call(operator.add, X, Call("sum", mixed, 1, keepdim=True)), -1))
    assert verdict(lost) == "call_function roll (roll): call_function roll (roll) works along the token axis"


TOKEN_WEIGHT = token(4, dim=0, layout=None)  # a weight derived from the token stream


@pytest.mark.parametrize("call, expected", cases(
    (Call(F.layer_norm, X, (4,)), (1, JOINT)),
    (Call(torch.layer_norm, X, [4]), (1, JOINT)),
    (Call(torch.rms_norm, X, [4]), (1, JOINT)),
    (Call(F.rms_norm, X, normalized_shape=(4,)), (1, JOINT)),
    (Call(F.layer_norm, X, (9, 4)), "normalisation over the token axis"),
    (Call(F.layer_norm, X, (4,), TOKEN_WEIGHT), "normalisation weights derived from the tokens"),
    (Call(F.layer_norm, Input((2, 9, 4)), (4,), TOKEN_WEIGHT), "normalisation weights derived from the tokens"),
))
def test_norm(call, expected):
    """Normalising each token over its channels is token-wise; over the token axis it mixes."""
    assert verdict(follow(call)) == expected


@pytest.mark.parametrize("call, expected", cases(
    *[(Call(op, X, 0), (0, JOINT)) for op in (
        torch.mean, torch.sum, torch.amax, torch.amin, torch.var, torch.std, torch.logsumexp, torch.prod,
        "mean", "sum", "amax", "amin", "var", "std", "logsumexp", "prod",
    )],
    *[(Call(op, X, 2, 0), (0, JOINT)) for op in (torch.norm, torch.linalg.vector_norm, "norm")],  # (x, ord, dim)
    (Call("sum", X, -1), (1, JOINT)),
    (Call("sum", X, 0, keepdim=True), (1, JOINT)),
    (Call(torch.std, X, 0, True), (0, JOINT)),  # std(x, dim, unbiased): no keepdim
    (Call(torch.var, X, 0, True, True), (1, JOINT)),  # var(x, dim, unbiased, keepdim)
    (Call(torch.norm, X, 2, 0, True), (1, JOINT)),
    (Call("mean", X, (0, 2)), (0, JOINT)),
    (Call("mean", X), "reduction over every dim, tokens included"),
    (Call("norm", X), "reduction over every dim, tokens included"),
))
def test_reduction(call, expected):
    """A reduction over other dims keeps the token axis (moved down by the dims it removes)."""
    assert verdict(follow(call)) == expected


@pytest.mark.parametrize("call, expected", cases(
    *[(Call(op, X, -1), (1, JOINT)) for op in (
        torch.softmax, F.softmax, "softmax", torch.log_softmax, F.log_softmax, "log_softmax", torch.cumsum, "cumsum",
        torch.cumprod, "cumprod", torch.logcumsumexp, "logcumsumexp", "flip",
    )],
    (Call(torch.flip, X, [-1]), (1, JOINT)),
    (Call(F.normalize, X, dim=-1), (1, JOINT)),
    (Call("normalize", X, 2.0, -1), (1, JOINT)),
    (Call(torch.roll, X, 1, -1), (1, JOINT)),
    (Call("roll", X, 1, dims=0), (1, JOINT)),
    (Call(F.softmax, X, 1), "call_function softmax (out) works along the token axis"),
    (Call(F.normalize, X), "call_function normalize (out) works along the token axis"),  # its default dim is 1
    (Call("flip", X, (0, -2)), "call_method flip (out) works along the token axis"),
    (Call(torch.roll, X, 1), "call_function roll (out) works over every dim"),
    (Call(torch.repeat_interleave, X, 2, -1), (1, JOINT)),
    (Call("repeat_interleave", X, 2, dim=1), "call_method repeat_interleave (out) works along the token axis"),
    (Call(torch.repeat_interleave, X, 2), "call_function repeat_interleave (out) works over every dim"),
))
def test_along_dims(call, expected):
    """Ops along given dims are token-wise unless one of them is the token axis."""
    assert verdict(follow(call)) == expected


@pytest.mark.parametrize("call, expected", cases(
    (Call(F.pad, Q, (0, 4)), (2, JOINT)),  # a head dim padded to a size the kernels take
    (Call(torch._C._nn.pad, X, (1, 1, 0, 0)), (1, JOINT)),
    (Call(F.pad, X, (0, 0, 0, 2)), (1, Layout((6, 3, 2), 0))),  # padding rows: a segment computed in full
    (Call(F.pad, Q, pad=(0, 2, 1, 0)), (2, Layout((1, 6, 3), 1))),
    (Call(F.pad, X, (0, 0, 1, 0), "reflect"), "call_function pad (out) pads the token axis other than with "
                                               "constant rows at its ends"),
    (Call(F.pad, X, (0, 0, -1, 0)), "call_function pad (out) pads the token axis other than with constant rows at "
                                    "its ends"),
))
def test_pad(call, expected):
    """Padding channel dims is token-wise; constant rows added at the ends of the token axis are
    segments of their own (as text joined to the video)."""
    assert verdict(follow(call)) == expected


# ---- layout ops ----------------------------------------------------------------------------------
X_SPLIT_CHANNELS = token(2, 9, 2, 2)


@pytest.mark.parametrize("call, expected", cases(
    (Call(torch.reshape, X, (2, 9, 2, 2)), (1, JOINT)),
    (Call(torch.flatten, X_SPLIT_CHANNELS, 2), (1, JOINT)),
    (Call(torch.unflatten, X, 2, (2, 2)), (1, JOINT)),
    (Call(torch.squeeze, token(2, 9, 1, 4), 2), (1, JOINT)),
    (Call(torch.unsqueeze, X, 0), (2, JOINT)),
    (Call("flatten", X_SPLIT_CHANNELS, -2), (1, JOINT)),
    (Call("reshape", X, 18, 4), "reshape that splits or merges the token axis"),
    (Call("squeeze", token(1, 9, 4), 0), (0, JOINT)),
    (Call("unflatten", X, 0, (1, 2)), (2, JOINT)),
    (Call("unsqueeze", X, -1), (1, JOINT)),
    (Call("view", X, 1, 2, 9, 4), (2, JOINT)),
    (Call("view", X, 2, 3, 3, 4), "reshape that splits or merges the token axis"),
    (Call("expand", token(9, 4, dim=0), 2, 9, 4), (1, JOINT)),
    (Call("expand_as", token(9, 4, dim=0), C9), (1, JOINT)),
    (Call("expand_as", Input((4,)), X), None),  # c.expand_as(x): c's values in x's shape
    # Factorised attention regroups [B, N, F, C] as [B * N, F, C]: the token axis folded into the
    # batch, and back.
    (Call("reshape", token(2, 6, 3, 4, layout=VIDEO), 12, 3, 4), (0, VIDEO.fold())),
    (Call("reshape", FOLDED, 2, 6, 3, 4), (1, VIDEO)),
    (Call("reshape", FOLDED, 12, 12), (0, VIDEO.fold())),
    (Call("reshape", X, 18, 4), "reshape that splits or merges the token axis"),  # joint axes do not fold
    (Call(torch.flatten, X), "reshape that splits or merges the token axis"),
    # Complex RoPE: the trailing (real, imaginary) pair dropped, then added back.
    (Call(torch.view_as_complex, X_SPLIT_CHANNELS), (1, JOINT)),
    (Call(torch.view_as_real, token(2, 9, 2, dtype=torch.complex64)), (1, JOINT)),
    (Call(torch.view_as_complex, token(2, 2, 9, 2, dim=2)), (2, JOINT)),
))
def test_reshape(call, expected):
    """The axis is followed through a shape change to the output dim holding the same rows."""
    assert verdict(follow(call)) == expected


@pytest.mark.parametrize("call, expected", cases(
    (Call("repeat", X, 1, 1, 2), (1, JOINT)),
    (Call("repeat", X, (2, 1, 1, 1)), (2, JOINT)),  # a new leading dim
    (Call("repeat", X, 1, 2, 1), "repeats the token axis"),
))
def test_repeat(call, expected):
    """Tiling other dims (keys over heads for grouped-query attention) keeps each token's rows."""
    assert verdict(follow(call)) == expected


@pytest.mark.parametrize("call, expected", cases(
    (Call(torch.permute, X, (0, 2, 1)), (2, JOINT)),
    (Call("permute", X, 1, 0, 2), (0, JOINT)),
    (Call("permute", X, (2, 0, 1)), (2, JOINT)),
    (Call(torch.transpose, X, 1, 2), (2, JOINT)),
    (Call("transpose", X, -1, -2), (2, JOINT)),
    (Call("transpose", X, 0, 2), (1, JOINT)),
    (Call(torch.swapaxes, X, 0, 1), (0, JOINT)),
    (Call("swapaxes", X, 1, -1), (2, JOINT)),
    (Call(torch.movedim, X, 1, -1), (2, JOINT)),
    (Call("movedim", X, 0, 2), (0, JOINT)),
))
def test_permute(call, expected):
    """A permutation carries the token axis to wherever its dim goes."""
    assert verdict(follow(call)) == expected


SPLIT = (VIDEO, TEXT)  # X split at the boundary of its segments


@pytest.mark.parametrize("call, expected", cases(
    (Call(torch.chunk, X, 2, -1), ((1, 1), (JOINT, JOINT))),
    (Call(torch.split, X, 2, -1), ((1, 1), (JOINT, JOINT))),
    (Call(torch.unbind, X, 0), ((0, 0), (JOINT, JOINT))),
    (Call(torch.tensor_split, X, 2, dim=2), ((1, 1), (JOINT, JOINT))),
    (Call("chunk", X, 2, 0), ((1, 1), (JOINT, JOINT))),
    (Call("unbind", X, 2), ((1,) * 4, (JOINT,) * 4)),
    (Call(torch.split, X, [6, 3], 1), ((1, 1), SPLIT)),
    (Call("split", X, [6, 3], dim=1), ((1, 1), SPLIT)),
    (Call("tensor_split", X, [6], 1), ((1, 1), SPLIT)),
    (Call("split_with_sizes", X, (6, 3), dim=1), ((1, 1), SPLIT)),  # Mochi's attention output
    (Call(torch.split_with_sizes, X, [2, 2], -1), ((1, 1), (JOINT, JOINT))),
    (Call("split", X, 3, 1), "split along the token axis that cuts a segment (video 6+3 at 0:3)"),
    (Call(torch.chunk, X, 2, 1), "split along the token axis that cuts a segment (video 6+3 at 0:5)"),
    (Call(torch.unbind, X, 1), "split along the token axis"),
))
def test_split(call, expected):
    """A split along the channels keeps the axis in every piece; along the token axis at the
    segment boundaries, each piece is a segment (text from video)."""
    assert verdict(follow(call)) == expected


TEXT_X = Input((2, 3, 4))  # text tokens: not token data until joined to the video


@pytest.mark.parametrize("call, expected", cases(
    (Call(torch.cat, [token(2, 6, 4, layout=None), TEXT_X], 1), (1, JOINT)),
    (Call(torch.concat, [TEXT_X, token(2, 6, 4, layout=None)], dim=-2), (1, Layout((3, 6), 1))),
    (Call(torch.concatenate, [X, C9], -1), (1, JOINT)),
    (Call(torch.cat, [token(2, 6, 4, layout=None), token(2, 6, 4, layout=None)], 1),
     "concatenation of two tensors that both hold the video tokens"),
    (Call(torch.cat, [X, Call("transpose", token(2, 4, 9, dim=2), 1, 2)], 0), (1, JOINT)),
    (Call(torch.cat, [X, token(2, 9, 4, layout=Layout((3, 6), 1))], -1),
     "concatenated inputs hold different segments of the token axis"),
    (Call(torch.cat, [token(2, 6, 6, layout=None), token(2, 6, 6, dim=2, layout=None)], 0),
     "concatenated inputs disagree on the token axis"),
    (Call(torch.stack, [X, C9]), (2, JOINT)),
    (Call(torch.stack, [X, X], -1), (1, JOINT)),
))
def test_cat(call, expected):
    """Along the token axis the output's segments are its inputs' in order, a non-token input
    (text) a segment of its own; along other dims the inputs must agree."""
    assert verdict(follow(call)) == expected


SPLIT_TOKENS = Call(torch.split, X, [6, 3], 1)
INDEX = Input((2,), dtype=torch.long)


@pytest.mark.parametrize("call, expected", cases(
    (Call(operator.getitem, SPLIT_TOKENS, 1), (1, TEXT)),
    (Call(operator.getitem, SPLIT_TOKENS, 0), (1, VIDEO)),
    (Call(operator.getitem, Call(torch.chunk, X, 4, -1), slice(1, 3)), ((1, 1), (JOINT, JOINT))),
    (Call(operator.getitem, X, (slice(None), slice(None), 0)), (1, JOINT)),
    (Call(operator.getitem, X, 0), (0, JOINT)),
    (Call(operator.getitem, X, None), (2, JOINT)),
    (Call(operator.getitem, X, (Ellipsis, slice(None, 2))), (1, JOINT)),
    (Call(operator.getitem, X, (slice(None), slice(6, None))), (1, TEXT)),
    (Call(operator.getitem, X, (0, slice(None, 6))), (0, VIDEO)),
    (Call(operator.getitem, X, (slice(None), slice(0, 6), None)), (1, VIDEO)),
    (Call(operator.getitem, X, (slice(None), slice(3, None))), "indexing along the token axis (video 6+3 rows)"),
    (Call(operator.getitem, X, (slice(None), 0)), "indexing along the token axis (video 6+3 rows)"),
    (Call(operator.getitem, X, (slice(None), slice(None, None, 2))), "indexing along the token axis (video 6+3 rows)"),
    (Call(operator.getitem, X, (slice(None), INDEX)), "indexing along the token axis (video 6+3 rows)"),
    (Call(operator.getitem, X, INDEX), "indexing along the token axis (video 6+3 rows)"),  # advanced index before it
    (Call(operator.getitem, Input((10,)), Call("long", X)), "indexes a tensor with token data"),
))
def test_getitem(call, expected):
    """Indexing that leaves the token axis whole keeps it; a slice of whole segments along it
    is those segments (the text or the video part of a joint tensor); any other index on it
    mixes up the tokens."""
    assert verdict(follow(call)) == expected


ROWS = Input((2, 9, 2))  # a value with a row per token, written into X


@pytest.mark.parametrize("call, expected", cases(
    (Call(operator.setitem, X, (Ellipsis, slice(0, 2)), ROWS), None),
    (Call(operator.setitem, X, (slice(None), slice(None, 6)), token(2, 6, 4, layout=None)), None),
    (Call(operator.setitem, X, (slice(None), slice(6, None)), TEXT_X), None),
    (Call(operator.setitem, X, (slice(None), 0), 0.0), "indexed write along the token axis, not of whole segments"),
    (Call(operator.setitem, X, (slice(None), slice(3, None)), 0.0),
     "indexed write along the token axis, not of whole segments"),
    (Call(operator.setitem, X, (Ellipsis, slice(0, 2)), token(2, 9, 2, layout=Layout((3, 6), 1))),
     "writes tokens of other segments into the token axis"),
    (Call(operator.setitem, C9, (Ellipsis, slice(0, 2)), Call(operator.getitem, X, (Ellipsis, slice(0, 2)))),
     "writes token values into a tensor without a token axis"),
))
def test_setitem(call, expected):
    """A write into a token tensor off the token axis, or into whole segments of it (RoPE on the
    video part of a joint tensor), is token-wise, recorded as a mutation."""
    traced = follow(call)
    assert verdict(traced) == expected
    assert traced.axis.mutations == ([(traced.node, traced.nodes[X])] if expected is None else [])


# ---- attention -----------------------------------------------------------------------------------
SDPA = F.scaled_dot_product_attention
KEY_MASK = Input((1, 1, 9, 9))


@pytest.mark.parametrize("call, expected, kind", cases(
    (Call(SDPA, Q, Q, Q), (2, JOINT), "self"),
    (Call(torch.ops.astraea.ulysses_attention, Q, Q, Q, scale=0.5, group="ranks"), (2, JOINT), "self"),
    (Call(SDPA, token(2, 2, 6, 4, dim=2, layout=None), Q, Q), (2, VIDEO), "self"),  # video queries, joint keys
    (Call(SDPA, Q, Q, Q, attn_mask=KEY_MASK), (2, JOINT), "self"),
    (Call(SDPA, Q, KV, KV), (2, JOINT), "cross"),
    (Call(SDPA, Q, Q, Q, token(2, 1, 9, 9, dim=2)), "attention mask derived from the tokens", None),
    (Call(SDPA, *[token(2, 9, 2, 4)] * 3), "query token axis is not the sequence axis", None),
    (Call(SDPA, *[token(12, 2, 3, 4, dim=0, layout=VIDEO.fold())] * 3), (0, VIDEO.fold()), None),  # within each token
    (Call(SDPA, KV, Q, Q), None, "reader"),  # another stream's queries over every token's keys/values
    (Call(SDPA, Q, token(2, 2, 3, 4, dim=2, layout=TEXT), Input((2, 2, 3, 4))),
     "attention whose keys and values disagree on carrying tokens", None),
    (Call(SDPA, Q, Q, token(2, 2, 9, 4, dim=2, layout=Layout((3, 6), 1))),
     "attention whose keys/values carry tokens in an unsupported way", None),
))
def test_attention(call, expected, kind):
    """Self-attention where keys and values carry the video tokens (any other segments with
    them), cross-attention where they carry no token data; queries keep their axis."""
    traced = follow(call)
    axis, node = traced.axis, traced.node
    assert verdict(traced) == expected
    assert ("self" if node in axis.self_attention else "cross" if node in axis.cross_attention
            else "reader" if node in axis.kv_readers else None) == kind


# ---- tables: inputs gathered with the tokens -----------------------------------------------------
PER_TOKEN = Input((1, 9, 1))
FOLDED_TABLE = Input((12, 1, 4))
CROSS_MASK = Input((1, 1, 9, 5))


@pytest.mark.parametrize("call, tables", cases(
    (Call(operator.add, X, PER_TOKEN), [(PER_TOKEN, 1, JOINT)]),
    (Call(operator.mul, token(9, 4, dim=0), C9), [(C9, 1, JOINT)]),
    (Call(operator.add, X, C), []),
    (Call("to", X, C9), []),
    (Call("copy_", X, C9), [(C9, 1, JOINT)]),
    (Call(torch.cat, [X, C9], -1), [(C9, 1, JOINT)]),
    (Call(torch.stack, [X, C9]), [(C9, 1, JOINT)]),
    (Call(torch.cat, [token(2, 6, 4, layout=None), TEXT_X], 1), []),  # a segment, not a table
    (Call(operator.setitem, X, (Ellipsis, slice(0, 2)), ROWS), [(ROWS, 1, JOINT)]),
    (Call(operator.setitem, X, (slice(None), slice(6, None)), TEXT_X), [(TEXT_X, 1, TEXT)]),
    (Call(SDPA, Q, Q, Q, attn_mask=KEY_MASK), [(KEY_MASK, 2, JOINT)]),
    (Call(SDPA, Q, KV, KV, attn_mask=CROSS_MASK), [(CROSS_MASK, 2, JOINT)]),
    (Call(operator.add, FOLDED, FOLDED_TABLE), [(FOLDED_TABLE, 0, VIDEO.fold())]),  # a row per (sample, token)
))
def test_rows_of_other_inputs_are_gathered_with_the_tokens(call, tables):
    """An input that is not token data but has a row per token where it meets the token axis
    (RoPE tables, per-token timesteps, masks) is a table: the rewrite gathers its rows."""
    traced = follow(call)
    assert traced.axis.tables.get(traced.node, []) == [(traced.nodes[i], dim, layout) for i, dim, layout in tables]


def test_every_op_of_the_rule_table_has_a_case():
    """A rule registered without a case in this file fails here."""
    assert sorted(map(str, set(RULES) - TESTED)) == []


# ---- the analysis around the rules ---------------------------------------------------------------
SIN = ("call_function", torch.sin)


def raising_rule(p, node):
    raise RuntimeError("boom")


class Block(torch.nn.Module):
    """Attention, then a feed-forward; `sin_on` says where torch.sin applies: to the attention's
    output, in the feed-forward, or nowhere."""

    def __init__(self, sin_on: str):
        super().__init__()
        self.qkv, self.out, self.sin_on = torch.nn.Linear(8, 24), torch.nn.Linear(8, 8), sin_on

    def forward(self, x, t):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).transpose(1, 3).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + (torch.sin(a) if self.sin_on == "attention" else a)
        h = self.out(x)
        return x + (torch.sin(h) if self.sin_on == "feed-forward" else h) * t


class TwoBlocks(torch.nn.Module):
    def __init__(self, *sin_on: str):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(s) for s in sin_on])

    def forward(self, x, t):
        for block in self.blocks:
            x = block(x, t)
        return x


def unfollowed(monkeypatch, rule):
    if rule is None:
        monkeypatch.delitem(RULES, SIN)
    else:
        monkeypatch.setitem(RULES, SIN, rule)
    torch._dynamo.reset()


@pytest.mark.parametrize("rule, reason", [
    (RULES[SIN], None),
    (None, "call_function sin (sin) is not known to be token-wise"),
    (raising_rule, "call_function sin (sin): the analysis failed on it (RuntimeError: boom)"),
], ids=["its rule", "no rule", "a raising rule"])
def test_an_op_the_rules_cannot_follow_makes_its_block_dense_with_a_reason(monkeypatch, rule, reason):
    """The token axis is lost after an op without a rule, or whose rule fails: the block that
    holds it runs dense and the report says why, instead of the compile failing."""
    unfollowed(monkeypatch, rule)
    report = astraea.explain(TwoBlocks("attention", "nowhere"), torch.randn(1, 6, 8), torch.tensor([0.5]))
    assert report.num_sparse_blocks == (2 if reason is None else 1)
    assert reason is None or (not report.blocks[0].sparse and reason in report.blocks[0].reason)


@pytest.mark.parametrize("rule", [None, raising_rule], ids=["no rule", "a raising rule"])
def test_an_op_the_rules_cannot_follow_after_attention_runs_on_every_token_between_blocks(monkeypatch, rule):
    """Unfollowed ops in a feed-forward whose output is added back to the stream: each block
    ends before them, they run on every token, and the report names them; budget 1.0 is still
    the eager model, and a sparse step runs."""
    unfollowed(monkeypatch, rule)
    model, x, t = TwoBlocks("feed-forward", "feed-forward"), torch.randn(1, 6, 8), torch.tensor([0.5])
    report = astraea.explain(model, x, t)
    assert report.num_sparse_blocks == 2 and report.reason is None
    why = "is not known to be token-wise" if rule is None else ": the analysis failed on it (RuntimeError: boom)"
    assert report.every_token == (f"call_function sin {why} (in 2 places)".replace(" :", ":"),)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=astraea.backend(schedule=[1.0, 0.5], full_steps=0))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), model(x, t), rtol=1e-5, atol=1e-6)
        assert compiled(x, torch.tensor([0.4])).shape == x.shape
