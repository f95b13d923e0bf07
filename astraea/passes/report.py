"""The frozen result of the analysis: what astraea found in a graph and what it will do."""

from __future__ import annotations

import collections
import hashlib
import re
from dataclasses import dataclass

import torch.fx as fx

from .blocks import Block
from .token_axis import SDPA, TokenAxis, is_module_state, sdpa_args, shape_of


@dataclass(frozen=True)
class BlockReport:
    index: int
    module: str
    start: str  # graph node that is the block's input
    end: str  # graph node that is the block's output
    sparse: bool
    reason: str | None
    rows_nodes: int  # nodes that run on the selected rows only
    all_tokens_nodes: int  # nodes that feed keys/values and so run on every token
    self_attention: int
    cross_attention: int
    signature: str


@dataclass(frozen=True)
class GraphOutcome:
    """One of the graphs dynamo split a call into (see `astraea.explain`)."""

    sparse_blocks: int
    blocks: int
    reason: str | None  # why it has no sparse block, or why its first dense block is dense


@dataclass(frozen=True)
class Report:
    num_tokens: int | None
    token_grid: tuple[int, ...] | None
    timestep_input: str | None
    blocks: tuple[BlockReport, ...]
    reason: str | None
    structure_hash: str
    ulysses_ranks: int = 1  # ranks the tokens are sharded over; num_tokens is one rank's shard
    graphs: tuple[GraphOutcome, ...] = ()  # when dynamo split the call: every graph, this one included
    graph_breaks: tuple[str, ...] = ()  # where dynamo split it, and why
    every_token: tuple[str, ...] = ()  # token mixing outside attention, run on every token between blocks
    # The tokens are (frame, position) pairs of a flat stream that attention regroups by frame
    # (factorised attention): a selection takes whole positions, the same in every frame.
    whole_positions: bool = False

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_sparse_blocks(self) -> int:
        return sum(b.sparse for b in self.blocks)

    def __str__(self) -> str:
        lines = [
            f"astraea: {self.num_sparse_blocks} of {self.num_blocks} blocks sparse, "
            f"{self.num_tokens} tokens"
            + (f" per rank (Ulysses over {self.ulysses_ranks} ranks)" if self.ulysses_ranks > 1 else "")
            + (f" (grid {'x'.join(map(str, self.token_grid))})" if self.token_grid else "")
            + f", model structure {self.structure_hash}"
        ]
        if self.graphs:
            lines.append(f"  dynamo split this call into {len(self.graphs)} graphs; a block cut by a graph break stays dense")
            lines += [
                f"    graph {i}: {g.sparse_blocks} of {g.blocks} blocks sparse" + (f"; {g.reason}" if g.reason else "")
                for i, g in enumerate(self.graphs)
            ]
            lines += [f"    graph break at {b}" for b in self.graph_breaks]
        if self.reason:
            lines.append(f"  dense: {self.reason}")
        if self.whole_positions:
            lines.append(f"  its attention regroups the tokens by frame: each step selects whole positions, the same in "
                         f"every one of the {self.token_grid[0]} frames, whatever `group` says")
        lines += [f"  on every token, between blocks: {why}" for why in self.every_token]
        for b in self.blocks:
            where = b.module or f"block {b.index}"
            if b.sparse:
                lines.append(
                    f"  {where}: sparse ({b.rows_nodes} ops on selected rows, {b.all_tokens_nodes} on all tokens "
                    f"for keys/values; {b.self_attention} self-, {b.cross_attention} cross-attention)"
                )
            else:
                lines.append(f"  {where}: dense: {b.reason}")
        return "\n".join(lines)


def make_report(
    gm: fx.GraphModule, axis: TokenAxis, blocks: list[Block], reason: str | None, timestep, ulysses_ranks: int = 1
) -> Report:
    return Report(
        num_tokens=axis.num_tokens,
        token_grid=axis.grid,
        timestep_input=timestep.name if timestep is not None else None,
        blocks=tuple(
            BlockReport(
                index=b.index, module=b.module, start=b.start.name, end=b.end.name, sparse=b.reason is None, reason=b.reason,
                rows_nodes=len(b.row_nodes), all_tokens_nodes=len(b.all_token_nodes),
                self_attention=len(b.self_attention) + len(b.linear_attention), cross_attention=len(b.cross_attention),
                signature=b.signature,
            )
            for b in blocks
        ),
        reason=reason,
        structure_hash=structure_hash(gm),
        ulysses_ranks=ulysses_ranks,
        every_token=_mixing_outside_attention(axis),
        whole_positions=axis.frames > 1,
    )


def _mixing_outside_attention(axis: TokenAxis) -> tuple[str, ...]:
    """Why values joined back to the stream were computed on every token, once per kind of op
    ("call_method unflatten: reshape that splits ... (in 30 places)")."""
    reasons = collections.Counter(
        re.sub(r"^(\S+ \S+) \([^)]*\)", r"\1", str(axis.opaque(mixed)))
        for j in axis.joins for mixed, _, _ in axis.tables.get(j, ()) if axis.opaque(mixed)
    )
    return tuple(f"{why} (in {n} places)" if n > 1 else why for why, n in reasons.items())


def structure_hash(gm: fx.GraphModule) -> str:
    """The model's identity for schedules and cost tables: "<parameters>-<attention>".

    The first part hashes the shapes of the parameters and buffers, in order; the second the
    geometry of every attention (heads and head dim of its queries, keys and values: all dims
    but the batch and the sequence). Both are the same for one architecture and config whatever
    the batch, resolution, dtype or torch version (the op sequence is not: dynamo specialises
    some ops on the batch size); the second tells apart models whose weights have the same
    shapes but split them into heads differently. Files written before it existed hold the
    first part alone (`schedule.same_structure`).
    """
    return f"{parameter_hash(gm)}-{_attention_hash(gm)}"


def parameter_hash(gm: fx.GraphModule) -> str:
    h = hashlib.sha256()
    for n in gm.graph.nodes:
        if is_module_state(n):
            h.update(f"{shape_of(n)};".encode())
    return h.hexdigest()[:16]


def _attention_hash(gm: fx.GraphModule) -> str:
    h = hashlib.sha256()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in SDPA:
            for x in sdpa_args(n)[:3]:
                shape = shape_of(x) or ()
                h.update(f"{tuple(shape[1:-2])}x{shape[-1:]};".encode())
    return h.hexdigest()[:8]
