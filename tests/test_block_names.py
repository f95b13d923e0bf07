"""Reports name each block after the layer that holds its ops: one layer of a list, the range of
layers where it spans several (an STDiT pair), each list's layer where it spans several lists
(Latte's spatial and temporal blocks), not counting a few ops of the next layer or the output head."""

import warnings

import pytest
import torch

import astraea
from tests import support_models
from tests.generated import GeneratedDiT, Knobs, example_inputs


def _names(label: str) -> list[str]:
    case = next(c for c in support_models.CASES if c.label == label)
    family = case.build()
    torch._dynamo.reset()
    with warnings.catch_warnings(), case.traced():
        warnings.simplefilter("ignore")
        return [b.module for b in astraea.explain(family.model, **family.example()).blocks]


@pytest.mark.parametrize("label, names", [
    ("LatteTransformer3DModel", ["transformer_blocks.0 + temporal_transformer_blocks.0",
                                 "transformer_blocks.1 + temporal_transformer_blocks.1"]),
    ("HeliosTransformer3DModel", ["blocks.0", "blocks.1"]),  # its last block holds a few ops of blocks.0's and norm_out's
    ("HunyuanVideoTransformer3DModel", ["transformer_blocks.0", "single_transformer_blocks.0"]),
])
def test_blocks_of_diffusers_classes(label, names):
    assert _names(label) == names


def test_a_pair_of_layers_is_named_by_its_range():
    k = Knobs(depth=4, width=8, heads=1, tokens=6, rope=False, factorised=2)
    torch.manual_seed(0)
    torch._dynamo.reset()
    report = astraea.explain(GeneratedDiT(k).eval(), *example_inputs(k))
    assert [b.module for b in report.blocks] == ["blocks.0-1", "blocks.2-3"]
