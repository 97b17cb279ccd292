"""The layers of the code point one way: the foundation (``bridge/*.py``) imports nothing above
it, the parts (ingress, relay, consumers) and the tools (ops, devtools) know nothing of one
another, and only the CLI wires them together (docs/design.md, "Layers")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "bridge", "consumers")
# Higher numbers sit above lower ones; a module may import its own unit and lower layers.
LEVELS = {
    "schemas": 0,
    "foundation": 1,
    "bridge.ingress": 2,
    "bridge.relay": 2,
    "consumers": 2,
    "bridge.ops": 2,
    "bridge.devtools": 2,
    "bridge.cli": 3,
}
# The product's modules stay small enough to read in one sitting.
MAX_LINES = 400


def unit_of(module: str) -> str:
    """The layer unit a module belongs to: a top-level package, a subpackage of ``bridge``,
    or ``foundation`` for the modules directly in ``bridge/``."""
    parts = module.split(".")
    if parts[0] != "bridge":
        return parts[0]
    if module in ("bridge", "bridge.__main__"):
        return "foundation" if module == "bridge" else "bridge.cli"
    candidate = ".".join(parts[:2])
    if (REPO / "bridge" / parts[1]).is_dir():
        return candidate
    return "foundation"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, source: str) -> set[str]:
    """Every module of the project that ``source`` (the text of ``path``) imports, wherever
    the import statement is."""
    module = module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.add(target)
            # `from bridge import signing` imports the module bridge.signing.
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES and _exists(name)}


def _exists(module: str) -> bool:
    path = REPO.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def violations(sources: dict[Path, str]) -> list[str]:
    wrong = []
    for path, text in sources.items():
        source = unit_of(module_name(path))
        for target in sorted(imports_of(path, text)):
            unit = unit_of(target)
            if unit != source and LEVELS[unit] >= LEVELS[source]:
                wrong.append(f"{module_name(path)} ({source}) imports {target} ({unit})")
    return wrong


def product_files() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (REPO / package).rglob("*.py"))


def test_every_unit_has_a_layer():
    """A new subpackage of bridge/ must be placed in a layer before it is used."""
    units = {unit_of(module_name(path)) for path in product_files()}
    assert units <= set(LEVELS), f"no layer for {sorted(units - set(LEVELS))}"


def test_imports_point_down_only():
    assert violations({path: path.read_text() for path in product_files()}) == []


def test_no_module_is_over_the_size_limit():
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in product_files()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


@pytest.mark.parametrize(
    ("where", "source", "expected"),
    [
        ("bridge/amqp_probe.py", "from consumers.runtime import Consumer\n", "foundation"),
        ("bridge/ingress/probe.py", "from consumers import runtime\n", "bridge.ingress"),
        ("consumers/probe.py", "from bridge.cli.main import main\n", "consumers"),
        ("bridge/ops/probe.py", "from bridge.devtools import simulate\n", "bridge.ops"),
    ],
)
def test_the_check_catches_an_import_that_runs_up(where, source, expected):
    """The check itself: an upward or sideways import, planted in a module, is reported."""
    assert not (REPO / where).exists()
    found = violations({REPO / where: source})
    assert [v for v in found if f"({expected}) imports" in v] != []
