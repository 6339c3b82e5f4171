"""No module of the package imports itself back, directly or through others.

Every import counts (module level and inside functions: a lazy import only hides a cycle). ``import a.b.c``
and ``from a.b import c`` (``c`` a module) depend on ``a.b.c``; ``from a.b import name`` depends on ``a.b``'s
``__init__``; importing ``a.b.c`` also runs the ``__init__`` of the subpackage ``a.b`` first, so that is a
dependency too, for a module outside that subpackage (inside it, the ``__init__`` is already running), the
root package ``ditq_compiler`` aside: its ``__init__`` is the public facade, run before any submodule. Imports
under ``if TYPE_CHECKING:`` never run and do not count.
"""

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).parents[1]
PACKAGES = {"ditq_compiler": ROOT / "ditq_compiler", "ditq_compiler.passes": ROOT / "passes",
            "ditq_compiler.backends": ROOT / "backends"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for file in folder.rglob("*.py"):
            parts = list(file.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = file
    return found


def _imports(tree: ast.AST) -> list[ast.stmt]:
    """Every import statement, those under ``if TYPE_CHECKING:`` left out."""
    if isinstance(tree, (ast.Import, ast.ImportFrom)):
        return [tree]
    if isinstance(tree, ast.If) and getattr(tree.test, "id", getattr(tree.test, "attr", "")) == "TYPE_CHECKING":
        return [node for child in tree.orelse for node in _imports(child)]
    return [node for child in ast.iter_child_nodes(tree) for node in _imports(child)]


def import_graph() -> nx.DiGraph:
    known = modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    for name, file in known.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(file.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base]) if base else ".".join(anchor)
                for alias in node.names:
                    targets.append(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if not target or target == name:
                    continue
                graph.add_edge(name, target)
                parent = target.rpartition(".")[0]
                while parent and parent != "ditq_compiler":   # subpackage __init__s run first
                    if parent in known and parent != name and not name.startswith(parent + "."):
                        graph.add_edge(name, parent)
                    parent = parent.rpartition(".")[0]
    return graph


def test_the_package_has_no_import_cycle():
    cycles = sorted(nx.simple_cycles(import_graph()), key=len)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join([*c, c[0]]) for c in cycles[:20])


def test_the_checker_sees_a_cycle(tmp_path):
    """The graph it checks is the real one: the compiler depends on the stages, which depend on the passes."""
    graph = import_graph()
    assert nx.has_path(graph, "ditq_compiler.compiler", "ditq_compiler.passes.quantize_linears")
    graph.add_edge("ditq_compiler.passes.quantize_linears", "ditq_compiler.compiler")
    assert list(nx.simple_cycles(graph))
