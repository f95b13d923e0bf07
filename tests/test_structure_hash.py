"""A model's structure names what decides its computation: schedules and cost tables made for
one model are refused for another, even one whose weights have the same shapes."""

import pytest
import torch

import astraea
from astraea.schedule import Schedule, ScheduleError, same_structure
from tests.generated import GeneratedDiT, Knobs


def _structure(heads: int, tokens: int = 24) -> str:
    """The structure hash of a generated DiT, 32 wide, without RoPE (whose tables would show the
    head dim in the parameter shapes), split into `heads` heads."""
    torch.manual_seed(0)
    model = GeneratedDiT(Knobs(heads=heads, width=32, rope=False, tokens=tokens)).eval()
    torch._dynamo.reset()
    return astraea.explain(model, torch.randn(1, tokens, 4), torch.tensor([500.0]), torch.randn(1, 5, 16)).structure_hash


def test_head_count_changes_the_structure_but_not_the_parameter_shapes():
    a, b = _structure(heads=2), _structure(heads=4)
    assert a != b
    assert a.split("-")[0] == b.split("-")[0]  # the same parameter shapes: only the attention differs
    assert _structure(heads=2, tokens=40) == a  # not the token count
    with pytest.raises(ScheduleError, match="made for model structure"):
        Schedule(budgets=(1.0, 0.5), model=a).check_model(b)
    Schedule(budgets=(1.0, 0.5), model=a).check_model(a)


def test_files_from_before_the_attention_geometry_still_load():
    """A schedule or cost table written with the parameter hash alone serves every model with
    those parameter shapes (it cannot tell more), and no other."""
    current = "918898071322d375-0a1b2c3d"
    assert same_structure("918898071322d375", current)
    assert same_structure(current, current)
    assert not same_structure("0000000000000000", current)
    assert not same_structure("918898071322d375-ffffffff", current)
