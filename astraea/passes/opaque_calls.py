"""Inline the calls dynamo keeps opaque, so that the analysis sees the torch ops inside them.

Dynamo does not trace into a function registered with `torch._dynamo.allow_in_graph`: the
graph holds one `call_function` node for the whole call. einops before 0.8.2 registers
`rearrange`, `repeat`, `reduce`, `einsum`, `pack` and `unpack` that way, and research code
writes its head splits, patchifying and joint concatenations with them; to the token rules such
a node is an unknown function, so the token axis is lost there and the model runs dense.

This pass runs each such call once on its arguments' example values (dynamo's fake tensors)
under a `TorchFunctionMode` that records every torch function and tensor method it calls, and
replaces the node with those calls: the same ops, as dynamo would have traced them had it gone
inside. A call is left as it is when it cannot be replayed exactly: an argument that is not a
tensor of static shape, a tensor the recording did not produce (made outside torch) or an
object a graph cannot hold, a write in place, an output that is neither a tensor nor a tuple read
item by item, or an error while running it (a value that depends on the data, for one).
"""

from __future__ import annotations

import inspect
import operator
import types

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .fake_values import fake_mode_of
from .graph_edits import edit_each

KEPT_MODULES = ("torch", "astraea")  # their functions in a graph are ops the rules know, or ours


def inline_opaque_calls(gm: fx.GraphModule) -> int:
    """Replace each opaque call in `gm` by the torch calls it makes; returns how many."""
    return edit_each(gm, _is_opaque, _inline)


def _is_opaque(node: fx.Node) -> bool:
    module = getattr(node.target, "__module__", None) or ""
    return node.op == "call_function" and inspect.isfunction(node.target) and module.split(".")[0] not in KEPT_MODULES


class _Recorder(TorchFunctionMode):
    """Runs each torch call and keeps those that return tensors: (function, args, kwargs, output)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []
        self.writes = False  # a write in place (the aliases it changes are not followed)

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.writes |= _mutates(func, kwargs)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) or (
            isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out)
        ):
            self.calls.append((func, args, kwargs, out))
        return out


def _inline(graph: fx.Graph, node: fx.Node) -> int:
    values = {}
    for a in node.all_input_nodes:
        value = a.meta.get("example_value")
        if not isinstance(value, torch.Tensor) or any(isinstance(s, torch.SymInt) for s in value.shape):
            return 0
        values[a] = value
    fake_mode = fake_mode_of(values.values())
    if fake_mode is None:
        return 0
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
    recorder = _Recorder()
    try:
        with fake_mode, recorder:
            result = node.target(*args, **kwargs)
    except Exception:  # a call that does not run on example values stays opaque
        return 0
    uses = _uses(node, result)
    if uses is None or recorder.writes:
        return 0
    made: dict[int, fx.Node] = {id(v): a for a, v in values.items()}
    new: list[fx.Node] = []
    with graph.inserting_before(node):
        for func, call_args, call_kwargs, out in recorder.calls:
            leaves = tree_flatten((call_args, call_kwargs))[0]
            if any(id(t) not in made if isinstance(t, torch.Tensor) else not _constant(t) for t in leaves):
                made.clear()  # a tensor from outside the recording, or an object a graph cannot hold
                break
            call_args, call_kwargs = tree_map(lambda t: made[id(t)] if isinstance(t, torch.Tensor) else t,
                                              (call_args, call_kwargs))
            op, target, call_args = _as_graph_call(func, call_args)
            created = graph.create_node(op, target, call_args, call_kwargs)
            created.meta = {**node.meta, "example_value": out}
            new.append(created)
            if isinstance(out, torch.Tensor):
                made[id(out)] = created
                continue
            for i, o in enumerate(out):
                item = graph.call_function(operator.getitem, (created, i))
                item.meta = {**node.meta, "example_value": o}
                new.append(item)
                made[id(o)] = item
    keep = all(id(value) in made for _, value in uses)
    if keep:
        for user, value in uses:
            (user or node).replace_all_uses_with(made[id(value)])
            if user is not None:
                graph.erase_node(user)
        graph.erase_node(node)
    for n in reversed(new):
        if not keep or not n.users:
            graph.erase_node(n)
    return int(keep)


def _uses(node: fx.Node, result) -> list[tuple[fx.Node | None, torch.Tensor]] | None:
    """What replaces the call's uses: its one tensor (None: every use), or for a tuple (einops'
    `pack` and `unpack`) the tensor each `getitem` user reads; None where neither holds."""
    if isinstance(result, torch.Tensor):
        return [(None, result)]
    if not isinstance(result, (tuple, list)) or not all(
        u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int) for u in node.users
    ):
        return None
    uses = [(u, result[u.args[1]]) for u in node.users]
    return uses if all(isinstance(value, torch.Tensor) for _, value in uses) else None


def _mutates(func, kwargs) -> bool:
    name = getattr(func, "__name__", "")
    return "out" in kwargs or name in ("__setitem__", "__delitem__") or name.startswith("__i") or (
        name.endswith("_") and not name.endswith("__"))


def _constant(value) -> bool:
    """Whether a graph can hold `value` as an argument (what dynamo writes into graphs)."""
    return value is None or value is Ellipsis or isinstance(
        value, (bool, int, float, str, slice, torch.dtype, torch.device, torch.layout, torch.memory_format)
    )


def _as_graph_call(func, args) -> tuple[str, object, tuple]:
    """How dynamo writes `func(*args)` in a graph: a tensor method as `call_method`, an operator
    dunder as its `operator` function, a property read as `getattr`, anything else as itself."""
    name = getattr(func, "__name__", "")
    owner = getattr(func, "__self__", None)
    if name == "__get__" and isinstance(owner, types.GetSetDescriptorType):
        return "call_function", getattr, (args[0], owner.__name__)
    if getattr(torch.Tensor, name, None) is func:
        dunder = name.startswith("__") and name.endswith("__")
        if dunder and not name.startswith("__r") and hasattr(operator, name.strip("_")):
            return "call_function", getattr(operator, name.strip("_")), tuple(args)
        return "call_method", name, tuple(args)
    return "call_function", func, tuple(args)
