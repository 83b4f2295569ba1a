"""The package's layer contract (its docstring states it): each layer imports only the layers below it, no
module imports itself back through others, the library never imports its tools, and no import hides inside a
function except the lazy optional ones (triton, tensorly, onnx and friends), each commented.

The checker reads the source with ``ast``; its own tests below show that it fails on an upward import, on a
missing layer and on a hidden import, so the contract test cannot pass vacuously.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cpkernels

PACKAGE = Path(cpkernels.__file__).resolve().parent

# Bottom to top, as the package docstring says. A module of layer k may import layers below k and its own layer.
LAYERS = (
    "cpkernels.core",
    "cpkernels.factors",
    "cpkernels.decompositions",
    "cpkernels.kernels",
    "cpkernels.dispatch",
    "cpkernels.ops",
    "cpkernels.modules",
    "cpkernels.compression",
    "cpkernels.export",
    "cpkernels.cli",
)
# Optional or heavy dependencies that the library imports on first use, never at import time (the kernels'
# modules import triton at their top, so importing them is the lazy triton import).
LAZY = ("triton", "tensorly", "onnx", "onnxruntime", "onnxscript", "h5py", "sklearn", "skimage", "matplotlib",
        "cpkernels.kernels")


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _mark_functions(tree: ast.AST) -> ast.AST:
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                node._in_function = True
    return tree


def layer_of(module: str, layers=LAYERS):
    """The index of ``module``'s layer (``len(layers)`` for the top), or None for a module in no layer."""
    found = [i for i, layer in enumerate(layers) if module == layer or module.startswith(layer + ".")]
    if found:
        return found[-1]
    on_top = module in ("cpkernels", "cpkernels.__main__") or module.startswith("cpkernels.tools")
    return len(layers) if on_top else None


def violations(sources: dict[str, tuple[str, bool]], layers=LAYERS) -> list[str]:
    """Every breach of the contract in ``{module name: (source, is_package)}``."""
    out = []
    graph: dict[str, set[str]] = {}
    known = set(sources)
    for name, (source, is_package) in sources.items():
        mine = layer_of(name, layers)
        if mine is None:
            out.append(f"{name}: in no layer of the contract")
            continue
        lines = source.splitlines()
        tree = _mark_functions(ast.parse(source))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            here = name.split(".") if is_package else name.split(".")[:-1]
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = here[: len(here) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            if getattr(node, "_in_function", False):
                lazy = any(targets[0] == m or targets[0].startswith(m + ".") for m in LAZY)
                commented = _commented(lines, node.lineno - 1)
                if not (lazy and commented):
                    out.append(f"{name}:{node.lineno}: import of {targets[0]} inside a function"
                               + (", uncommented" if lazy else " (only the lazy optional ones may be, commented)"))
            for target in targets:
                if target not in known or target == name:
                    continue
                theirs = layer_of(target, layers)
                if theirs is None:
                    continue
                if not sources[target][1]:  # a package's __init__ runs first by Python's rules: no edge of ours
                    graph.setdefault(name, set()).add(target)
                if theirs > mine:
                    out.append(f"{name}:{node.lineno}: imports {target}, a layer above its own")
    out += [f"import circle: {' -> '.join(c)}" for c in _circles(graph)]
    return out


def _commented(lines: list[str], i: int) -> bool:
    """Whether line ``i`` (an import) has a comment, on it or above the run of imports it belongs to."""
    if "#" in lines[i]:
        return True
    for line in reversed(lines[:i]):
        line = line.strip()
        if line.startswith("#"):
            return True
        if not line.startswith(("import ", "from ")):
            return False
    return False


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected part of the import graph (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part) + [sorted(part)[0]])

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def package_sources() -> dict[str, tuple[str, bool]]:
    return {module_name(p, PACKAGE, "cpkernels"): (p.read_text(), p.name == "__init__.py")
            for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_package_keeps_its_layer_contract():
    assert violations(package_sources()) == []


def test_the_package_docstring_states_the_layer_order():
    doc = " ".join(cpkernels.__doc__.split())
    positions = [doc.find(layer) for layer in LAYERS]
    assert -1 not in positions and positions == sorted(positions), positions


# The checker itself, on small made-up packages: a contract test that could not fail would prove nothing.
def _pkg(**modules: str) -> dict[str, tuple[str, bool]]:
    return {name.replace("__", "."): (source, False) for name, source in modules.items()}


def test_the_checker_finds_an_upward_import():
    sources = _pkg(cpkernels__core__a="from cpkernels.ops import b\n", cpkernels__ops__b="x = 1\n")
    assert violations(sources) == ["cpkernels.core.a:1: imports cpkernels.ops.b, a layer above its own"]


def test_the_checker_finds_a_module_of_a_layer_removed_from_the_contract():
    layers = tuple(layer for layer in LAYERS if layer != "cpkernels.dispatch")
    found = violations(package_sources(), layers=layers)
    assert any(v.startswith("cpkernels.dispatch") and "in no layer" in v for v in found), found


def test_the_checker_finds_a_circle_and_a_hidden_import():
    sources = _pkg(cpkernels__ops__a="from cpkernels.ops import b\n",
                   cpkernels__ops__b="def f():\n    from cpkernels.ops import a\n")
    found = violations(sources)
    assert "import circle: cpkernels.ops.a -> cpkernels.ops.b -> cpkernels.ops.a" in found
    assert any("inside a function" in v for v in found), found


def test_the_checker_allows_a_commented_lazy_import():
    sources = _pkg(cpkernels__kernels__a="def f():\n    # triton is optional\n    import triton\n")
    assert violations(sources) == []


def test_the_checker_finds_the_library_importing_a_tool():
    sources = _pkg(cpkernels__compression__a="from cpkernels.tools import b\n", cpkernels__tools__b="x = 1\n")
    assert any("imports cpkernels.tools.b, a layer above" in v for v in violations(sources))


@pytest.mark.parametrize("module", LAYERS)
def test_every_layer_exists(module):
    assert module in package_sources()


def test_importing_the_package_has_no_side_effects():
    """In a fresh interpreter: no optional dependency is imported and no global torch switch moves."""
    import subprocess
    import sys

    probe = (
        "import sys, torch\n"
        "flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,\n"
        "                 torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(),\n"
        "                 torch.get_default_dtype(), torch.is_grad_enabled())\n"
        "before = flags()\n"
        "import cpkernels\n"
        f"print(before == flags(), sorted(m for m in {LAZY[:-1]!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "[]"], out
