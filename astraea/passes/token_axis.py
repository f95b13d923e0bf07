"""Which dimension of every tensor in the graph is the token axis, and where tokens mix.

The token axis is known by where it comes from, never by its size: the analysis tries the
tensors that feed every attention's queries (the patch embedding's output among them), and for
each of their dims propagates a token axis forward op by op, through the rules of `rules.py`.
The try that explains the most attentions wins: self-attention where keys and values carry the
propagated axis, cross-attention where they carry none. Sizes only check consistency, so a clip
whose token count equals the channel count, the text length or the head dim is followed as any
other.

Each op either keeps every token's row independent of the other rows (token-wise: the rewrite
may run it on any subset of rows), or mixes rows. The mixing the rewrite understands is
attention through its keys and values, and reductions over the token axis (summaries, such as
linear attention's values^T keys), whose inputs run on every token; any other mixing, or an op
without a rule, makes the axis "opaque" from there on. Opaque values added back to the stream
in their own shape are computed on every token and gathered with the rows (joins); any other
block containing an opaque node stays dense with that reason. A rule that fails with an
unexpected exception counts as such an op, with the error as the reason.

Tensors that do not derive from the token stream but carry one row per token along the axis
they are combined on (RoPE tables, per-token timesteps, masks) are "tables": the rewrite gathers
them with the tokens. Tensors concatenated to the token stream along its axis (text for joint
attention) become segments of the axis (`layout.py`), always computed in full.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .graph_edits import ancestors
from .layout import Layout
from .rules import SDPA, SPLIT, Mix, broadcast, describe, rule_for, sdpa_args, shape_of
from .rules import reshape as RESHAPE_RULE

MAX_SOURCE_TRIES = 32  # (tensor, dim) candidates propagated before giving up
NO_ATTENTION = ("no self-attention: no attention op (scaled_dot_product_attention or Ulysses attention) "
                "and no key/value summary (linear attention) found")


class Opaque(str):
    """Why a tensor's token axis cannot be followed (a token-mixing or unknown op)."""


@dataclass
class TokenAxis:
    """Result of the analysis: the token axis of each token-carrying node.

    tdim[node] is an int (the token dim), a tuple of ints (tuple outputs), or an Opaque
    reason. layout[node] gives the segments of that axis where it is not the video tokens
    alone. tables[node] lists (input, dim, layout) of non-stream inputs that must be gathered
    with the tokens. self_attention lists attention nodes whose keys/values carry the video
    tokens. kv_readers lists attention nodes whose queries are another stream (audio reading
    the video) over keys/values of the video tokens: their output has no token axis, and their
    keys/values, like self-attention's, must see every token. summaries lists reductions over
    the token axis (linear attention's key/value summary): no token axis out, every token in;
    like keys and values, what feeds them runs on every token; linear_attention lists those
    that pair two token tensors (values^T keys), the self-attention of a linear-attention block.
    joins lists element-wise ops
    that add values of an unfollowed token mixing (a convolution over the token grid) back to
    the stream; those values are tables of the join. mutations lists in-place writes
    (setitem, x.add_(...)) as (node, mutated input).
    """

    num_tokens: int | None = None
    source: fx.Node | None = None
    grid: tuple[int, ...] | None = None
    tdim: dict = field(default_factory=dict)
    layout: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)
    self_attention: list = field(default_factory=list)
    cross_attention: list = field(default_factory=list)
    kv_readers: list = field(default_factory=list)
    summaries: list = field(default_factory=list)
    linear_attention: list = field(default_factory=list)
    joins: list = field(default_factory=list)
    mutations: list = field(default_factory=list)
    reason: str | None = None

    @property
    def frames(self) -> int:
        """Frames the token source folds with its positions (a flat stream of factorised
        attention, `_best_try`); 1 for a token axis of tokens alone."""
        layout = self.layout.get(self.source)
        return self.num_tokens // layout.total if isinstance(layout, Layout) and layout.folded else 1

    def is_token(self, node) -> bool:
        """A tensor (int axis) or tuple of tensors (tuple of axes) with a followed token axis."""
        return isinstance(node, fx.Node) and isinstance(self.tdim.get(node), (int, tuple))

    def opaque(self, node) -> Opaque | None:
        value = self.tdim.get(node)
        return value if isinstance(value, Opaque) else None

    def layout_of(self, node) -> Layout:
        """The segments of a token tensor's axis (the video tokens alone unless recorded)."""
        layout = self.layout.get(node)
        return layout if isinstance(layout, Layout) else Layout.of_video(self.num_tokens)

    def carries_video(self, node) -> bool:
        """A token tensor (or tuple of them) holding the sparse video tokens, not only small
        segments that are always computed."""
        t, layout = self.tdim.get(node), self.layout.get(node)
        if isinstance(t, tuple):
            return not isinstance(layout, tuple) or any(part.has_video for part in layout)
        return isinstance(t, int) and (layout is None or layout.has_video)


