"""`passes/index_maps.py` says two chains of views read a tensor alike exactly when running them on
an index tensor gives equal results, wherever it can say: checked on random chains of small
tensors."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from astraea.passes import index_maps
from astraea.passes.index_maps import Factors

SHAPE = (2, 6, 4)


@st.composite
def chains(draw, steps=4):
    """Ops that apply to the shape they meet, with their arguments."""
    shape, ops = list(SHAPE), []
    for _ in range(draw(st.integers(1, steps))):
        rank = len(shape)
        kind = draw(st.sampled_from(["permute", "transpose", "flatten", "unflatten", "reshape"]))
        if kind == "permute":
            args = (tuple(draw(st.permutations(range(rank)))),)
        elif kind == "transpose":
            args = (draw(st.integers(0, rank - 1)), draw(st.integers(0, rank - 1)))
        elif kind == "flatten":
            start = draw(st.integers(0, rank - 1))
            args = (start, draw(st.integers(start, rank - 1)))
        elif kind == "unflatten":
            dim = draw(st.integers(0, rank - 1))
            divisors = [n for n in range(1, shape[dim] + 1) if shape[dim] % n == 0]
            first = draw(st.sampled_from(divisors))
            args = (dim, (first, -1))
        else:
            total, sizes = math.prod(shape), []
            for n in (2, 3, 2, 4, 6):
                if total % n == 0 and draw(st.booleans()):
                    sizes.append(n)
                    total //= n
            args = (tuple(sizes) + (total,),)
        ops.append((kind, args))
        shape = list(getattr(torch.empty(shape), kind)(*args).shape)
    return ops


def _real(ops):
    x = torch.arange(math.prod(SHAPE)).reshape(SHAPE)
    for op, args in ops:
        x = getattr(x, op)(*args)
    return x


def _mapped(factors, ops):
    dims = factors.dims("x", SHAPE)
    for op, args in ops:
        dims = index_maps.apply(factors, dims, op, args)
    return dims


@settings(max_examples=300, deadline=None)
@given(chains(), chains())
def test_two_chains_read_alike_exactly_when_their_index_tensors_are_equal(a, b):
    """Where a chain regroups across factors (2 x 6 read as 3 x 4) the maps say nothing (None),
    which compares as not alike: a rewrite that needs them then leaves the graph as it is."""
    factors = Factors()
    mapped_a, mapped_b = _mapped(factors, a), _mapped(factors, b)
    real_a, real_b = _real(a), _real(b)
    alike = real_a.shape == real_b.shape and torch.equal(real_a, real_b)
    if mapped_a is None or mapped_b is None:
        assert not factors.same(mapped_a, mapped_b)
    else:
        assert factors.same(mapped_a, mapped_b) == alike


def test_other_ops_and_arguments_are_refused():
    factors = Factors()
    dims = factors.dims("x", SHAPE)
    assert index_maps.apply(factors, dims, "sum", (1,)) is None
    assert index_maps.apply(factors, dims, "unflatten", (1, (4, -1))) is None  # 6 is not a multiple of 4
    assert index_maps.apply(factors, dims, "permute", (0, 0, 1)) is None


ALIKE = [  # two spellings of one regrouping each
    ([("reshape", ((2, 3, 2, 4),)), ("permute", ((0, 2, 1, 3),)), ("flatten", (0, 1))],
     [("unflatten", (1, (3, 2))), ("transpose", (1, 2)), ("flatten", (0, 1))]),
    ([("flatten", (1, 2)), ("unflatten", (1, (6, 4)))], [("contiguous", ())]),
    ([("transpose", (0, 1)), ("reshape", ((6, 8),))], [("permute", ((1, 0, 2),)), ("flatten", (1, 2))]),
    ([("unflatten", (1, (2, -1))), ("flatten", (0, 1)), ("unflatten", (0, (2, 2))), ("flatten", (1, 2))], []),
]
UNLIKE = [  # the same shapes, other elements
    ([("unflatten", (1, (3, 2))), ("transpose", (1, 2)), ("flatten", (0, 1))],
     [("unflatten", (1, (2, 3))), ("flatten", (0, 1))]),
    ([("transpose", (1, 2)), ("reshape", ((2, 6, 4),))], []),
]


def test_known_spellings():
    for pairs, alike in ((ALIKE, True), (UNLIKE, False)):
        for a, b in pairs:
            factors = Factors()
            assert (_real(a).shape == _real(b).shape and torch.equal(_real(a), _real(b))) == alike
            assert factors.same(_mapped(factors, a), _mapped(factors, b)) == alike, (a, b)
