"""`astraea.compile_blocks`: each repeated block traced and compiled on its own, its calls
placed by the model's clock. It must compute what the whole-model compile computes, call by
call, with one compiled graph per block class and one runner per block."""

import dataclasses

import pytest
import torch

import astraea
from astraea.blockwise import repeated_blocks
from tests.contract import REGIONS_SCHEDULE
from tests.generated import GeneratedDiT, Knobs
from tests.models import cogvideox, hunyuan, ltx, sample, wan

FAMILIES = {
    "wan": lambda: wan(layers=3),
    "ltx": lambda: ltx(layers=3),
    "cogvideox": cogvideox,
    "hunyuan": lambda: hunyuan(double=2, single=3),
}
STEPS = len(REGIONS_SCHEDULE)


def _whole(make, schedule, **options):
    torch._dynamo.reset()
    family = make()
    be = astraea.backend(schedule=schedule, **options)
    return sample(family, torch.compile(family.model, backend=be), steps=len(schedule)), be.runners[0].records


@pytest.mark.parametrize("name", FAMILIES)
def test_blocks_compute_what_the_whole_model_computes(name):
    """Budget 1.0 equals eager; a schedule with sparse and skipped steps gives the whole-model
    compile's output and records (the same selection from the same caches, block by block)."""
    make = FAMILIES[name]
    family = make()
    eager = sample(family, family.model, steps=STEPS)
    whole, whole_records = _whole(make, REGIONS_SCHEDULE)
    torch._dynamo.reset()
    family = make()
    be = astraea.compile_blocks(family.model, schedule=1.0)
    torch.testing.assert_close(sample(family, family.model, steps=STEPS), eager, rtol=1e-5, atol=1e-5)
    be.update(schedule=REGIONS_SCHEDULE)
    torch.testing.assert_close(sample(family, family.model, steps=STEPS), whole, rtol=0, atol=0)
    video = max(be.runners, key=lambda r: r.report.num_tokens)
    assert video.records[-2 * STEPS:] == whole_records[-2 * STEPS:]
    for fewer in (r for r in be.runners if r.report.num_tokens < video.report.num_tokens):  # HunyuanVideo's text refiner
        assert {record.budget for record in fewer.records} == {1.0}


def test_forecasting_steps_compute_what_the_whole_model_computes():
    """Skipped and partial steps that forecast (the skip graph's forecasting form, the caches
    moved around a partial call) give the whole-model compile's output, block by block."""
    schedule = astraea.Schedule(budgets=(1.0, 1.0, 0.0, 0.5, 0.0), reuse=("copy", "copy", "forecast", "forecast",
                                                                           "forecast"))
    steps = len(schedule.budgets)

    def whole(schedule):
        torch._dynamo.reset()
        family = FAMILIES["wan"]()
        return sample(family, torch.compile(family.model, backend=astraea.backend(schedule=schedule, skip="blocks")),
                      steps=steps)

    forecasting = whole(schedule)
    torch._dynamo.reset()
    family = FAMILIES["wan"]()
    astraea.compile_blocks(family.model, schedule=schedule, skip="blocks")
    torch.testing.assert_close(sample(family, family.model, steps=steps), forecasting, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(whole(dataclasses.replace(schedule, reuse=None)), forecasting, atol=1e-5)  # it forecast


def test_one_graph_serves_every_block_of_a_class():
    """Wan: one compiled graph (one runner) for every block, with one instance per block,
    each with its own caches; deeper models add instances, not graphs."""
    for layers in (2, 5):
        torch._dynamo.reset()
        family = wan(layers=layers)
        be = astraea.compile_blocks(family.model, schedule=REGIONS_SCHEDULE)
        sample(family, family.model, steps=STEPS)
        assert [len(r.instances) for r in be.runners] == [layers]
        caches = {id(ctx.blocks[0].cache) for r in be.runners[0].instances.values() for ctx in r.branches.values()}
        assert len(caches) == 2 * layers  # per block, per guidance branch


@pytest.mark.parametrize("name", ["wan", "hunyuan"])
def test_budgets_change_without_recompiling(name):
    """Budgets change the selection size, so the strides of a block's slices: the outputs a
    block hands the next one keep dense strides, and nothing recompiles."""
    torch._dynamo.reset()
    family = FAMILIES[name]()
    be = astraea.compile_blocks(family.model, schedule=[1.0, 0.5, 0.0])
    sample(family, family.model, steps=3)
    graphs = len(be.reports)
    for schedule in ([0.5, 0.25], [1.0, 0.0], REGIONS_SCHEDULE):
        be.update(schedule=schedule)
        sample(family, family.model, steps=len(schedule))
    assert len(be.reports) == graphs


def test_timestep_read_from_a_positional_argument():
    """Research code called positionally, `model(latent, timestep, context)`: the clock binds
    the call to the forward's signature; steps and branches follow the timesteps."""
    torch.manual_seed(0)
    model = GeneratedDiT(Knobs(depth=3)).eval()
    x, text = torch.randn(1, 24, 4), torch.randn(1, 5, 16)
    be = astraea.compile_blocks(model, schedule=[1.0, 0.5, 0.5])
    with torch.no_grad():
        for t in (900.0, 600.0, 300.0):
            for context in (text, torch.zeros_like(text)):
                model(x, torch.tensor([t]), context)
    assert [(r.step, r.branch, r.tokens) for r in be.runners[0].records] == [
        (0, 0, 24), (0, 1, 24), (1, 0, 12), (1, 1, 12), (2, 0, 12), (2, 1, 12)
    ]


def test_blocks_are_found_by_structure():
    """Lists of modules of one class that hold modules: HunyuanVideo's text refiner (one block),
    its dual- and its single-stream blocks; not lists of leaves, nor the parts of a block."""
    model = hunyuan(double=2, single=3).model
    refiner = model.context_embedder.token_refiner.refiner_blocks
    assert repeated_blocks(model) == [*refiner, *model.transformer_blocks, *model.single_transformer_blocks]
    assert repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))) == []