def find_token_axis(gm: fx.GraphModule) -> TokenAxis:
    """Run the analysis on a dynamo (torch-level) graph."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    attentions = [n for n in nodes if n.op == "call_function" and n.target in SDPA]
    output = next(n for n in reversed(nodes) if n.op == "output")
    made_output = ancestors([output], writes=True)
    # The token stream feeds the model's output, attention queries, and the values of
    # self-attention (tables such as RoPE reach queries and keys only). A model whose
    # self-attention is linear (a key/value summary written as plain ops) has only its
    # cross-attention's queries to go by: those tensors are tried when no other explains a
    # token mixing.
    queries, values = set(), set()
    for a in attentions:
        q, _, v, _ = sdpa_args(a)
        queries |= ancestors([q]) if isinstance(q, fx.Node) else set()
        values |= ancestors([v]) if isinstance(v, fx.Node) else set()
    first = _candidates(queries & values & made_output, order)
    tried_first = set(first)
    rest = [c for c in _candidates((queries if attentions else set(nodes)) & made_output, order) if c not in tried_first]
    if not first and not rest:
        return TokenAxis(reason="no tensor with a token axis feeds every attention's queries" if attentions else
                         NO_ATTENTION)
    last_read = {n: max((order[u] for u in n.users), default=order[n]) for n in nodes}
    best = _best_try(first, attentions, nodes, order, last_read)
    if not _mixes(best[0]):
        best = max(best, _best_try(rest, attentions, nodes, order, last_read), key=lambda b: b[1] or ())
    if not (best[1] and best[1][0]):  # no token mixing over a stream that makes the output: one
        # unbatched sequence, [tokens, channels], as Cosmos 3 packs its streams?
        unbatched = _unbatched_candidates(queries & values & made_output, order)
        best = max(best, _best_try(unbatched, attentions, nodes, order, last_read), key=lambda b: b[1] or ())
    best = best[0]
    if not _mixes(best):
        best.reason = (
            f"no self-attention: none of the {len(attentions)} attention op(s) takes keys and values from "
            "its queries' tokens, and no reduction over the token axis summarises them (linear attention)"
        ) if attentions else NO_ATTENTION
    return best


def _candidates(tensors, order: dict) -> list[tuple[fx.Node, int]]:
    """(tensor, dim) to try as the token source: [batch, tokens, channels] tensors first (the
    shape of a transformer's residual stream; a latent grid or a positional table before it
    only reaches the tokens through a reshape), earliest first among them."""
    return [
        (source, dim)
        for source in sorted(tensors, key=lambda n: (len(shape_of(n) or ()) != 3, order[n]))
        if not is_module_state(source) and len(shape_of(source) or ()) >= 3
        for dim, size in enumerate(shape_of(source)) if dim > 0 and size > 1
    ]


def _unbatched_candidates(tensors, order: dict) -> list[tuple[fx.Node, int]]:
    """(tensor, 0) for the [tokens, channels] tensors among `tensors`, earliest first: tried
    last, as a batched model's 2-D tensors are its per-sample vectors ([batch, channels])."""
    return [(source, 0) for source in sorted(tensors, key=order.get)
            if not is_module_state(source) and len(shape_of(source) or ()) == 2 and shape_of(source)[0] > 1]


def _folds(nodes) -> dict[int, set[int]]:
    """For each dim size some reshape in the graph splits, the sizes of the last factor it
    splits it into (the positions, when it regroups a flat stream of frames: `[B, F * S, C]` as
    `[B, F, S, C]`, or at once as `[B * F, S, C]`)."""
    found: dict[int, set[int]] = {}
    for node in nodes:
        if node.op not in ("call_method", "call_function") or rule_for(node) is not RESHAPE_RULE or not node.args:
            continue
        ins, outs = shape_of(node.args[0]), shape_of(node)
        if not ins or not outs:
            continue
        for k, n in enumerate(ins):
            for j, size in enumerate(outs):
                if 1 < size < n and n % size == 0 and math.prod(outs[:j + 1]) == math.prod(ins[:k + 1]) \
                        and math.prod(outs[:j]) != math.prod(ins[:k]):
                    found.setdefault(n, set()).add(size)
    return found


def _lost_at_split(trial: TokenAxis) -> bool:
    return any(isinstance(t, Opaque) and SPLIT in t for t in trial.tdim.values())


def _positions(layout) -> int | None:
    return layout.total if isinstance(layout, Layout) and layout.folded else None


def _mixes(trial: TokenAxis | None) -> bool:
    return trial is not None and bool(trial.self_attention or trial.linear_attention)


