"""The package layout reads as the data flow: checks that keep it that way.

Arrows only point down the flow (model -> measure -> decide -> rewrite -> report -> commands), a
command never imports another command, no module imports one of ours inside a function (that is how
cycles hide), no import cycle, and every package folder is installed by pyproject.toml.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "onnx_linf"
#: Stage folders in data-flow order; a module may import its own stage or an earlier one.
FLOW = ("errors", "model", "measure", "decide", "rewrite", "report", "commands")
COMMANDS = ("scan", "prune", "clamp", "sweep", "evaluate", "synthesize", "scan_many")
#: scan_many is the single-model scan in a loop over model files (never a second pipeline): it alone calls scan.
COMMAND_CALLS = {("onnx_linf.commands.scan_many", "onnx_linf.commands.scan")}
#: Optional heavy dependencies that may be imported where they are used (install extras).
LAZY_OK = ("matplotlib", "ray")
MAX_LINES = 520


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported onnx_linf module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    out = []
    mods = modules()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = resolve(name, path.name == "__init__.py", node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in mods else base)
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for t in targets:
            if t.startswith("onnx_linf"):
                out.append((t, id(node) in top))
            elif id(node) not in top and not t.startswith(LAZY_OK) and isinstance(node, ast.Import | ast.ImportFrom):
                out.append((t, False))
    return out


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FLOW else None


def test_no_import_cycles():
    mods = modules()
    graph = {m: {t for t, _ in imports_of(m, p) if t in mods and t != m} for m, p in mods.items()}
    # A package's __init__ re-exporting its modules is not a cycle of the modules themselves.
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    seen, stack, cycles = set(), [], []

    def visit(m: str) -> None:
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for t in sorted(graph[m]):
            visit(t)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_imports_only_point_down_the_data_flow():
    bad = []
    for m, p in modules().items():
        s = stage(m)
        if s is None:
            continue
        for t, _ in imports_of(m, p):
            ts = stage(t)
            if ts is not None and FLOW.index(ts) > FLOW.index(s):
                bad.append(f"{m} -> {t}")
    assert not bad, bad


def test_commands_never_import_each_other():
    bad = []
    for name in COMMANDS:
        m = f"onnx_linf.commands.{name}"
        for t, _ in imports_of(m, modules()[m]):
            if (t.startswith("onnx_linf.commands.") and t.rsplit(".", 1)[1] in COMMANDS and t != m
                    and (m, t) not in COMMAND_CALLS):
                bad.append(f"{m} -> {t}")
    assert not bad, bad


def test_no_function_local_imports():
    bad = [f"{m}: {t}" for m, p in modules().items() for t, top in imports_of(m, p) if not top]
    assert not bad, bad


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_pyproject_installs_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    folders = {module_name(p.parent / "__init__.py") for p in PKG.rglob("__init__.py")}
    assert folders | {"onnx_linf.cli"} == declared
    assert config["package-dir"]["onnx_linf.cli"] == "cli"


def test_public_api_names_resolve():
    import onnx_linf

    for name in onnx_linf.__all__:
        assert getattr(onnx_linf, name) is not None
