"""Check the sparse-block contract on a live runner, one call at a time.

For a call of the rewritten graph, record every block's input x, output y, selected indices
and cache before the call; then run the dense graph with each block's input replaced by the
recorded x, and compare: selected rows must equal the dense block's output for that input,
the others must be x plus the cached contribution.
"""

from __future__ import annotations

import torch
import torch.fx as fx


class _RecordMerges(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.blocks = []

    def call_function(self, target, args, kwargs):
        if target is torch.ops.astraea.merge_rows:
            x, rows, idx, cache = args[:4]
            before = cache.clone()
            y = super().call_function(target, args, kwargs)
            self.blocks.append({"x": x, "y": y, "idx": idx, "cache_before": before})
            return y
        return super().call_function(target, args, kwargs)


class _DenseBlocks(fx.Interpreter):
    def __init__(self, gm, starts: dict, ends: set):
        super().__init__(gm)
        self.starts, self.ends, self.outputs = starts, ends, {}

    def run_node(self, n):
        value = super().run_node(n)
        if n.name in self.ends:
            self.outputs[n.name] = value
        return self.starts.get(n.name, value)


class ContractChecker:
    """Stands in for a runner's graph and checks the contract on every call it runs.

    Install with `runner.graph_fn = ContractChecker(runner)`; `checked` counts the blocks
    checked and `selected` records the indices of each call.
    """

    def __init__(self, runner, atol=1e-5, rtol=1e-5):
        self.gm, self.dense_gm, self.report = runner.graph_fn, runner.dense_gm, runner.report
        self.num_inputs = sum(n.op == "placeholder" for n in self.dense_gm.graph.nodes)
        self.atol, self.rtol = atol, rtol
        self.checked, self.selected = 0, []

    def __call__(self, *args):
        recorder = _RecordMerges(self.gm)
        out = recorder.run(*args)
        sparse = [b for b in self.report.blocks if b.sparse]
        assert len(recorder.blocks) == len(sparse)
        starts = {b.start: rec["x"] for b, rec in zip(sparse, recorder.blocks)}
        dense = _DenseBlocks(self.dense_gm, starts, {b.end for b in sparse})
        dense.run(*args[: self.num_inputs])
        for b, rec in zip(sparse, recorder.blocks):
            x, y, idx = rec["x"], rec["y"], rec["idx"]
            expected, reused = dense.outputs[b.end], x + rec["cache_before"].to(x.dtype)
            chosen = torch.zeros(x.shape[:2], dtype=torch.bool).scatter_(1, idx.expand(x.shape[0], -1), True)
            torch.testing.assert_close(y[chosen], expected[chosen], atol=self.atol, rtol=self.rtol)
            torch.testing.assert_close(y[~chosen], reused[~chosen], atol=self.atol, rtol=self.rtol)
            self.checked += 1
        self.selected.append([rec["idx"] for rec in recorder.blocks])
        return out
