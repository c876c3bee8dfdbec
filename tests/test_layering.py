"""The import graph of the edgeshift package points one way, and has no cycles.

Layers, bottom first: edgeshift.core (imports nothing of ours), device_profiles, runtime (with the device CLI and
the front door), pruner, exporter, then the pipeline and the build commands. A module may import its own layer
and the layers below it, never above. Within the build side's two layers the same holds for their sub-layers
(``SUBLAYERS``: in pruner, the model sources, then the foundations, exact structured pruning, the algorithms and
last the methods; in exporter, ONNX and its measurement, then the portfolio); a new module is placed there
explicitly. Every import counts, also one inside a function or through ``lazy_module("...")``: an import moved
into a function to dodge a cycle is still a dependency. The device side (core, device_profiles, runtime) also never
imports torch or onnx.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# repository folder -> the package it installs as (pyproject's [tool.setuptools.package-dir])
FOLDERS = {
    "edgeshift": "edgeshift",
    "device_profiles": "edgeshift.device_profiles",
    "runtime": "edgeshift.runtime",
    "pruner": "edgeshift.pruner",
    "exporter": "edgeshift.exporter",
}
LAYERS = ["core", "device_profiles", "runtime", "pruner", "exporter", "commands"]
COMMANDS = ("edgeshift.pruner.cli", "edgeshift.exporter.cli", "edgeshift.exporter.pipeline")
DEVICE_SIDE = ("core", "device_profiles", "runtime")
P, E = "edgeshift.pruner.", "edgeshift.exporter."
# bottom first; a module is in the first sub-layer holding its name or a package above it
SUBLAYERS = {
    "pruner": [
        [P + "models"],
        [
            P + m
            for m in (
                "channel_states",
                "metrics",
                "measure",
                "distill",
                "distributed",
                "data",
                "fuse",
                "sparse",
                "train",
                "checkpoint",
                "runner",
            )
        ],
        [P + "structured"],
        [
            P + m
            for m in (
                "layers",
                "nested",
                "learned_masks",
                "gating",
                "routing",
                "exits",
                "slim",
                "pai",
                "imp",
                "prune_cmd",
                "train_checkpoint",
            )
        ],
        [P + "methods"],
    ],
    "exporter": [
        [
            E + m
            for m in ("onnx_export", "nesting", "routing", "cascade", "profile", "quantize", "layer_prices", "report")
        ],
        [E + m for m in ("portfolio", "export_cmd")],
    ],
}
FRONT_DOORS = ("edgeshift.pruner", "edgeshift.exporter")  # lazy front doors: imported by nothing of ours
BUILD_ONLY = ("torch", "onnx", "onnxsim", "torch_pruning", "torchvision", "timm")


def layer(module: str) -> str:
    if module.startswith(COMMANDS):
        return "commands"
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "runtime"  # edgeshift itself, edgeshift.cli, edgeshift.__main__: the device-side front door and CLI


def sublayer(module: str) -> int | None:
    """The module's sub-layer within the build side's layer (None: not in a layer that has them, or a front door);
    -1 for a build-side module placed in none."""
    top = layer(module)
    if top not in SUBLAYERS or module in FRONT_DOORS:
        return None
    for i, names in enumerate(SUBLAYERS[top]):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    return -1


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root / folder).with_suffix("").parts
            name = ".".join([package, *rel])
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in ``path``: ours resolved to module names, others by top name."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", "") == "lazy_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            out.append((str(node.args[0].value), node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub if sub in known else target, node.lineno))
    return out


def violations(root: Path) -> list[str]:
    known = modules(root)
    graph: dict[str, set[str]] = {}
    problems = []
    for name, path in known.items():
        graph[name] = set()
        for target, line in imports(name, path, known):
            where = f"{path.relative_to(root)}:{line}"
            top = target.split(".")[0]
            if layer(name) in DEVICE_SIDE and top in BUILD_ONLY:
                problems.append(f"{where}: {name} ({layer(name)}) imports {target}, which a device does not have")
            if top in FOLDERS and top != "edgeshift":
                problems.append(f"{where}: {name} imports {target!r}: write edgeshift.{target}")
            if not target.startswith("edgeshift"):
                continue
            if target not in known:
                problems.append(f"{where}: {name} imports {target}, which is not a module of ours")
                continue
            if LAYERS.index(layer(target)) > LAYERS.index(layer(name)):
                problems.append(f"{where}: {name} ({layer(name)}) imports {target} ({layer(target)}), a layer above")
            elif (
                layer(target) == layer(name)
                and (below := sublayer(name)) is not None
                and (above := sublayer(target)) is not None
            ):
                if below == -1 or above == -1:
                    unplaced = name if below == -1 else target
                    problems.append(f"{where}: {unplaced} has no place in SUBLAYERS[{layer(name)!r}]; add it")
                elif above > below:
                    problems.append(f"{where}: {name} imports {target}, a sub-layer above it in {layer(name)}")
            elif target in FRONT_DOORS and layer(name) in SUBLAYERS:
                problems.append(f"{where}: {name} imports the front door {target}; import the module defining it")
            if target != name:
                graph[name].add(target)
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_point_down_the_layers_and_never_in_a_circle():
    problems = violations(ROOT)
    assert not problems, "\n".join(problems)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in FOLDERS:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "__init__.py").touch()
    return tmp_path


@pytest.mark.parametrize(
    "files, expected",
    [
        (
            {"runtime/engine.py": "def f():\n    from edgeshift.exporter import profile\n", "exporter/profile.py": ""},
            "edgeshift.runtime.engine (runtime) imports edgeshift.exporter.profile (exporter), a layer above",
        ),
        (
            {
                "edgeshift/core/errors.py": "from edgeshift.device_profiles import registry\n",
                "edgeshift/core/__init__.py": "",
                "device_profiles/registry.py": "",
            },
            "edgeshift.core.errors (core) imports edgeshift.device_profiles.registry (device_profiles), a layer above",
        ),
        (
            {"pruner/a.py": "from . import b\n", "pruner/b.py": "def f():\n    from .a import x\n"},
            "import cycle: edgeshift.pruner.a -> edgeshift.pruner.b -> edgeshift.pruner.a",
        ),
        ({"runtime/session.py": "import torch\n"}, "edgeshift.runtime.session (runtime) imports torch"),
        (
            {
                "pruner/models/__init__.py": "",
                "pruner/models/zoo.py": "from edgeshift.pruner.slim import x\n",
                "pruner/slim.py": "",
            },
            "edgeshift.pruner.models.zoo imports edgeshift.pruner.slim, a sub-layer above it in pruner",
        ),
        (
            {
                "pruner/structured/__init__.py": "",
                "pruner/structured/plan.py": "from ..methods import base\n",
                "pruner/methods/__init__.py": "",
                "pruner/methods/base.py": "",
            },
            "edgeshift.pruner.structured.plan imports edgeshift.pruner.methods.base, a sub-layer above it in pruner",
        ),
        (
            {"pruner/imp.py": "from .newthing import x\n", "pruner/newthing.py": ""},
            "edgeshift.pruner.newthing has no place in SUBLAYERS['pruner']; add it",
        ),
        (
            {
                "edgeshift/core/__init__.py": "",
                "edgeshift/core/x.py": "runtime = lazy_module('edgeshift.runtime.engine')\n",
                "runtime/engine.py": "",
            },
            "edgeshift.core.x (core) imports edgeshift.runtime.engine (runtime), a layer above",
        ),
        (
            {"exporter/x.py": "from runtime.engine import Runtime\n"},
            "imports 'runtime.engine': write edgeshift.runtime",
        ),
    ],
)
def test_the_check_catches_a_planted_back_reference(tmp_path, files, expected):
    problems = violations(_tree(tmp_path, files))
    assert any(expected in p for p in problems), problems


def test_benchmark_scripts_import_only_names_that_exist():
    """No test runs the benchmarks, so a renamed or removed function breaks them silently; this reads their
    imports of edgeshift and checks each module and name exists."""
    import importlib

    missing = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("edgeshift"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name) and f"{node.module}.{alias.name}" not in modules(ROOT):
                        missing.append(f"{path.name}:{node.lineno}: {node.module} has no {alias.name}")
    assert not missing, "\n".join(missing)
