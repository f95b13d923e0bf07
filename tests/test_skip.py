"""A budget-0 step: skip="blocks" adds every block's cache to the step's own input; skip="output"
returns the previous output. Both run without recompiling and at a small fraction of the FLOPs."""

import warnings

import pytest
import torch
import torch.fx as fx

import astraea
from astraea.config import AstraeaWarning
from astraea.config import ConfigError
from astraea.schedule import Schedule
from astraea.flops import count_flops, counting
from tests.contract import whole_graph
from tests.models import cogvideox, hunyuan, ltx, wan


class _BlocksReused(fx.Interpreter):
    """The dense graph with each sparse block's output replaced by its input plus its cache:
    what a skipped step must compute, built without the rewrite."""

    def __init__(self, gm, caches: dict):
        super().__init__(gm)
        self.caches, self.values = caches, {}  # block end -> (block start, cache); node -> value

    def run_node(self, n):
        value = super().run_node(n)
        if n.name in self.caches:
            start, cache = self.caches[n.name]
            value = self.values[start] + cache.to(value.dtype)
        self.values[n.name] = value  # a block's start may be the previous block's (new) end
        return value


def compiled(family, **options):
    torch._dynamo.reset()
    be = astraea.backend(**options)
    return be, torch.compile(family.model, backend=be)


def two_steps(family, model, t=(900.0, 800.0)):
    """A dense step, then a second on a moved input: (input of step 2, outputs of both)."""
    x0 = torch.randn(family.latent_shape, generator=torch.Generator().manual_seed(1))
    x1 = x0 + 0.1 * torch.randn(family.latent_shape, generator=torch.Generator().manual_seed(2))
    cond = family.conditions[0]
    with torch.no_grad():
        y0 = family.call(model, x0, torch.tensor([t[0]]), cond)
        y1 = family.call(model, x1, torch.tensor([t[1]]), cond)
    return x1, y0, y1


def recording(runner, sink: dict):
    """Wrap the runner's whole-step-skip graph so that each call's inputs and outputs land in `sink`."""
    lower = runner.lower_skip

    def lower_recording(forecasts):
        fn = sink["graph"] = lower(forecasts)

        def run(*args):
            sink["args"] = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            sink["out"] = fn(*args)
            return sink["out"]

        return run

    runner.lower_skip = lower_recording


@pytest.mark.parametrize("make", [wan, ltx, cogvideox, hunyuan], ids=["wan", "ltx", "cogvideox", "hunyuan"])
def test_blocks_skip_adds_each_cache_to_the_fresh_input(make):
    """Also for joint attention: the text stream only feeds the blocks' work, so a skipped step
    computes none of it (no attention at all is left in the skip graph)."""
    family = make()
    be, model = compiled(family, schedule=[1.0, 0.0], skip="blocks")
    with torch.no_grad():
        family.call(model, torch.randn(family.latent_shape), torch.tensor([900.0]), family.conditions[0])  # compiles
    runner, seen = be.runners[0], {}
    runner.reset()
    recording(runner, seen)
    with torch.compiler.set_stance("fail_on_recompile"):
        _, y0, y1 = two_steps(family, model)
    assert [r.tokens for r in runner.records[-2:]] == [runner.num_tokens, 0]
    # The reference: the dense graph on the skipped call's inputs, each block reusing its cache.
    sparse = [b for b in runner.report.blocks if b.sparse]
    n_inputs = sum(n.op == "placeholder" for n in runner.dense_gm.graph.nodes)
    per_block = seen["args"][n_inputs:]
    assert len(sparse) > 0 and len(per_block) == 4 * len(sparse)
    caches = {b.end: (b.start, per_block[4 * i + 1]) for i, b in enumerate(sparse)}
    with torch.no_grad():
        expected = _BlocksReused(runner.dense_gm, caches).run(*seen["args"][:n_inputs])
    torch.testing.assert_close(tuple(seen["out"]), tuple(expected), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y1, y0)  # it follows the new input, unlike output reuse
    attention = [n for n in whole_graph(seen["graph"]).graph.nodes if n.op == "call_function" and "attention" in str(n.target)]
    assert not attention, attention


@pytest.mark.parametrize("make, options", [(wan, {}), (hunyuan, {}), (wan, {"lowering": "inductor"}),
                                           (wan, {"lowering": "inductor", "regional": False})],
                         ids=["wan", "hunyuan", "wan, Inductor by regions", "wan, Inductor whole"])
