"""The modules of astraea import one another one way only: no import cycles, counting
imports inside functions too (a lazy import that breaks a cycle at run time still ties the two
layers together)."""

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("astraea",)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> nx.DiGraph:
    """module -> each module of ours it imports (a `from package import name` counts the
    submodule `package.name` where there is one, else the package)."""
    modules, graph = _modules(), nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph.add_edges_from((name, t) for t in targets if t in modules and t != name)
    return graph


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, f"import cycles: {cycles}"


def test_the_graph_sees_lazy_imports():
    """The check can fail: the runtime's lazy import of the attention kernel is an edge."""
    assert import_graph().has_edge("astraea.ops.sparse", "astraea.kernels.gathered_attention")


def test_layers_point_down():
    """The kernels sit below the ops that launch them; the ops a rewritten graph calls sit below
    both the passes and the runtime; the passes never import the runtime (the runtime reads the
    passes' report)."""
    graph = import_graph()
    layer = {"kernels": 0, "ops": 1, "passes": 2, "runtime": 3}
    for a, b in graph.edges:
        la, lb = (layer.get(m.split(".")[1]) if m.startswith("astraea.") and m.count(".") else None for m in (a, b))
        if la is not None and lb is not None:
            assert lb <= la, f"{a} imports {b}, a layer above it"