def _best_try(tries, attentions, nodes, order, last_read: dict) -> tuple[TokenAxis | None, tuple | None]:
    """The try that explains the most: a token mixing that reaches the output, then the most
    self-attentions, then the most attentions with a token axis; ties go to the longer axis
    (a block compiled on its own returns its text stream too, so only the length tells the
    video, the many tokens, from the text: CogVideoX). A try that reaches no attention because
    a reshape splits its tokens is followed by the same source read as a flat stream of frames
    (`_better` weighs the two readings). Each try is followed only as far as some tensor with
    its token axis is read (`last_read`: each node's last reader's place; what comes after cannot
    change its score, and most tries die at the first linear layer); the chosen one, if cut
    short, again to the end, for the reasons it reports."""
    best, best_score, rerun, covered, tried = None, None, None, set(), 0
    folds, tries = None, [(source, dim, None) for source, dim in reversed(tries)]  # popped from the end
    while tries:
        source, dim, positions = tries.pop()
        if (source, dim, positions) in covered:
            continue  # an earlier try reached this tensor with this axis: it would find the same
        if tried == MAX_SOURCE_TRIES:
            break
        if positions is None:  # a flat-stream try is the one before's second reading
            tried += 1
        size = shape_of(source)[dim]
        trial, cut = _trial(source, dim, positions, nodes, order, last_read)
        covered |= {(n, t, _positions(trial.layout.get(n))) for n, t in trial.tdim.items() if isinstance(t, int)}
        if positions is None and not _mixes(trial) and _lost_at_split(trial):
            # no attention reached, the axis lost where a reshape splits the tokens: factorised
            # attention on a flat stream? Next, the same source as (frame, position) pairs, for
            # each split of its size
            folds = _folds(nodes) if folds is None else folds
            tries += [(source, dim, n) for n in sorted(folds.get(size, ()), reverse=True)]
        explained = sum(isinstance(trial.tdim.get(a), int) for a in attentions)
        score = (_mixes(trial) and _output_carries_source(trial, nodes, order), len(trial.self_attention),
                 explained, trial.num_tokens if _mixes(trial) else 0)
        if best is None or _better(trial, score, best, best_score, order):
            best, best_score, rerun = trial, score, (source, dim, positions) if cut else None
    if rerun is not None:
        best = _trial(*rerun, nodes, order)[0]
    return best, best_score


