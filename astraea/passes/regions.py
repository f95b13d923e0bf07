"""Cut a rewritten graph into regions, so that each distinct region is lowered once.

A video DiT is a stack of identical blocks, and Inductor's time grows with the graph it
lowers: lowering the whole graph at once costs minutes where lowering one block and reusing
its code for every instance costs seconds (what diffusers' `compile_repeated_blocks()` does
for dense models, by module class). Here the cut is found on the rewritten graph itself: the
rewrite marks each sparse block's output (`BLOCK_END`), so the graph splits into one region
per block and the code after the last. A region ends at its block's output, or after the ops
of the block's module that follow it (a joint block's text stream ends after its video stream). Each region has a key (its ops and their arguments,
which of its values leave it, and the shapes of what flows in); regions with equal keys run
the same lowered code, each with its own inputs (its weights, caches and selection).

The first region also holds what precedes the first block (the embeddings); where its tail
has the key of another block's region, the tail is cut off as its own region, so the first block
shares the others' code too. The same holds for any region that opens with glue (the
concatenation of text and video before HunyuanVideo's first single-stream block).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from .blocks import module_path

BLOCK_END = "astraea_block_end"  # node meta: this node is a sparse block's output (its merge); its module path
SOURCES = ("placeholder", "get_attr")


@dataclass(frozen=True)
class Region:
    """A run of consecutive graph nodes, lowered as one function of `inputs` returning `outputs`."""

    nodes: tuple[fx.Node, ...]
    inputs: tuple[fx.Node, ...]  # values from outside, in the order of their first use
    outputs: tuple[fx.Node, ...]  # its values read after it (or returned), in node order
    key: str  # equal keys: the same function

    @property
    def is_block(self) -> bool:
        return any(BLOCK_END in n.meta for n in self.nodes)

    @classmethod
    def of(cls, nodes) -> "Region":
        nodes = tuple(nodes)
        inside = set(nodes)
        inputs = {}
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in inside:
                    inputs.setdefault(a, None)
        outputs = tuple(n for n in nodes if any(u not in inside for u in n.users))
        return cls(nodes, tuple(inputs), outputs, _key(nodes, tuple(inputs), outputs))

    def module(self, root: fx.GraphModule) -> fx.GraphModule:
        """This region as a GraphModule taking `inputs` and returning the tuple of `outputs`."""
        graph, env = fx.Graph(), {}
        for i, a in enumerate(self.inputs):
            env[a] = graph.placeholder(f"input{i}")
            env[a].meta = dict(a.meta)
        for n in self.nodes:
            env[n] = graph.node_copy(n, env.__getitem__)
        graph.output(tuple(env[o] for o in self.outputs))
        return fx.GraphModule(root, graph)


def cut(graph: fx.Graph) -> list[Region]:
    """The regions of a rewritten graph, in order; one region if no block end is marked."""
    nodes = [n for n in graph.nodes if n.op not in (*SOURCES, "output")]
    pieces, piece, owner = [], [], None
    for n in nodes:
        if owner is not None and module_path(n)[: len(owner)] != owner:
            pieces.append(piece)
            piece, owner = [], None
        piece.append(n)
        if BLOCK_END in n.meta:
            owner = n.meta[BLOCK_END].split(".") if n.meta[BLOCK_END] else None
            if owner is None:  # no module to follow: the block ends here
                pieces.append(piece)
                piece = []
    if piece:
        pieces.append(piece)
    regions = [Region.of(p) for p in pieces]
    repeated = {k for k, count in Counter(r.key for r in regions).items() if count > 1}
    blocks = sorted({(len(r.nodes), r.key) for r in regions if r.is_block}, reverse=True)
    return [part for r in regions for part in _split_glue(r, repeated, blocks)]


def _split_glue(region: Region, repeated: set[str], blocks) -> list[Region]:
    """[region], or [what precedes its tail, its tail] where the tail is another block's region."""
    if region.key in repeated:
        return [region]
    for length, key in blocks:
        if length < len(region.nodes):
            tail = Region.of(region.nodes[-length:])
            if tail.key == key:
                return [Region.of(region.nodes[:-length]), tail]
    return [region]


def _key(nodes, inputs, outputs) -> str:
    names = {n: f"%{i}" for i, n in enumerate(nodes)} | {a: f"input{i}" for i, a in enumerate(inputs)}
    # dynamo's values: the same for every region (a node the rewrite added has none; an input
    # of another shape still cannot run code lowered for the first, whose inputs are checked)
    lines = [f"{names[a]}: {_describe(a.meta.get('example_value'))}" for a in inputs]
    for n in nodes:
        args = fx.node.map_arg(n.args, lambda a: names[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: names[a])
        lines.append(f"{n.op} {_target(n.target)} {args!r} {kwargs!r}")
    lines.append("return " + " ".join(names[o] for o in outputs))
    return "\n".join(lines)


def _target(target) -> str:
    if isinstance(target, (str, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    # the object's identity too: two functions may share a name (a key is only compared in-process)
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}@{id(target):x}"


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {tuple(value.shape)} {value.stride()} {value.device}"
    return type(value).__name__ if value is None or isinstance(value, torch.SymInt) else repr(value)
