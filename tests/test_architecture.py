"""A newcomer's check of docs/architecture.md: every module is listed with its line, every owner named in the
"Who owns what" table exists where the page says, and the sub-packages import no module that imports them back."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = (REPO / "docs" / "architecture.md").read_text()
PACKAGES = ("blip", "capfilt", "pipelines")
# the jobs a newcomer looks for first; each must have one row naming its single owner
REQUIRED_OWNERS = ("reading samples", "decoding an image", "loading a checkpoint", "settings", "output schema",
                   "generation options")  # fmt: skip


def _modules() -> set[str]:
    found = {"cli.py"}
    for pkg in PACKAGES:
        found |= {str(p.relative_to(REPO)) for p in (REPO / pkg).rglob("*.py") if p.name != "__init__.py"}
    return found


def _listed() -> set[str]:
    """The module list (the page's first code block): package headers (`pipelines/run/`) then one module a line."""
    block = PAGE.split("```")[1]
    listed, package = set(), ""
    for line in block.splitlines():
        first = line.split()[0] if line.strip() else ""
        if not line.startswith(" ") and first.endswith("/"):
            package = first
        elif not line.startswith(" ") and first.endswith(".py"):
            listed.add(first)
        elif line.startswith("  ") and first.endswith(".py") and not line.startswith("   "):
            listed.add(package + first)
    return listed


def _defined(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_every_module_is_listed_once_with_a_line():
    assert _listed() == _modules()


def test_each_owner_exists_at_the_path_given():
    table = PAGE.split("## Who owns what", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows
    for job, owner, _ in rows:
        path, *names = re.findall(r"`([^`]+)`", owner)
        assert (REPO / path).is_file(), f"{job}: {path} does not exist"
        missing = {n for n in names if n not in _defined(REPO / path)}
        assert names and not missing, f"{job}: {path} defines no {sorted(missing)}"
    jobs = " / ".join(job for job, _, _ in rows)
    for need in REQUIRED_OWNERS:
        assert sum(need in job for job, _, _ in rows) == 1, f"no single owner row for {need!r} in: {jobs}"


def test_subpackages_have_no_import_cycle():
    """Module-level and function-level imports between pipelines' modules form no cycle."""
    graph: dict[str, set[str]] = {}
    for rel in _modules():
        if not rel.startswith("pipelines/"):
            continue
        mod = rel[:-3].replace("/", ".")
        deps = set()
        for node in ast.walk(ast.parse((REPO / rel).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipelines."):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("pipelines.")}
        graph[mod] = deps - {mod}

    def visit(mod: str, path: tuple[str, ...]) -> None:
        assert mod not in path, "import cycle: " + " -> ".join((*path, mod))
        for dep in graph.get(mod, ()):
            visit(dep, (*path, mod))

    for mod in graph:
        visit(mod, ())