def _trial(source: fx.Node, dim: int, positions: int | None, nodes: list, order: dict,
           last_read: dict | None = None) -> tuple[TokenAxis, bool]:
    """The token axis that `source`'s `dim` gives (as a flat stream of frames of `positions`
    each, if given), followed to the end of the graph, or, with `last_read`, as long as a tensor
    with the axis is read; and whether that cut it short."""
    size = shape_of(source)[dim]
    grid = _grid(source, dim) if positions is None else (size // positions, positions)
    trial = TokenAxis(num_tokens=size, source=source, grid=grid)
    trial.tdim[source] = dim
    if positions is not None:
        trial.layout[source] = Layout.of_video(positions).fold()
    return trial, _Propagator(trial).run(nodes[order[source] + 1:], order, last_read)


def _better(trial: TokenAxis, score: tuple, best: TokenAxis, best_score: tuple, order: dict) -> bool:
    """Whether `trial` explains more than `best`. Between a flat-stream reading and a plain one,
    which explain different tensors' axes (frames as tokens inside a temporal layer; a channel
    dim a reshape splits), only the mixing and the self-attentions count, ties going to the
    earlier source: the token stream starts before what it feeds."""
    if (trial.frames > 1) == (best.frames > 1):
        return score > best_score
    return (*score[:2], -order[trial.source]) > (*best_score[:2], -order[best.source])


def _output_carries_source(trial: TokenAxis, nodes: list, order: dict) -> bool:
    """Whether an output of the graph is made from the source's tokens: for some returned
    tensor, the last tensor with a followed token axis before it holds them. Text joined to the
    video for joint attention explains every attention as well as the video does, but a model's
    output is the video's (a block compiled on its own returns both streams)."""
    output = next(n for n in reversed(nodes) if n.op == "output")
    for returned in output.all_input_nodes:
        last = max((n for n in ancestors([returned]) if isinstance(trial.tdim.get(n), int)), key=order.get, default=None)
        if last is not None and trial.carries_video(last):
            return True
    return False


def is_module_state(node: fx.Node) -> bool:
    """A parameter or buffer input, as opposed to call data.

    Dynamo records where each input came from; a module's `_parameters[...]` or `_buffers[...]`
    is state, however the module was reached (through `self`, or a hook's wrapped forward).
    """
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return str(node.target).lower().startswith("l_self")
    name = source.name() if callable(source.name) else source.name  # e.g. "L['self']._modules['proj']._parameters['weight']"
    return re.search(r"\b_(parameters|buffers)\b", name) is not None


def _grid(source: fx.Node, dim: int) -> tuple[int, ...] | None:
    """Frames x height x width of the token axis, when it was made by flattening a video grid
    (possibly moved to its place by a transpose or permute since)."""
    while source.op in ("call_method", "call_function") and source.target in (
        "permute", "transpose", "swapaxes", "movedim", torch.permute, torch.transpose, torch.swapaxes, torch.movedim,
    ):
        source = source.args[0]
    if source.target in ("flatten", torch.flatten):
        parent = source.args[0]
        shape = shape_of(parent)
        start = source.args[1] if len(source.args) > 1 else source.kwargs.get("start_dim", 0)
        end = source.args[2] if len(source.args) > 2 else source.kwargs.get("end_dim", -1)
        if shape:
            end = end % len(shape)
            dims = shape[start:end + 1]
            if len(dims) == 3:
                return tuple(dims)
    return None


class _Propagator:
    """Forward pass over the nodes after the token source, applying each op's rule."""

    def __init__(self, result: TokenAxis):
        self.r = result

    def run(self, nodes, order: dict | None = None, last_read: dict | None = None):
        """With `last_read` (each node's last reader's place in `order`), stop where no tensor with
        the axis is read any more: only tensors with it give a later one an axis (the rest would be
        marked as having lost it, which only the reasons read). Returns whether it stopped so."""
        horizon = last_read[self.r.source] if last_read is not None else None
        for node in nodes:
            if horizon is not None and order[node] > horizon:
                return True
            if node.op in ("placeholder", "get_attr", "output"):
                continue
            inputs = node.all_input_nodes
            if all(self.r.tdim.get(a) is None for a in inputs):
                continue  # no token data in: shared by all tokens (a dtype read off a token tensor)
            mixed = [a for a in inputs if isinstance(self.r.tdim.get(a), Opaque)]
            self.r.tdim[node] = self.join(node, mixed) if mixed else self.apply(node)
            if horizon is not None and not isinstance(self.r.tdim[node], (Opaque, type(None))):
                horizon = max(horizon, last_read[node])  # a token tensor (or a tuple of them) read up to there
            if isinstance(self.r.tdim[node], int) and node not in self.r.layout:
                first = next((a for a in inputs if isinstance(self.r.tdim.get(a), int)), None)
                if isinstance(self.r.layout.get(first), Layout):
                    self.r.layout[node] = self.r.layout[first]
        return False

    def apply(self, node):
        rule = rule_for(node)
        if rule is None:
            return Opaque(f"{describe(node)} is not known to be token-wise")
        try:
            return rule(self, node)
        except Mix as e:
            return Opaque(f"{describe(node)}: {e}")
        except Exception as e:  # a rule that cannot read this node: dense, with the reason
            return Opaque(f"{describe(node)}: the analysis failed on it ({type(e).__name__}: {e})")

    def join(self, node, mixed):
        """The token axis of an element-wise op joining values of a token mixing the analysis
        does not follow (a convolution over the token grid) back to a token tensor of their own
        shape: the mixed values are computed on every token and gathered with the rows, like a
        table. Any other use of them loses the axis."""
        tokens = [a for a in node.all_input_nodes if isinstance(self.r.tdim.get(a), int)]
        shape = shape_of(node)
        if rule_for(node) is not broadcast or not tokens or shape is None \
                or any(shape_of(a) != shape for a in mixed + tokens) or len(shape) < 2:
            return Opaque(self.r.tdim[mixed[0]])
        try:
            out = broadcast(self, node, [a for a in node.all_input_nodes if a not in mixed and shape_of(a) is not None])
            for a in mixed:
                self.table(node, a, out, self.layout(tokens[0]))
        except Mix:
            return Opaque(self.r.tdim[mixed[0]])
        self.r.joins.append(node)
        return out

    # ---- what rules ask ------------------------------------------------------------------
    def td(self, a):
        return self.r.tdim.get(a) if isinstance(a, fx.Node) else None

    def layout(self, a) -> Layout:
        value = self.r.layout.get(a)
        return value if isinstance(value, Layout) else Layout.of_video(self.r.num_tokens)

    def table(self, node, arg, dim, layout: Layout):
        """Record `arg` (a non-stream input) as a table to gather along `dim` if it has a row
        per token of `layout`."""
        shape = shape_of(arg)
        if shape is None or dim < 0 or dim >= len(shape) or shape[dim] == 1:
            return
        if layout.folded and shape[dim] % layout.total == 0:  # a row per (sample, token)
            self.r.tables.setdefault(node, []).append((arg, dim, layout))
            return
        if shape[dim] != layout.total:
            raise Mix(f"input {arg.name} has {shape[dim]} rows where the token axis has {layout.total}")
        self.r.tables.setdefault(node, []).append((arg, dim, layout))
