"""What the normalising passes share: edit each node of a graph that matches, then check and
recompile the graph once, if anything changed; erase what an edit left unread."""

from __future__ import annotations

import operator
from typing import Callable, Iterable

import torch.fx as fx
from torch._functorch import predispatch

from .rules import target_name


def edit_each(gm: fx.GraphModule, matches: Callable[[fx.Node], bool], edit: Callable[[fx.Graph, fx.Node], int],
              cleanup: Callable[[fx.Graph], None] | None = None) -> int:
    """`edit(graph, node)` (1 where it rewrote, else 0) for each node of `gm` that `matches`, in
    the order the graph had before the first edit, then `cleanup(graph)` if any did; returns how
    many were rewritten. A node an earlier edit erased has neither users nor inputs left, so it
    matches nothing."""
    done = sum(edit(gm.graph, node) for node in list(gm.graph.nodes) if matches(node))
    if done:
        if cleanup is not None:
            cleanup(gm.graph)
        gm.graph.lint()
        gm.recompile()
    return done


def drop_dead_code(graph: fx.Graph) -> None:
    """Erase what no output depends on after an edit, including what fx's own dead code
    elimination keeps: writes (`t[i] = x`, `t.add_(x)`) into tensors made from nothing that is
    kept, and the vmap levels (`_vmap_increment_nesting` ... `_vmap_decrement_nesting`) left with
    nothing inside. A library call dynamo traced through (flex_attention's block mask is built
    under vmap, by index writes) leaves such code behind when its result is no longer read; fx's
    elimination would keep the writes and drop the levels around them, which then fail at run
    time. A write into what may be a view of a kept value (an input, say) is kept."""
    nodes = list(graph.nodes)
    kept = ancestors(n for n in nodes if n.op in ("placeholder", "output")
                     or (n.is_impure() and not _is_write(n) and n.target not in _VMAP))
    changed = True
    while changed:
        changed = False
        for n in nodes:
            if n not in kept and _is_write(n) and _made_from_kept(n.args[0], kept):
                kept |= ancestors([n])
                changed = True
    for n in reversed(nodes):
        if n not in kept and n.target not in _VMAP:
            graph.erase_node(n)
    emptied = True
    while emptied:
        emptied = False
        nodes = list(graph.nodes)
        for opened, closed in zip(nodes, nodes[1:]):
            if opened.target is _VMAP[0] and closed.target is _VMAP[1]:
                graph.erase_node(opened)
                graph.erase_node(closed)
                emptied = True
                break


def ancestors(nodes: Iterable[fx.Node], *, writes: bool = False) -> set[fx.Node]:
    """`nodes` and everything they are computed from; with `writes`, also what was written into
    each tensor (`out[:, idx] = x`, `out.copy_(x)`): model code often fills a fresh tensor by
    index writes and returns it, and that tensor's own inputs are only its shape."""
    seen, stack = set(), list(nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
            if writes:
                stack.extend(u for u in n.users if _is_write(u) and u.args[0] is n)
    return seen


def _made_from_kept(node, kept: set[fx.Node]) -> bool:
    """`node` may be (a view of) a kept tensor: walking up its first input, a kept node comes
    before an op that makes a new tensor (`new_zeros`, `clone`, ...)."""
    while isinstance(node, fx.Node):
        if node in kept:
            return True
        if target_name(node) in _FRESH or not node.all_input_nodes:
            return False
        node = node.all_input_nodes[0]
    return True  # a write into something unknown: keep it


def _is_write(n: fx.Node) -> bool:
    """A write into its first argument: `setitem`, an in-place operator (`+=`), or an in-place
    method or op (`add_`; not `operator.and_`)."""
    if not n.args:
        return False
    if getattr(n.target, "__module__", None) == "_operator":
        return n.target is operator.setitem or n.target.__name__ in _IN_PLACE_OPERATORS
    name = target_name(n)
    return name.endswith("_") and not name.startswith("_")


_IN_PLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior",
                       "ixor", "ilshift", "irshift"}
# Ops whose result is a new tensor, never a view of their input.
_FRESH = {"new_zeros", "new_ones", "new_empty", "new_full", "clone", "zeros", "ones", "empty", "full", "zeros_like",
          "ones_like", "empty_like", "full_like", "arange"}
_VMAP = (predispatch._vmap_increment_nesting, predispatch._vmap_decrement_nesting)
