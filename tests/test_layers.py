"""Imports go one way, checked from the source (an ast walk, nothing imported).

    foundations <- codec <- layouts <- reader/writer <- API <- manager/distributed <- CLI

A module may import modules of its own layer or of layers below it; no module
imports the package root (``from . import __version__`` and the like), no
import of a safeckpt module hides inside a function, and the module graph has
no cycle. A new module must be given a layer here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "safeckpt"
README = PACKAGE.parent / "README.md"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("version", "errors", "text", "attrs", "limits", "keyhash", "policy", "handler", "tensor_plan", "tensors", "refs", "stream", "detect", "storage")),
    ("codec", ("codec", "container", "header", "legacy")),
    ("layouts", ("multifile", "snapshot")),
    ("reader/writer", ("checkpoint", "reader", "writer")),
    ("API", ("loading", "saving", "conversion", "remote", "signing", "hf")),
    ("manager/distributed", ("manager", "ranking", "steps", "distributed", "integrations")),
    ("CLI", ("cli", "cli_remote", "cli_output", "cli_targets", "cli_commands", "cli_convert", "cli_scan", "cli_integrations", "cli_report", "cli_values", "cli_diff", "__main__")),
]
MAX_LINES = 400  # "about 400": a module over this is split by responsibility


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    if module == "safeckpt":
        return len(LAYERS)  # the package root sits above everything
    top = module.split(".")[1]
    for index, (_, names) in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} has no layer in tests/test_layers.py; give it one")


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported safeckpt module, line, at module level) for every import in ``module``."""
    path, is_package = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` imports are for type checkers only: top level too
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            top_level.update(id(child) for child in node.body)
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "safeckpt"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "safeckpt":
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                targets.append(candidate if candidate in MODULES else target)
        for target in targets:
            found.append((target, node.lineno, id(node) in top_level))
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module: str) -> None:
    mine = _layer(module)
    for target, line, at_top in _imports(module):
        if target == module:
            continue
        assert target != "safeckpt", f"{module}:{line} imports the package root; import the module that defines the name"
        assert at_top, f"{module}:{line} imports {target} inside a function; imports belong at the top"
        theirs = _layer(target)
        assert theirs <= mine, (
            f"{module}:{line} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]}), a layer above it"
        )


def test_the_module_graph_has_no_cycle() -> None:
    graph = {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}
    for module in graph:  # a package imports its submodules; a submodule's import of it is the cycle we forbid
        graph[module] = {t for t in graph[module] if not (t != "safeckpt" and module.startswith(t + "."))}
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = trail[trail.index(target) :] + [target] if target in trail else [module, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module: str) -> None:
    lines = len(MODULES[module][0].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it by responsibility"


def _readme_picture() -> list[tuple[str, set[str]]]:
    """The layers the README's "Layers" picture draws, top first: (layer, module names)."""
    text = README.read_text(encoding="utf-8")
    block = text[text.index("### Layers") :].split("```")[1]
    layers: list[tuple[str, set[str]]] = []
    for line in block.strip("\n").splitlines():
        if not line.startswith(" "):
            name, _, line = line.partition("  ")
            layers.append((name, set()))
        for item in re.sub(r"\([^)]*\)", "", line).split(","):
            if item.strip():
                layers[-1][1].add(item.strip().removesuffix("/*"))
    return layers


def test_the_readme_draws_these_layers() -> None:
    drawn = _readme_picture()
    expected = [(name, set(modules)) for name, modules in reversed(LAYERS)]
    assert drawn == expected, "README.md's layer picture differs from LAYERS in tests/test_layers.py; update it"
