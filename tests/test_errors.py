"""Bad input fails early with a message naming the problem; unsupported models run dense."""

import json

import pytest
import torch

import astraea
from astraea import AstraeaWarning, ConfigError, Schedule, ScheduleError
from astraea.backend import INTERNAL_ERROR
from astraea.passes import AnalyseTokens
from astraea.passes.rewrite import _SparseCopy
from tests.models import sample, wan


@pytest.mark.parametrize("budget", [-0.1, 1.5, float("nan"), None, True])
def test_budget_outside_unit_interval(budget):
    with pytest.raises(ConfigError, match="budget"):
        astraea.backend(schedule=budget)
    with pytest.raises(ConfigError, match="step 1"):
        astraea.backend(schedule=[1.0, budget])


def test_unknown_option_and_bad_values():
    with pytest.raises(ConfigError, match="unknown astraea option"):
        astraea.backend(shedule=0.5)
    with pytest.raises(ConfigError, match="policy"):
        astraea.backend(policy="magic")
    with pytest.raises(ConfigError, match="group_size"):
        astraea.backend(group="run", group_size=0)


def test_short_schedule_raises_before_any_wrong_output():
    torch._dynamo.reset()
    family = wan()
    compiled = torch.compile(family.model, backend=astraea.backend(schedule=[1.0, 0.5, 0.5]))
    with pytest.raises(ScheduleError, match="schedule has 3 steps but the run reached step 4"):
        sample(family, compiled, steps=4)


def test_missing_and_corrupt_schedule_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        astraea.backend(schedule=str(tmp_path / "none.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="corrupt"):
        astraea.backend(schedule=str(bad))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ConfigError, match="not an astraea schedule"):
        astraea.backend(schedule=str(other))
    future = tmp_path / "future.json"
    future.write_text(json.dumps({**Schedule(constant=0.5).to_json(), "version": 99}))
    with pytest.raises(ConfigError, match="version 99"):
        astraea.backend(schedule=str(future))


def test_schedule_round_trip_and_other_model_refused(tmp_path):
    path = tmp_path / "s.json"
    Schedule(budgets=(1.0, 0.5, 0.0), model="0123456789abcdef", meta={"target": 2.0}).save(path)
    loaded = Schedule.load(path)
    assert loaded.budgets == (1.0, 0.5, 0.0) and loaded.meta == {"target": 2.0}
    torch._dynamo.reset()
    family = wan()
    compiled = torch.compile(family.model, backend=astraea.backend(schedule=str(path)))
    with pytest.raises(Exception, match="schedule was made for model structure 0123456789abcdef"):
        sample(family, compiled, steps=1)


class NoBlocks(torch.nn.Module):
    """A convolutional denoiser: no attention, so nothing for astraea to make sparse."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(4, 4, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * t


def test_model_without_blocks_runs_dense_with_warning():
    torch._dynamo.reset()
    model = NoBlocks()
    x, t = torch.randn(1, 4, 2, 4, 4), torch.tensor([0.5])
    compiled = torch.compile(model, backend=astraea.backend(schedule=0.5))
    with pytest.warns(AstraeaWarning, match="no self-attention"):
        out = compiled(x, t)
    torch.testing.assert_close(out, model(x, t))
    report = astraea.explain(model, x, t)
    assert report.num_blocks == 0 and "no self-attention" in str(report)


@pytest.mark.parametrize("blocks", [False, True], ids=["torch.compile", "compile_blocks"])
def test_compile_says_what_it_is_doing(blocks):
    """A compile reports its stages on the "astraea" logger (printed to stderr by default); under
    `compile_blocks` from the first call on, before dynamo's trace."""
    import logging

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger("astraea")
    log.addHandler(handler)
    try:
        torch._dynamo.reset()
        family = wan()
        if blocks:
            astraea.compile_blocks(family.model, schedule=0.5)
        sample(family, family.model if blocks else torch.compile(family.model, backend=astraea.backend(schedule=0.5)),
               steps=1)
    finally:
        log.removeHandler(handler)
    analysing = next(i for i, line in enumerate(lines) if line.startswith("analysing a graph of"))
    assert any(" blocks sparse over" in line for line in lines), lines
    assert not blocks or lines[0].startswith("first call: dynamo traces each kind of block") and analysing > 0, lines


@pytest.mark.parametrize("fails, what", [(AnalyseTokens, "analysing"), (_SparseCopy, "rewriting")])
def test_a_pass_that_fails_on_a_graph_leaves_it_dense_with_a_warning(monkeypatch, fails, what):
    """A bug of astraea's on some model's graph (here the analysis, or the rewrite, made to fail on
    every graph) must not stop the user's generation: the graph runs dense, a warning names the error."""
    def failing(self, *args):
        raise RuntimeError("a pass that fails")

    monkeypatch.setattr(fails, "call" if fails is AnalyseTokens else "build", failing)
    torch._dynamo.reset()
    family = wan()
    backend = astraea.backend(schedule=0.5)
    with pytest.warns(AstraeaWarning, match=f"{INTERNAL_ERROR} {what} this graph .*RuntimeError: a pass that fails"):
        out = sample(family, torch.compile(family.model, backend=backend), steps=2)
    torch.testing.assert_close(out, sample(family, family.model, steps=2))
    assert not backend.runners


class KeptTokensAttention(torch.nn.Module):
    """Self-attention over the video tokens a mask keeps, gathered by `nonzero` and added back:
    a token count known only at run time."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out, self.time = torch.nn.Linear(8, 24), torch.nn.Linear(8, 8), torch.nn.Linear(1, 8)

    def forward(self, x, t, mask):
        idx = torch.nonzero(mask).flatten()
        q, k, v = self.qkv(x[:, idx]).unflatten(-1, (3, 2, 4)).transpose(1, 3).unbind(2)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return x.index_add(1, idx, self.out(a)) * self.time(t[:, None])[:, None]


def test_data_dependent_shapes_run_dense_with_a_reason_not_a_crash():
    """Tokens gathered by `torch.nonzero` with dynamo capturing it: sizes known only at run time
    in the graph, outside the pattern the analysis rewrites (Mochi's text)."""
    mask = torch.tensor([True, False, True, True, False, True])
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        report = astraea.explain(KeptTokensAttention(), torch.randn(1, 6, 8), torch.tensor([500.0]), mask)
    torch._dynamo.reset()
    assert report.num_sparse_blocks == 0 and (report.reason or any(b.reason for b in report.blocks))
