"""How long astraea's analysis of a whole model's graph takes on this machine: part of every
start of `torch.compile(model, backend="astraea")`, warm or cold, since no torch cache keeps it.

    python benchmarks/analysis_time.py --preset wan2.1-1.3b --repeats 5

Dynamo traces the model once, into a backend that only keeps the graph; the analysis
(`astraea.passes.AnalyseTokens`, what `compile_graph` logs as "N of M blocks sparse ... (x s)")
then runs on a fresh copy of that graph each repeat, and the median is printed. The latent is
one frame of 16 x 16 (64 tokens): the analysis reads shapes, not values, so its work is per
node of the graph, which the token count does not change. Random weights, CPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from diffusers import WanTransformer3DModel

from astraea.passes import AnalyseTokens
from astraea.search.models import WAN_PRESETS, WAN_TEXT_TOKENS


def traced_graph(preset: str) -> torch.fx.GraphModule:
    """The dynamo graph of a Wan-shaped transformer of `preset` (random weights)."""
    config = WAN_PRESETS[preset]
    model = WanTransformer3DModel(patch_size=(1, 2, 2), cross_attn_norm=True, **config).eval()
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    latent = torch.randn(1, config["in_channels"], 1, 16, 16)
    text = torch.randn(1, WAN_TEXT_TOKENS[preset], config["text_dim"])
    with torch.no_grad():
        torch.compile(model, backend=keep)(latent, torch.tensor([500.0]), text, return_dict=False)
    (graph,) = graphs
    return graph


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="wan2.1-1.3b", choices=sorted(WAN_PRESETS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    graph = traced_graph(args.preset)
    times, report = [], None
    for _ in range(args.repeats):
        gm = copy.deepcopy(graph)
        started = time.perf_counter()
        analysis = AnalyseTokens()
        analysis(gm)
        times.append(time.perf_counter() - started)
        report = analysis.report
    print(f"{args.preset}: a graph of {len(graph.graph.nodes)} nodes, {report.num_sparse_blocks} of "
          f"{report.num_blocks} blocks sparse; analysis median {statistics.median(times):.3f} s "
          f"({', '.join(f'{t:.3f}' for t in times)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
