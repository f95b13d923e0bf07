"""The residual stream and the transformer blocks along it, found from the graph alone.

Every token tensor of the model descends from the token source. The nodes every path from
the source to the last token tensor must pass through (its dominators, from networkx) are
the residual stream: block inputs and residual joins. Each self-attention lies between two
consecutive stream nodes; the stream node just before it starts a block, and the next
block's start ends it (the last block ends one period later, or at its last residual join).

Inside a block, the nodes that feed a self-attention's keys or values, or a reduction over the
tokens (linear attention's summary), must see every token ("all-token" nodes); every other
token node may run on the selected rows only ("row" nodes). Token mixing the analysis does not
follow, added back to the stream (a convolution over the token grid), runs between blocks.
A block with a node whose token axis cannot be followed, or whose intermediate values are
used outside it, stays dense and says why.
"""

from __future__ import annotations

import collections

import hashlib
import operator
import re
from dataclasses import dataclass, field

import networkx as nx
import torch.fx as fx

from .token_axis import SDPA, TokenAxis, sdpa_args, shape_of


@dataclass
class Block:
    index: int
    start: fx.Node
    end: fx.Node
    region: list = field(default_factory=list)
    all_token_nodes: set = field(default_factory=set)  # run on every token (they feed keys/values)
    row_nodes: list = field(default_factory=list)  # may run on the selected rows only
    self_attention: list = field(default_factory=list)
    cross_attention: list = field(default_factory=list)
    summaries: list = field(default_factory=list)  # reductions over the tokens: their inputs see every token
    linear_attention: list = field(default_factory=list)  # the summaries pairing values with keys
    module: str = ""
    signature: str = ""
    reason: str | None = None


def dependency_graph(gm: fx.GraphModule, axis: TokenAxis) -> nx.DiGraph:
    """Data dependencies, with in-place writes ordered before later reads of what they wrote."""
    graph = nx.DiGraph()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        graph.add_node(node)
        for a in node.all_input_nodes:
            graph.add_edge(a, node)
    for write, target in axis.mutations:
        for user in target.users:
            if order[user] > order[write]:
                graph.add_edge(write, user)
    return graph


def find_blocks(gm: fx.GraphModule, axis: TokenAxis) -> tuple[list[Block], str | None]:
    """Blocks along the residual stream, and a reason when there are none.

    The residual stream is followed through the tensors that carry the video tokens; where the
    model keeps text (or other small segments) as a second stream beside it, that stream runs
    through the blocks in full and joins the video tokens only inside them (joint attention),
    so the video stream's dominators still cut the model into blocks. Block boundaries are
    tensors of the video tokens alone.
    """
    if axis.source is None:
        return [], axis.reason
    deps = dependency_graph(gm, axis)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    mutation_nodes = {w for w, _ in axis.mutations}
    token_nodes = [n for n in gm.graph.nodes if axis.is_token(n) or n in mutation_nodes]
    tokens = deps.subgraph(token_nodes)
    video = [n for n in token_nodes if axis.carries_video(n) or n in mutation_nodes or n is axis.source]
    stream = deps.subgraph(video)
    reachable = nx.descendants(stream, axis.source) | {axis.source}
    stream = stream.subgraph(reachable)
    sink = max((n for n in reachable if axis.is_token(n)), key=order.get)
    idom = nx.immediate_dominators(stream, axis.source)
    chain = [sink]
    while chain[-1] is not axis.source:
        chain.append(idom[chain[-1]])
    chain.reverse()
    full_chain = chain
    attentions = [s for s in axis.self_attention if s in reachable]
    attentions += [s for s in axis.linear_attention if any(a in reachable for a in s.all_input_nodes)]
    chain, joint = _boundaries(full_chain, attentions, axis, order)
    if not attentions:
        lost = next((f"token axis lost: {r}" for r in map(axis.opaque, gm.graph.nodes) if r), None)
        return [], "; ".join(r for r in (axis.reason, lost) if r) or "no self-attention along the token stream"

    lost_attention = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA and axis.opaque(n)]
    note = None
    if lost_attention:
        note = f"{len(lost_attention)} attention(s) run dense, token axis lost: {axis.opaque(lost_attention[0])}"
    position = {}
    for s in attentions:
        before = [i for i, c in enumerate(chain) if order[c] < order[s]
                  and (s in joint or _video_alone(axis, c))]
        if before:
            position[s] = before[-1]
    starts = sorted(set(position.values()))
    blocks = []
    for j, p in enumerate(starts):
        if j + 1 < len(starts):
            end = starts[j + 1]
            kind = _video_alone(axis, chain[p])
            if _video_alone(axis, chain[end]) != kind:  # the stream joins or leaves text between the two
                end = max((i for i in range(p + 1, end) if _video_alone(axis, chain[i]) == kind), default=end)
        elif len(starts) > 1 and (within := _end_after_modules(
                chain, p, _block_modules(position, p, starts[-2], blocks[-1].region), video, order)):
            end = within
        elif len(starts) > 1 and p + starts[-1] - starts[-2] < len(chain):
            end = p + starts[-1] - starts[-2]
        else:
            end = _last_join(full_chain, chain, stream, p)
        end = _end_before_mixing(chain, p, end, attentions, axis, order)
        block = Block(index=j, start=chain[p], end=chain[end])
        _fill(block, deps, tokens, axis, order)
        blocks.append(block)
    return blocks, note


