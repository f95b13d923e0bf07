"""FX passes: find the token axis and the blocks (analysis), then make blocks sparse (rewrite).

They follow torch.fx's pass infrastructure, so they compose in a `PassManager`:

    analysis = AnalyseTokens()
    PassManager([analysis, SparsifyBlocks(analysis)])(gm)
    analysis.report      # frozen Report: blocks, reasons, token count
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .attention_arguments import name_attention_options
from .blocks import Block, find_blocks
from .compacted_attention import expand_compacted_attention
from .empty_parts import drop_empty_parts
from .flex_attention import attention_from_flex
from .frame_attention import attention_across_frames
from .frame_tables import unsplit_frame_tables
from .library_attention import attention_from_library_ops
from .multihead import expand_multihead_attention
from .opaque_calls import inline_opaque_calls
from .report import BlockReport, Report, make_report
from .subgraph_calls import inline_subgraph_calls
from ..ops.signature import SparseBlockInputs
from .rewrite import rewrite_blocks
from .timestep import find_timestep
from .token_axis import TokenAxis, find_token_axis
from .ulysses import collapse_ulysses_attention
from .written_attention import collapse_written_attention

__all__ = [
    "AnalyseTokens", "SparsifyBlocks", "Report", "BlockReport", "SparseBlockInputs", "analyse",
]


class AnalyseTokens(PassBase):
    """Analysis pass: records a frozen `Report` (and its details).

    Its one change to the graph is normalising: blocks dynamo traced into subgraphs of their own
    (activation checkpointing, `nested_compile_region`) are inlined, calls dynamo keeps opaque
    (einops before 0.8.2) are replaced by the torch ops they run, `nn.MultiheadAttention`'s call is written out around
    one SDPA, FlashAttention's op called directly and `flex_attention` in SDPA's forms become one SDPA, cross-attention
    regrouped per frame becomes one attention masked by frame, per-frame modulation written on
    frames gets tables with a row per token, concatenations drop their empty parts, sequence-parallel (Ulysses) attention is collapsed
    into a single op, so that it reads as self-attention on this rank's tokens, attention
    written out by hand (softmax of q k^T, times v) into one SDPA, and attention over the valid
    text rows gathered by `nonzero` (Mochi) into masked attention of static shape; SDPA's options
    passed by position are passed by keyword.

    `steps_placed_outside`: the graph is a block compiled on its own, whose calls the model's
    clock places (`astraea.compile_blocks`), so it needs no timestep input.
    """

    def __init__(self, steps_placed_outside: bool = False):
        self.steps_placed_outside = steps_placed_outside
        self.report: Report | None = None
        self.axis: TokenAxis | None = None
        self.blocks: list[Block] = []
        self.timestep: fx.Node | None = None

    def call(self, gm: fx.GraphModule) -> PassResult:
        ranks, written, inlined, frames, multihead = 1, 0, 0, 0, 0
        try:
            inlined = inline_subgraph_calls(gm) + inline_opaque_calls(gm)
            multihead = (expand_multihead_attention(gm) + name_attention_options(gm) + attention_from_library_ops(gm)
                         + attention_from_flex(gm) + attention_across_frames(gm))
            frames = unsplit_frame_tables(gm) + drop_empty_parts(gm)
            ranks = collapse_ulysses_attention(gm)
            written = collapse_written_attention(gm) + expand_compacted_attention(gm)
            self.axis = find_token_axis(gm)
            self.blocks, reason = find_blocks(gm, self.axis)
        except Exception as e:  # a graph the analysis cannot read runs dense, saying why
            reason = f"AnalyseTokens could not read this graph ({type(e).__name__}: {e})"
            self.axis, self.blocks = TokenAxis(reason=reason), []
        self.timestep = find_timestep(gm, self.axis.source)
        if self.blocks and self.timestep is None and not self.steps_placed_outside:
            reason = "no timestep input found (a tensor input with one value per batch element)"
            for b in self.blocks:
                b.reason = b.reason or "model has no timestep input to tell steps apart"
        self.report = make_report(gm, self.axis, self.blocks, reason, self.timestep, ranks)
        return PassResult(gm, ranks > 1 or written > 0 or inlined + frames + multihead > 0)


class SparsifyBlocks(PassBase):
    """Rewrite pass: makes every block the analysis accepted token-sparse.

    `inputs` lists, per sparse block, the runtime inputs appended to the graph's signature.
    """

    def __init__(self, analysis: AnalyseTokens):
        self.analysis = analysis
        self.inputs: list[SparseBlockInputs] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.analysis.report is None:
            raise RuntimeError("SparsifyBlocks: run AnalyseTokens on the same graph first")
        result, self.inputs = rewrite_blocks(gm, self.analysis.axis, self.analysis.blocks)
        return result


def analyse(gm: fx.GraphModule) -> Report:
    """The report for a graph, without changing it."""
    analysis = AnalyseTokens()
    analysis(gm)
    return analysis.report
