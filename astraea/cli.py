"""`astraea` command line: one sub-command per job, each living in the module that does it.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`; its docstring's
first line is the command's help. Modules are imported only when their command runs, so
`astraea --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": "astraea.reference.demo",
    "explain": "astraea.explain_command",
    "profile": "astraea.search.profile_command",
    "search": "astraea.search.search_command",
    "tune": "astraea.search.tune_command",
}

SUMMARIES = {
    "demo": "generate clips with the shipped model, dense and sparse, and compare them",
    "explain": "show which blocks of a model astraea makes sparse, and why others stay dense",
    "profile": "measure the compiled forward's latency at each budget on this device",
    "search": "search per-step budgets for a model under a latency target",
    "tune": "search a schedule on your own diffusers pipeline, with its own sampler and prompts",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="astraea", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = (argv if argv is not None else sys.argv[1:])[:1]
    for name, summary in SUMMARIES.items():
        command = sub.add_parser(name, help=summary, description=summary)
        if chosen == [name]:
            module = importlib.import_module(COMMANDS[name])
            module.add_arguments(command)
            command.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
