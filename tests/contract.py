"""Check the sparse-block contract on a live runner, one call at a time, per segment.

For a call of the rewritten graph, record every value it computes, and each block's input x,
output y, selected indices and cache before the call. Then replay the dense graph block by
block: every node inside a sparse block is computed densely from inputs taken from the sparse
run (the block's input, and the text stream where a joint block has one), and compared:
- the video tokens: selected rows equal the dense block's output for that input, the others
  are x plus the cached contribution;
- every tensor a block hands on that holds only small segments (the text stream of a joint
  block) equals its dense value exactly: those rows are always computed, with fresh keys and
  values of every token.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

import astraea
from astraea.flops import count_flops, counting
from astraea.passes import AnalyseTokens
from astraea.passes.rewrite import VIDEO_SEGMENT
from tests.models import sample


class _RecordAll(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values, self.blocks = {}, []

    def run_node(self, n):
        if n.op == "call_function" and n.target is torch.ops.astraea.merge_rows:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            x, _, idx, cache = args[:4]
            before = cache.clone()  # what the rows not recomputed reuse: the cache, or its forecast
            if kwargs.get("forecast"):
                slope, stale = args[7:9]
                before = cache + slope * stale[..., None]
            y = self.call_function(n.target, args, kwargs)
            # A joint stream (text joined to the video from block to block): the merge reads the
            # video segment of the block's input, `start[part]`.
            source, part = n.args[0], None
            if source.meta.get(VIDEO_SEGMENT):
                source, part = source.args
            self.blocks.append({"x": x, "y": y, "idx": idx, "cache_before": before,
                                "start": self.values[source.name] if part is not None else x, "part": part})
            return y
        value = super().run_node(n)
        self.values[n.name] = value
        return value


class _DenseReplay(fx.Interpreter):
    """The dense graph, with every node outside the sparse blocks (and each block's input)
    taken from the sparse run; the nodes of the blocks, and the nodes right after them that
    read the blocks' small segments, computed."""

    def __init__(self, gm, recorded: dict, starts: dict, compute: set):
        super().__init__(gm)
        self.recorded, self.starts, self.compute, self.values = recorded, starts, compute, {}

    def run_node(self, n):
        if n.name not in self.compute and n.name in self.recorded and n.op != "placeholder":
            value = self.recorded[n.name]
        else:
            value = self.values[n.name] = super().run_node(n)
        return self.starts.get(n.name, value)


def whole_graph(graph_fn) -> torch.fx.GraphModule:
    """The rewritten graph a runner runs, whole (regional lowering keeps the graph it cut)."""
    return getattr(graph_fn, "graph_module", graph_fn)


class ContractChecker:
    """Stands in for a runner's graph and checks the contract on every call it runs.

    Install with `runner.graph_fn = ContractChecker(runner)` (or on another form of the graph,
    `ContractChecker(runner, graph)`); `checked` counts the blocks checked, `segments` the
    small-segment tensors checked, and `selected` records the indices of each call.
    """

    def __init__(self, runner, graph=None, atol=1e-5, rtol=1e-5):
        self.gm, self.dense_gm, self.report = whole_graph(graph or runner.graph_fn), runner.dense_gm, runner.report
        self.num_inputs = sum(n.op == "placeholder" for n in self.dense_gm.graph.nodes)
        self.atol, self.rtol = atol, rtol
        self.checked, self.segments, self.selected = 0, 0, []
        analysis = AnalyseTokens()
        # The dense graph as the analysis normalises it (subgraphs and opaque calls inlined,
        # attention collapsed), whose node names the rewritten graph keeps: the one replayed.
        self.normalised = copy.deepcopy(self.dense_gm)
        analysis(self.normalised)
        sparse = [b for b in analysis.blocks if b.reason is None]
        assert [b.end.name for b in sparse] == [b.end for b in self.report.blocks if b.sparse]
        inside = {n.name for b in sparse for n in b.region}
        ends = {b.end.name for b in sparse}
        # Users after a block of what it computed, other than its output: the small segments
        # it hands on (the text stream), which must be exact.
        self.handed_on = {
            u.name for b in sparse for n in b.row_nodes if n is not b.end for u in n.users if u.name not in inside
        }
        self.compute = inside | self.handed_on
        assert not (self.handed_on & ends)

    def __call__(self, *args):
        recorder = _RecordAll(self.gm)
        out = recorder.run(*args)
        sparse = [b for b in self.report.blocks if b.sparse]
        assert len(recorder.blocks) == len(sparse)
        starts = {b.start: rec["start"] for b, rec in zip(sparse, recorder.blocks)}
        dense = _DenseReplay(self.normalised, recorder.values, starts, self.compute)
        dense.run(*args[: self.num_inputs])
        for b, rec in zip(sparse, recorder.blocks):
            x, y, idx = rec["x"], rec["y"], rec["idx"]
            expected, reused = dense.values[b.end], x + rec["cache_before"].to(x.dtype)
            expected = expected if rec["part"] is None else expected[rec["part"]]
            chosen = torch.zeros(x.shape[:2], dtype=torch.bool).scatter_(1, idx.expand(x.shape[0], -1), True)
            torch.testing.assert_close(y[chosen], expected[chosen], atol=self.atol, rtol=self.rtol)
            torch.testing.assert_close(y[~chosen], reused[~chosen], atol=self.atol, rtol=self.rtol)
            self.checked += 1
        for name in sorted(self.handed_on):
            torch.testing.assert_close(recorder.values[name], dense.values[name], atol=self.atol, rtol=self.rtol)
            self.segments += 1
        self.selected.append([rec["idx"] for rec in recorder.blocks])
        return out


def budget_flops(family, x, cond, budget: float):
    """(dense FLOPs, FLOPs of a step at `budget` after a dense one, the backend) of `family`'s
    model on latent `x` and context `cond`; counted on the eager rewrite inside the runner."""
    torch._dynamo.reset()
    be = astraea.backend(schedule=[1.0, budget])
    compiled = torch.compile(family.model, backend=be)
    with torch.no_grad():
        dense, _ = count_flops(family.call, family.model, x, torch.tensor([900.0]), cond)
        family.call(compiled, x, torch.tensor([900.0]), cond)  # step 0: dense, fills the caches
        counted = []
        be.runners[0].graph_fn = counting(be.runners[0].graph_fn, counted)
        family.call(compiled, x, torch.tensor([800.0]), cond)
    return dense, counted[0], be


REGIONS_SCHEDULE = [1.0, 0.5, 0.0, 0.3]  # dense, sparse, a skipped step (its own graph), sparse again


class SameAsWhole:
    """Stands in for a runner's regional graph: runs the whole graph it was cut from on copies
    of each call's inputs first, then the regions, and checks that outputs and the updated
    caches and scores are bit-identical."""

    def __init__(self, regional):
        from astraea.lowering import RegionalGraph

        assert isinstance(regional, RegionalGraph)
        self.regional, self.calls = regional, 0

    def __call__(self, *args):
        copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        expected = self.regional.graph_module(*copies)
        out = self.regional(*args)
        torch.testing.assert_close(out, tuple(expected), rtol=0, atol=0)
        torch.testing.assert_close(list(args), copies, rtol=0, atol=0)  # in-place state updates
        self.calls += 1
        return out


def check_regions(be, family, compiled) -> None:
    """Sample REGIONS_SCHEDULE on a compiled model with every call of its runners (the skipped
    step's graph too) checked against the whole graph; the runners start a new generation."""
    be.update(schedule=REGIONS_SCHEDULE)
    skip_graphs = {}  # runner -> the checker of its skip graph, once a step is skipped

    def lower_checked(runner, lower, forecasts):
        assert not forecasts, "REGIONS_SCHEDULE copies"
        if runner not in skip_graphs:
            skip_graphs[runner] = SameAsWhole(lower(forecasts))
        return skip_graphs[runner]

    for runner in be.runners:
        runner.records.clear()
        runner.graph_fn = SameAsWhole(runner.graph_fn)
        runner.lower_skip = lambda forecasts, runner=runner, lower=runner.lower_skip: lower_checked(runner, lower, forecasts)
    sample(family, compiled, steps=len(REGIONS_SCHEDULE))
    for runner in be.runners:
        skipped = sum(r.tokens == 0 for r in runner.records)
        assert runner.graph_fn.calls == len(runner.records) - skipped > 0
        assert skipped > 0 and skip_graphs[runner].calls == skipped


def check_sparse_model(model, inputs, blocks: int) -> None:
    """`model` (eval) with `blocks` blocks, called as `model(*inputs(step))`: every block sparse, exact at
    budget 1.0, and the per-block contract at budgets 0.5 and 0.25."""
    torch._dynamo.reset()
    report = astraea.explain(model, *inputs(0))
    assert report.num_sparse_blocks == report.num_blocks == blocks, str(report)
    torch._dynamo.reset()
    be = astraea.backend(schedule=[1.0, 0.5, 0.25])
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs(0)), model(*inputs(0)), rtol=1e-5, atol=1e-5)
        runner = be.runners[0]
        runner.reset()
        checker = runner.graph_fn = ContractChecker(runner, atol=1e-4, rtol=1e-4)
        for step in range(3):
            compiled(*inputs(step))
    assert checker.checked == 3 * blocks


def check_generated(k) -> None:
    """`check_sparse_model` on the generated DiT of knobs `k` (tests/generated.py)."""
    from tests.generated import GeneratedDiT, example_inputs

    torch.manual_seed(0)
    check_sparse_model(GeneratedDiT(k).eval(), lambda step: example_inputs(k, step), k.depth)
