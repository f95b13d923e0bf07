"""Which elements of a tensor a chain of views reads, worked out without the data.

A tensor reached from X by permutes, transposes, flattens, unflattens, views and reshapes reads
X's elements in an order the chain alone fixes. Written as dims of factors (pieces of X's dims,
major to minor), two chains read X alike exactly when their dims list the same factors, so
comparing two spellings of one regrouping costs a few list operations however large X is (an
index tensor of X's size would cost its memory: gigabytes for a video model's activations). A
reshape is the same logical regrouping whether it copies or not, so copies do not matter here.
"""

from __future__ import annotations

import math

Factor = tuple[str, int]  # a name and a size above one
Dims = list[tuple[Factor, ...]]


class Factors:
    """The factors of the maps being compared: a factor cut in two for one map reads as its two
    pieces in all of them."""

    def __init__(self):
        self._pieces: dict[Factor, tuple[Factor, ...]] = {}

    def dims(self, name: str, shape) -> Dims:
        """One factor per dim of `shape` (none for a dim of size one)."""
        return [((f"{name}{i}", n),) if n != 1 else () for i, n in enumerate(shape)]

    def leaves(self, factors) -> tuple[Factor, ...]:
        out = []
        for f in factors:
            out.extend(self.leaves(self._pieces[f]) if f in self._pieces else (f,))
        return tuple(out)

    def group(self, factors, sizes) -> Dims | None:
        """`factors` (major to minor) in consecutive groups of `sizes`, cutting a factor where a
        group ends inside it; None where the sizes do not fit."""
        queue, groups = list(self.leaves(factors)), []
        for size in sizes:
            group = []
            while size > 1:
                if not queue:
                    return None
                f = queue.pop(0)
                if f[1] > size:
                    if f[1] % size:
                        return None
                    major, minor = (f[0] + "<", size), (f[0] + ">", f[1] // size)
                    self._pieces[f] = (major, minor)
                    f = major
                    queue.insert(0, minor)
                if size % f[1]:
                    return None
                group.append(f)
                size //= f[1]
            groups.append(tuple(group))
        return groups if not queue else None

    def same(self, a: Dims | None, b: Dims | None) -> bool:
        return a is not None and b is not None and [self.leaves(d) for d in a] == [self.leaves(d) for d in b]


def apply(factors: Factors, dims: Dims | None, op: str, args: tuple) -> Dims | None:
    """`dims` after the tensor method `op(*args)`; None for any other op or argument."""
    if dims is None:
        return None
    rank = len(dims)
    if not all(isinstance(a, int) or isinstance(a, (tuple, list)) and all(isinstance(n, int) for n in a)
               for a in args):
        return None
    if op == "contiguous":
        return dims
    if op in ("permute", "transpose"):
        order = list(range(rank))
        if op == "transpose" and len(args) == 2:
            a, b = (i % rank for i in args)
            order[a], order[b] = order[b], order[a]
        elif op == "permute":
            order = [i % rank for i in (args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args)]
        else:
            return None
        return [dims[i] for i in order] if sorted(order) == list(range(rank)) else None
    if op == "flatten":
        start, end = (args[0] if args else 0) % rank, (args[1] if len(args) > 1 else -1) % rank
        return dims[:start] + [sum(dims[start:end + 1], ())] + dims[end + 1:]
    if op == "unflatten" and len(args) == 2:
        dim = args[0] % rank
        groups = factors.group(dims[dim], _sizes(args[1], _size(factors, dims[dim])))
        return None if groups is None else dims[:dim] + groups + dims[dim + 1:]
    if op in ("reshape", "view"):
        shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        every = sum(dims, ())
        return factors.group(every, _sizes(shape, _size(factors, every)))
    return None


def _size(factors: Factors, dim) -> int:
    return math.prod(n for _, n in factors.leaves(dim))


def _sizes(shape, total: int) -> list[int]:
    """`shape` with its -1 resolved against `total` elements."""
    known = math.prod(n for n in shape if n != -1)
    return [total // known if n == -1 and known else n for n in shape]