@pytest.mark.parametrize("name", ["wan", "hunyuan"])
def test_output_reuse_skips_the_whole_call_as_the_whole_model_compile_does(name):
    """skip="output": a skipped call returns the branch's previous output without running a
    block (the model's clock answers it), and the blocks' staleness counts on, so the steps
    after it select what the whole-model compile selects, and return the same outputs."""
    make = FAMILIES[name]
    schedule = [1.0, 0.5, 0.0, 0.0, 0.3]
    whole, whole_records = _whole(make, schedule, skip="output")
    torch._dynamo.reset()
    family = make()
    be = astraea.compile_blocks(family.model, schedule=schedule, skip="output")
    blocks_ran = []
    for block in repeated_blocks(family.model):
        block.register_forward_pre_hook(lambda *_: blocks_ran.append(1))
    torch.testing.assert_close(sample(family, family.model, steps=len(schedule)), whole, rtol=0, atol=0)
    video = max(be.runners, key=lambda r: r.report.num_tokens)
    assert video.records[-2 * len(schedule):] == whole_records[-2 * len(schedule):]
    # two guidance branches, three computed steps: no block ran in the skipped ones
    assert len(blocks_ran) == 2 * 3 * len(repeated_blocks(family.model))


def test_skip_mode_changes_without_recompiling():
    """From block reuse to output reuse and back, on one compilation."""
    torch._dynamo.reset()
    family = wan(layers=2)
    be = astraea.compile_blocks(family.model, schedule=[1.0, 0.0, 0.5, 0.0])
    blocks = sample(family, family.model, steps=4)
    graphs = len(be.reports)
    with torch.compiler.set_stance("fail_on_recompile"):
        be.update(skip="output")
        output = sample(family, family.model, steps=4)
        be.update(skip="blocks")
        torch.testing.assert_close(sample(family, family.model, steps=4), blocks, rtol=0, atol=0)
    assert len(be.reports) == graphs and not torch.equal(output, blocks)


def test_refusals():
    family = wan(layers=2)
    astraea.compile_blocks(family.model)
    with pytest.raises(astraea.ConfigError, match="already applied"):
        astraea.compile_blocks(family.model)
    with pytest.raises(astraea.ConfigError, match="no blocks found"):
        astraea.compile_blocks(torch.nn.Linear(2, 2))

    class NoTime(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(2, 2)) for _ in range(2))

        def forward(self, x):
            return self.blocks[1](self.blocks[0](x))

    model = NoTime()
    with pytest.raises(astraea.ConfigError, match="no timestep argument"):
        astraea.compile_blocks(model)
    assert not model._forward_pre_hooks and all(b._compiled_call_impl is None for b in model.blocks)  # untouched