def _video_alone(axis: TokenAxis, node: fx.Node) -> bool:
    """A stream tensor of the video tokens alone: a flat stream of (frame, position) pairs too."""
    return axis.layout_of(node).unfold().only_video


def _boundaries(full_chain, attentions, axis: TokenAxis, order: dict) -> tuple[list, set]:
    """The stream nodes a block may start or end at, and the attentions whose blocks start at a
    joint one. Boundaries are [batch, tokens, channels] tensors of the video tokens alone (not
    regrouped into the batch by factorised attention), or [tokens, channels] ones of a model that
    runs one unbatched sequence (Cosmos 3); and where the stream carries small segments joined to
    the video tokens from block to block (text or registers concatenated once before the blocks,
    as research code often writes single-stream blocks), the joint [batch, tokens, channels]
    tensors along that stretch, their video segment sparse and the others computed in full.
    A block is joint when the stream is joint from before its attention to the next one (for
    the last, when the block before it is joint too)."""
    def three_d(c):  # a token axis folded into dim 1 holds (frame, position) pairs: a flat stream
        return axis.tdim.get(c) == 1 and len(shape_of(c) or ()) == 3

    def unbatched(c):
        return axis.tdim.get(c) == 0 and len(shape_of(c) or ()) == 2

    plain = [c for c in full_chain if (three_d(c) or unbatched(c)) and _video_alone(axis, c)]
    joint = [c for c in full_chain if three_d(c) and axis.layout_of(c).has_video and not _video_alone(axis, c)]
    ordered = sorted(attentions, key=order.get)
    fired, kept = set(), set()
    for i, s in enumerate(ordered):
        last_plain = max((order[c] for c in plain if order[c] < order[s]), default=-1)
        previous = order[ordered[i - 1]] if i else -1
        before = [c for c in joint if max(last_plain, previous) < order[c] < order[s]]
        if not before:
            continue
        if i + 1 < len(ordered):
            through = not any(order[s] < order[c] < order[ordered[i + 1]] for c in plain)
        else:
            through = i > 0 and ordered[i - 1] in fired
        if through:
            fired.add(s)
            upto = min((order[c] for c in plain if order[c] > order[s]), default=len(order))
            kept.update(c for c in joint if order[before[0]] <= order[c] < upto)
    kept.update(plain)
    return [c for c in full_chain if c in kept], fired