def test_a_forecasting_skip_adds_each_blocks_forecast_to_the_fresh_input(make, options):
    """The skip graph's forecasting form: each block adds cache + slope * staleness, read in the
    graph (nothing moves the caches around the call), after two dense steps made the slopes."""
    family = make()
    schedule = Schedule(budgets=(1.0, 1.0, 0.0), reuse=("copy", "copy", "forecast"))
    be, model = compiled(family, schedule=schedule, skip="blocks", **options)
    x = [torch.randn(family.latent_shape, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    cond = family.conditions[0]

    def generate():
        with torch.no_grad():
            return [family.call(model, xi, torch.tensor([t]), cond) for xi, t in zip(x, (900.0, 800.0, 700.0))]

    generate()  # compiles
    runner, seen = be.runners[0], {}
    runner.reset()
    recording(runner, seen)
    with torch.compiler.set_stance("fail_on_recompile"):
        generate()
    assert [r.tokens for r in runner.records[-3:]] == [runner.num_tokens, runner.num_tokens, 0]
    sparse = [b for b in runner.report.blocks if b.sparse]
    n_inputs = sum(n.op == "placeholder" for n in runner.dense_gm.graph.nodes)
    per_block, forecasts = seen["args"][n_inputs:n_inputs + 4 * len(sparse)], seen["args"][n_inputs + 4 * len(sparse):]
    assert len(forecasts) == 2 * len(sparse)
    reused = {}
    for name, move in (("copy", 0.0), ("forecast", 1.0)):
        caches = {b.end: (b.start, per_block[4 * i + 1] + move * forecasts[2 * i] * forecasts[2 * i + 1][..., None])
                  for i, b in enumerate(sparse)}
        with torch.no_grad():
            reused[name] = _BlocksReused(runner.dense_gm, caches).run(*seen["args"][:n_inputs])
    torch.testing.assert_close(tuple(seen["out"]), tuple(reused["forecast"]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(reused["forecast"][0], reused["copy"][0], atol=1e-4)  # the slopes moved it
    # The caches themselves are left as the dense steps wrote them.
    torch.testing.assert_close(runner.branches[0].blocks[0].cache, per_block[1], atol=0, rtol=0)


def test_output_skip_returns_the_previous_output():
    family = wan()
    be, model = compiled(family, schedule=[1.0, 0.0], skip="output")
    two_steps(family, model)  # compiles
    with torch.compiler.set_stance("fail_on_recompile"):
        _, y0, y1 = two_steps(family, model)
    torch.testing.assert_close(y1, y0, atol=0, rtol=0)
    assert be.runners[0].records[-1].tokens == 0


def test_skip_mode_changes_without_recompiling_and_costs_little():
    family = wan(frames=4, size=16)
    be, model = compiled(family, schedule=[1.0, 0.0], skip="output")
    two_steps(family, model)  # compiles
    with torch.compiler.set_stance("fail_on_recompile"):
        be.update(skip="blocks")
        runner, counted = be.runners[0], []
        x = torch.randn(family.latent_shape)
        with torch.no_grad():
            dense, _ = count_flops(family.call, family.model, x, torch.tensor([900.0]), family.conditions[0])
            family.call(model, x, torch.tensor([900.0]), family.conditions[0])
            lower = runner.lower_skip
            runner.lower_skip = lambda forecasts: counting(lower(forecasts), counted)
            family.call(model, x, torch.tensor([800.0]), family.conditions[0])
    assert len(counted) == 1 and 0 < counted[0] < 0.2 * dense


def test_unknown_skip_mode_is_refused():
    with pytest.raises(ConfigError, match="option 'skip' must be one of"):
        astraea.backend(skip="whole")


@pytest.mark.parametrize("searched,warns", [({"skip": "output"}, True), ({}, True), ({"skip": "blocks"}, False)])
def test_schedule_searched_with_another_skip_mode_warns(tmp_path, searched, warns):
    """A schedule's fidelity was measured with one skip mode (files older than the option
    were searched with output reuse): running it with another says so."""
    path = tmp_path / "schedule.json"
    Schedule(budgets=(1.0, 0.0), meta={"search": {"options": {"policy": "astraea", **searched}}}).save(path)
    family = wan()
    _, model = compiled(family, schedule=str(path), skip="blocks")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        two_steps(family, model)
    said = [str(w.message) for w in caught if issubclass(w.category, AstraeaWarning)]
    assert any("searched with skip='output'" in m for m in said) == warns
