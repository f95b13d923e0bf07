"""Inline the subgraphs dynamo calls through higher-order ops that only wrap them.

Research code often runs every block under activation checkpointing, also at inference
(`torch.utils.checkpoint.checkpoint(block, x, ...)` behind a flag set for training), and a
model may mark its block's forward `torch.compiler.nested_compile_region`. Dynamo then traces
each block into a subgraph of its own, called by one higher-order op node
(`tag_activation_checkpoint`, `invoke_subgraph`, or a plain `wrap`): to the token rules that
node is an unknown function, the token axis is lost at the first block, and the model runs
dense. Checkpointing only changes what a backward pass recomputes, and the other two only how
the code is compiled: each call computes what its subgraph computes on its operands. So the
call is replaced by the subgraph's nodes, on the operands, as dynamo traces the block without
the wrapper. Higher-order ops that change how the subgraph runs (autocast, grad mode, control
flow) are left alone.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx


def _wrappers() -> dict[object, int]:
    """{op: index of its first operand}: each op's subgraph is its first argument; an
    `invoke_subgraph` call names the subgraph next."""
    ops = torch.ops.higher_order
    found = {getattr(ops, name, None): first
             for name, first in (("wrap", 1), ("tag_activation_checkpoint", 1), ("invoke_subgraph", 2))}
    found.pop(None, None)
    return found


def inline_subgraph_calls(gm: fx.GraphModule) -> int:
    """Replace each call of a wrapping higher-order op in `gm` by its subgraph's nodes (nested
    ones too); returns how many calls were inlined."""
    wrappers, inlined = _wrappers(), 0
    while True:
        calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in wrappers]
        done = sum(_inline(gm, call, wrappers[call.target]) for call in calls)
        if not done:
            break
        inlined += done
    if inlined:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        gm.recompile()
    return inlined


def _inline(gm: fx.GraphModule, call: fx.Node, first: int) -> int:
    body = call.args[0]
    if not (isinstance(body, fx.Node) and body.op == "get_attr"):
        return 0
    sub = gm.get_submodule(body.target)
    if not isinstance(sub, fx.GraphModule):
        return 0
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    operands = call.args[first:]
    (output,) = [n for n in sub.graph.nodes if n.op == "output"]
    returned = output.args[0]
    users = list(call.users)
    if len(placeholders) != len(operands):
        return 0
    if isinstance(returned, (tuple, list)) and not all(
        u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int) for u in users
    ):
        return 0  # a tuple read other than item by item: left whole
    env: dict[fx.Node, object] = dict(zip(placeholders, operands))
    graph = gm.graph
    with graph.inserting_before(call):
        for node in sub.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if node.op == "get_attr":  # a constant or a nested subgraph of the body: moved up
                name = _free_name(gm, f"{body.target}_{node.target}".replace(".", "_"))
                setattr(gm, name, operator.attrgetter(node.target)(sub))  # nn.Module registers a module
                env[node] = copied = graph.get_attr(name)
                copied.meta = dict(node.meta)
            else:
                env[node] = copied = graph.node_copy(node, env.__getitem__)
            _rehome(copied, call)
    mapped = fx.node.map_arg(returned, env.__getitem__)
    if isinstance(returned, (tuple, list)):
        for user in users:
            user.replace_all_uses_with(mapped[user.args[1]])
            graph.erase_node(user)
    else:
        call.replace_all_uses_with(mapped)
    graph.erase_node(call)
    return 1


def _rehome(copied: fx.Node, call: fx.Node) -> None:
    """Give `copied` the module path of the call it was inlined from. Dynamo traces a
    `nested_compile_region` once and calls that subgraph from every instance of the module, its
    nodes named after the first ('blocks.0.to_q' in the call of 'blocks.2'); the block analysis
    reads which layer an op belongs to from these paths."""
    stack, caller = copied.meta.get("nn_module_stack"), call.meta.get("nn_module_stack")
    if not stack or not caller:
        return
    (old, cls), (new, new_cls) = next(iter(stack.values())), list(caller.values())[-1]
    if old == new or cls is not new_cls:
        return
    copied.meta["nn_module_stack"] = {
        key: (new + path[len(old):] if path == old or path.startswith(old + ".") else path, c) for key, (path, c) in stack.items()}


def _free_name(gm: fx.GraphModule, name: str) -> str:
    candidate, i = name, 0
    while hasattr(gm, candidate):
        i += 1
        candidate = f"{name}_{i}"
    return candidate