def _block_modules(position: dict, p: int, q: int, previous_region) -> set[tuple[str, ...]]:
    """The module paths of the block whose attention follows chain[p], from the block before it
    (whose attention follows chain[q]): the attention's path up to the part that numbers the
    block ('transformer_blocks.1'), and every module of the previous block's region numbered at
    that depth, renumbered (a Latte layer's temporal block beside its spatial one; the layers
    after it in the same list, shifted as far as the attention's: STDiT's temporal layer after
    its spatial one)."""
    mine = next(module_path(s) for s, at in position.items() if at == p)
    other = next(module_path(s) for s, at in position.items() if at == q)
    i = next((i for i, (a, b) in enumerate(zip(mine, other)) if a != b), None)
    if i is None:
        return set()
    modules = {tuple(mine[: i + 1])}
    shift = int(mine[i]) - int(other[i]) if mine[i].isdigit() and other[i].isdigit() else None
    for path in map(module_path, previous_region):
        if len(path) > i and path[i] == other[i]:
            modules.add(tuple(path[:i]) + (mine[i],))
        elif shift is not None and len(path) > i and path[:i] == other[:i] and path[i].isdigit():
            # the same list's other layers (an STDiT pair: a spatial, then a temporal layer)
            modules.add(tuple(path[:i]) + (str(int(path[i]) + shift),))
    return modules


def _end_after_modules(chain, p: int, modules: set[tuple[str, ...]], nodes, order: dict) -> int | None:
    """Index of the first stream node after chain[p] that comes after every op of `modules`
    among `nodes` (the video stream's: the block's last residual join, or the reshape back to
    the stream that follows its last module), if any. A text stream updated after the video
    (CogVideoX) does not push the end past the output head's first ops."""
    last = max((order[n] for n in nodes if any(tuple(module_path(n)[: len(m)]) == m for m in modules)), default=None)
    if last is None:
        return None
    return next((i for i in range(p + 1, len(chain)) if order[chain[i]] >= last), None)


def _end_before_mixing(chain, p: int, end: int, anchors, axis: TokenAxis, order: dict) -> int:
    """`end`, or earlier when the stream between chain[p] and chain[end] takes in values of a
    token mixing the analysis does not follow (the convolutions over the token grid of a
    feed-forward, joined back by `TokenAxis.joins`): those values need the whole stream, so the
    block ends at the last stream node before the mixing reads it (past the block's
    attention), and the mixing and its join run on every token between blocks."""
    joins = [j for j in axis.joins if order[chain[p]] < order[j] <= order[chain[end]]]
    if not joins:
        return end
    reads = [a for j in joins for m, _, _ in axis.tables.get(j, ()) for a in _token_inputs_of_mixing(m, axis)]
    first_read = min((order[a] for a in reads), default=order[joins[0]])
    after_anchors = max(order[a] for a in anchors if order[chain[p]] < order[a] <= order[chain[end]])
    cut = [i for i in range(p + 1, end + 1) if after_anchors < order[chain[i]] < first_read]
    return cut[-1] if cut else end


def _token_inputs_of_mixing(mixed: fx.Node, axis: TokenAxis) -> list:
    """The token tensors read by the unfollowed ops that `mixed` comes from."""
    seen, stack, reads = set(), [mixed], []
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a in seen:
                continue
            seen.add(a)
            if axis.is_token(a):
                reads.append(a)
            elif axis.opaque(a):
                stack.append(a)
    return reads


def _last_join(full_chain, chain, stream, p) -> int:
    """Index in `chain` of the last block's end: the last residual join (a stream node with
    several token inputs) after chain[p], or the first tensor of the video tokens alone after
    it (a single-stream block joins on the concatenated tokens, then splits the video off)."""
    after = full_chain.index(chain[p]) + 1
    joins = [i for i in range(after, len(full_chain)) if stream.in_degree(full_chain[i]) > 1]
    if not joins:
        return len(chain) - 1
    at = set(chain)
    end = next((n for n in full_chain[joins[-1]:] if n in at), chain[-1])
    return chain.index(end)


