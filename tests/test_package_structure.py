"""The package's module graph and sizes, read with `ast`: no import cycle, leaf modules that import nothing
else from the package, and modules and functions short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nreft_engine"
KERNELS = ROOT / "kernels"  # nreft_engine.kernels, through the nreft_engine/kernels link
LEAVES = (
    "nreft_engine.sampling_params", "nreft_engine.sequence", "nreft_engine.outputs", "nreft_engine.chat"
)
EXTENSION = "nreft_engine._C"  # compiled: imports nothing from the package
MAX_FILE_LINES = 300
MAX_FUNCTION_LINES = 60


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for nreft_engine/ and kernels/ (as nreft_engine.kernels)."""
    files = {}
    for base, prefix in ((PACKAGE, "nreft_engine"), (KERNELS, "nreft_engine.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([prefix, *parts])] = path
    return files


def _resolve(module: str, node: ast.ImportFrom | ast.Import, known: set[str], is_package: bool) -> list[str]:
    """The package modules an import statement in `module` loads (`from pkg import name` may name a
    module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - node.level + 1]
        base = ".".join(anchor + ([node.module] if node.module else []))
    targets = []
    for alias in node.names:
        if f"{base}.{alias.name}" in known:
            targets.append(f"{base}.{alias.name}")
        elif base in known:
            targets.append(base)
    return targets


def import_graph(include_type_checking: bool = True) -> dict[str, set[str]]:
    """module -> the package modules it imports (function-level imports included: they run too)."""
    files = module_files()
    known = set(files) | {EXTENSION}
    graph: dict[str, set[str]] = {EXTENSION: set()}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip: set[int] = set()
        if not include_type_checking:
            for node in ast.walk(tree):
                if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
                    skip.update(id(n) for child in node.body for n in ast.walk(child))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
                edges.update(_resolve(module, node, known, path.name == "__init__.py"))
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_sees_the_package():
    graph = import_graph()
    assert "nreft_engine.scheduler" in graph["nreft_engine.session"]
    assert "nreft_engine.kernels.sampler" in graph["nreft_engine.ops"]
    assert "nreft_engine.ops" in graph["nreft_engine.decoder"]  # `from nreft_engine import ops`


def test_no_import_cycle_in_the_package():
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_modules_import_nothing_else_from_the_package_at_run_time(leaf):
    assert import_graph(include_type_checking=False)[leaf] == set()


def test_modules_and_functions_stay_short():
    long_files, long_functions = [], []
    for module, path in module_files().items():
        if not str(path).startswith(str(PACKAGE)):
            continue
        source = path.read_text()
        if source.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{module}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{module}.{node.name}: {length} lines")
    assert not long_files, long_files
    assert not long_functions, long_functions


_ROOT_IMPORTS = """
import importlib.metadata, importlib.util, json, os, sys
import nreft_engine
from transformers import AutoModelForCausalLM
root = os.getcwd()
names = {n.removesuffix(".py") for n in os.listdir(root) if not n.startswith(".")}
owned = {name for name in importlib.metadata.packages_distributions() if name in names}
where = {name: importlib.util.find_spec(name).origin for name in sorted(owned - {"nreft_engine"})}
print(json.dumps({"sys_path_0": sys.path[0], "shared_names": where}))
"""


def test_the_repository_root_shadows_no_dependency():
    """Python started at the repository root (pytest, `python -c`, a REPL) puts the root first on sys.path:
    no name there may hide an installed package of the same import name (transformers needs Hugging Face's
    `kernels`, whose name the top-level kernels/ folder shares), and transformers must import beside us."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _ROOT_IMPORTS], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["sys_path_0"] == ""  # the root is on the path, as for any Python started there
    for name, origin in found["shared_names"].items():
        assert origin is not None, name  # a namespace portion at the root won over the installed package
        assert not Path(origin).is_relative_to(ROOT / name) and Path(origin) != ROOT / f"{name}.py", origin
    assert not (KERNELS / "__init__.py").exists()