def test_a_block_called_outside_its_model_is_refused():
    torch._dynamo.reset()
    family = wan(layers=2)
    seen = {}
    hook = family.model.blocks[0].register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k),
                                                            with_kwargs=True)
    sample(family, family.model, steps=1)
    hook.remove()
    astraea.compile_blocks(family.model)
    with pytest.raises(RuntimeError, match="outside its model's call"), torch.no_grad():
        family.model.blocks[0](*seen["args"], **seen["kwargs"])


def test_a_block_run_twice_in_one_call_is_refused():
    """Weights shared by two places in the stack (one block called twice) would share one cache."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GeneratedDiT(Knobs(depth=2)).eval()
    model.blocks[1] = model.blocks[0]
    astraea.compile_blocks(model)
    with pytest.raises(RuntimeError, match="ran twice in one call"), torch.no_grad():
        model(torch.randn(1, 24, 4), torch.tensor([900.0]), torch.randn(1, 5, 16))


def test_a_block_compiled_alone_by_torch_compile_points_to_compile_blocks():
    """What a user of a model that dynamo splits between blocks meets: the warning names the way out."""
    torch._dynamo.reset()
    family = wan(layers=2)
    family.model.blocks[0].compile(backend="astraea")
    with pytest.warns(astraea.AstraeaWarning, match=r"astraea.compile_blocks\(model\)"):
        sample(family, family.model, steps=1)


def test_a_smaller_clip_after_a_larger_one_still_selects():
    """Which blocks hold the video's tokens is decided among calls of the same input shapes: a
    model run on a larger clip, then on a smaller one, still selects in the smaller one."""
    torch._dynamo.reset()
    family = wan(layers=2, size=8)
    be = astraea.compile_blocks(family.model, schedule=[1.0, 0.5, 0.5])
    sample(family, family.model, steps=3)
    small = dataclasses.replace(family, latent_shape=(1, 4, 3, 4, 4))
    sample(small, family.model, steps=3)
    runner = min(be.runners, key=lambda r: r.report.num_tokens)
    assert runner.report.num_tokens == 12 and {r.budget for r in runner.records} == {1.0, 0.5}


def test_the_random_policy_draws_a_stream_per_block():
    """As in the whole-model compile, where one stream serves the blocks in turn, no two blocks
    draw the same random selection."""
    torch._dynamo.reset()
    family = wan(layers=3)
    be = astraea.compile_blocks(family.model, schedule=[1.0, 0.5], policy="random")
    sample(family, family.model, steps=2)
    draws = {tuple(torch.rand(4, generator=r.generator).tolist()) for r in be.runners[0].instances.values()}
    assert len(draws) == 3


def test_mochi_goes_sparse_block_by_block_without_the_dynamo_flag():
    """Mochi gathers each sample's valid text by `nonzero` inside its blocks: under
    `torch.compile(model)` it goes sparse only with `capture_dynamic_output_shape_ops` set by the
    user, while `compile_blocks` sets it for the blocks it compiles. Budget 1.0 equals eager;
    a sparse schedule equals the whole-model compile with the flag."""
    from tests.support_models import CASES

    case = next(c for c in CASES if c.label == "MochiTransformer3DModel (capture_dynamic_output_shape_ops)")
    family = case.build()
    eager = sample(family, family.model, steps=STEPS)
    with case.traced():
        whole, _ = _whole(lambda: case.build(), REGIONS_SCHEDULE)
    torch._dynamo.reset()
    family = case.build()
    be = astraea.compile_blocks(family.model, schedule=1.0)
    torch.testing.assert_close(sample(family, family.model, steps=STEPS), eager, rtol=1e-5, atol=1e-5)
    assert {r.report.num_sparse_blocks for r in be.runners} == {1} and len(be.reports) > 0
    be.update(schedule=REGIONS_SCHEDULE)
    torch.testing.assert_close(sample(family, family.model, steps=STEPS), whole, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