def _fill(block: Block, deps: nx.DiGraph, tokens: nx.DiGraph, axis: TokenAxis, order: dict) -> None:
    first, last = order[block.start], order[block.end]
    after_start = _reached(tokens.successors, block.start, lambda n: order[n] < last)  # up to the end
    inside = (after_start & _reached(tokens.predecessors, block.end, lambda n: order[n] > first)) | {block.end}
    # Keys/values another stream reads in this block (video-to-audio attention) lead to no
    # token output, so the path above misses them; they belong to the block that computes them.
    # So do the token inputs of reductions of a linear attention (its key/value summary).
    for reader in axis.kv_readers:
        if order[reader] < order[block.end]:
            for x in sdpa_args(reader)[1:3]:
                if x in after_start:
                    inside |= (_reached(tokens.predecessors, x, lambda n: order[n] > first) & after_start) | {x}
    for summary in axis.summaries:
        if order[summary] < order[block.end]:
            for x in summary.all_input_nodes:
                if x in after_start:
                    inside |= (_reached(tokens.predecessors, x, lambda n: order[n] > first) & after_start) | {x}
    region = sorted(inside, key=order.get)
    block.region = region
    block.self_attention = [n for n in axis.self_attention if n in inside]
    block.cross_attention = [n for n in axis.cross_attention if n in inside]
    block.summaries = [n for n in axis.summaries if any(a in inside for a in n.all_input_nodes)]
    block.linear_attention = [n for n in axis.linear_attention if n in block.summaries]
    block.module = _module_of(region)
    block.signature = hashlib.sha1(
        "|".join(f"{n.op}:{getattr(n.target, '__name__', n.target)}" for n in region).encode()
    ).hexdigest()[:12]

    if not block.self_attention and not block.linear_attention:
        # Its attention reaches the stream only through ops the analysis does not follow.
        why = next((axis.opaque(m) for j in region if j in axis.joins for m, _, _ in axis.tables.get(j, ())
                    if axis.opaque(m)), None)
        block.reason = f"its attention runs on every token, its output going through: {why}" if why else \
            "no self-attention inside the block"
        return
    stream_shape = shape_of(block.start)  # [batch, tokens, channels], or one sequence's [tokens, channels]
    if (axis.tdim[block.start], len(stream_shape or ())) not in ((1, 3), (0, 2)) \
            or axis.tdim.get(block.end) != axis.tdim[block.start] or shape_of(block.end) != stream_shape:
        block.reason = "the residual stream here is not a [batch, tokens, channels] tensor kept by the block"
        return
    for s in block.self_attention:
        unsupported = _unsupported_attention(s)
        if unsupported:
            block.reason = f"self-attention {s.name} uses {unsupported}"
            return
    feeds_kv = set()
    for s in block.self_attention + [r for r in axis.kv_readers if _reads_inside(r, inside)]:
        _, k, v, _ = sdpa_args(s)
        for x in (k, v):
            feeds_kv |= (_reached(deps.predecessors, x, lambda n: order[n] > first) & inside) | ({x} & inside)
    for x in {a for s in block.summaries for a in s.all_input_nodes if a in inside}:
        feeds_kv |= (_reached(deps.predecessors, x, lambda n: order[n] > first) & inside) | {x}
    # An in-place write into a key/value tensor (RoPE on the video part of a joint key) is part
    # of it: it and what it writes must see every token.
    writes = [(w, target) for w, target in axis.mutations if w in inside]
    while new := {w for w, target in writes if target in feeds_kv and w not in feeds_kv}:
        for w in new:
            feeds_kv |= (_reached(deps.predecessors, w, lambda n: order[n] > first) & inside) | {w}
    # Items picked out of a dense tuple (q of a fused qkv chunk) are views: keep them dense.
    feeds_kv |= {
        n for n in region
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in feeds_kv
    }
    block.all_token_nodes = feeds_kv
    block.row_nodes = [n for n in region if n not in feeds_kv]
    if block.end in feeds_kv:
        block.reason = "the block output itself feeds keys/values"
        return
    escaping = sorted({
        n.name for n in block.row_nodes if n is not block.end
        for u in deps.successors(n) if u not in inside and not _may_leave(n, u, axis)
    })
    lost = next((axis.opaque(u) for n in block.row_nodes if n is not block.end
                 for u in deps.successors(n) if axis.opaque(u)), None)
    if lost:
        block.reason = f"token axis lost inside the block: {lost}"
    elif escaping:
        block.reason = f"intermediate value(s) {escaping[:3]} are used after the block"


