"""The layout's contracts, read from the code's own imports: layers import one way, only
cluster/ knows Ray, models/ knows no storage or tracking, and no source file outgrows one
sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each layer and the enat layers it may import (itself included).
MAY_IMPORT = {
    "models": {"models"},
    "pipelines": {"models", "pipelines"},
    "trainer": {"models", "pipelines", "trainer"},
    "evaluation": {"models", "pipelines", "evaluation"},
    "cluster": {"models", "pipelines", "trainer", "evaluation", "cluster"},
}
RAY_FREE = ("models", "pipelines", "trainer", "evaluation")
MODELS_NEVER = ("fsspec", "s3fs", "boto3", "mlflow", "webdataset", "ray")


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def sources(layer: str) -> list[Path]:
    return sorted((ROOT / layer).glob("*.py"))


@pytest.mark.parametrize("layer", sorted(MAY_IMPORT))
def test_layers_import_one_way(layer):
    for path in sources(layer):
        for name in imports(path):
            parts = name.split(".")
            if parts[0] in MAY_IMPORT:
                raise AssertionError(f"{path.relative_to(ROOT)} imports '{name}' outside the enat namespace")
            if parts[0] == "enat" and len(parts) > 1:
                assert parts[1] in MAY_IMPORT[layer], f"{path.relative_to(ROOT)} imports {name}"


@pytest.mark.parametrize("layer", RAY_FREE)
def test_only_cluster_knows_ray(layer):
    for path in sources(layer):
        assert not any(name.split(".")[0] == "ray" for name in imports(path)), path.relative_to(ROOT)


def test_models_know_no_storage_or_tracking():
    for path in sources("models"):
        found = {name.split(".")[0] for name in imports(path)} & set(MODELS_NEVER)
        assert not found, f"{path.relative_to(ROOT)} imports {sorted(found)}"


def test_source_files_read_in_one_sitting():
    for layer in MAY_IMPORT:
        for path in sources(layer):
            lines = len(path.read_text().splitlines())
            assert lines <= 400, f"{path.relative_to(ROOT)} has {lines} lines"
