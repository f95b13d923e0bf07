"""`astraea explain`: print which blocks of a named model astraea makes sparse, and why others stay dense."""

from __future__ import annotations

import argparse

from .explain import explain
from .search import models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    models.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    workload = models.from_arguments(args)
    print(explain(workload.model, **workload.example_inputs()))
    return 0