def _reached(step, node: fx.Node, within) -> set:
    """The nodes reached from `node` (not itself) by `step` (a graph's successors or
    predecessors) through nodes `within` allows. Every edge of the dependency graph goes forward
    in the graph's order, so bounding a walk by order bounds it by the block's span: a block's
    ancestors found this way cost the block, not the graph before it."""
    seen, stack = set(), [node]
    while stack:
        for n in step(stack.pop()):
            if n not in seen and within(n):
                seen.add(n)
                stack.append(n)
    return seen


def _reads_inside(reader: fx.Node, inside: set) -> bool:
    """Whether a key/value reader's keys or values are computed in this block."""
    _, k, v, _ = sdpa_args(reader)
    return k in inside or v in inside


def _may_leave(node: fx.Node, user: fx.Node, axis: TokenAxis) -> bool:
    """Whether a sparse node of a block may be used after it: its rows form is complete where
    it holds no video tokens (the text stream of a joint block), and a user that picks only
    such segments out of it (the text part of a joint attention's output) reads complete rows."""
    if not axis.carries_video(node) and axis.is_token(node):
        return True
    return user.op == "call_function" and user.target is operator.getitem and axis.is_token(user) \
        and not axis.carries_video(user) and not isinstance(axis.tdim.get(user), tuple)


def _unsupported_attention(node: fx.Node) -> str | None:
    """The attention options the sparse kernel does not implement, if any are set."""
    if len(node.args) > 3:
        return "positional options"
    kw = node.kwargs
    if kw.get("dropout_p", 0.0) not in (0, 0.0):
        return "dropout"
    if kw.get("is_causal", False):
        return "a causal mask"
    return None


def module_path(node: fx.Node) -> list[str]:
    """The path of the module that computed `node` (['blocks', '3', 'attn1']), [] if unknown."""
    stack = node.meta.get("nn_module_stack")
    return _clean_path(list(stack.values())[-1][0]).split(".") if stack else []


def _module_of(region) -> str:
    """The module path of the block's nodes, for reports (e.g. 'blocks.3'): followed down to a
    layer of a list as long as one module holds most of them (a few ops of the next layer or of
    the output head, under a quarter of its, do not count); the range of layers where several of
    one list hold them (an STDiT pair: 'blocks.0-1'), and each list's where several lists of the
    model do (Latte's: 'transformer_blocks.0 + temporal_transformer_blocks.0')."""
    return _path_of([path for path in map(module_path, region) if path], 0)


def _path_of(paths: list, depth: int) -> str:
    counts = collections.Counter(p[depth] for p in paths if len(p) > depth)
    if not counts or (depth and paths[0][depth - 1].isdigit()):  # at a layer of a list: its name
        return ".".join(paths[0][:depth]) if paths else ""
    most = max(counts.values())
    major = [m for m, n in counts.items() if 4 * n >= most]  # in order of first appearance
    if len(major) == 1:
        return _path_of([p for p in paths if len(p) > depth and p[depth] == major[0]], depth + 1)
    if all(m.isdigit() for m in major):
        return ".".join([*paths[0][:depth], f"{min(major, key=int)}-{max(major, key=int)}"])
    if depth == 0:
        return " + ".join(_path_of([p for p in paths if p[0] == m], 1) for m in major)
    return ".".join(paths[0][:depth])


def _clean_path(path: str) -> str:
    """dynamo's "L['self'].__dict__['_modules']['blocks']['3']" -> "blocks.3".

    A model whose forward diffusers' hooks wrap (context parallelism, caches) is reached as
    "L['function_reference'].forward.__self__" instead of "L['self']".
    """
    path = path.replace("L['function_reference'].forward.__self__", "L['self']")
    parts = re.findall(r"[A-Za-z_][A-Za-z0-9_]*|\d+", path)
    return ".".join(p for p in parts if p not in ("L", "self", "__dict__", "_modules", "modules", "dict"))
