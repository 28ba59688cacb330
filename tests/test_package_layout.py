"""The package's shape: imports point down its layers only, with no circle; a non-editable install, used from
another directory, finds its shipped files."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, child_env, install_project

PACKAGE = REPO / "moe_models"
# Each subpackage may import from its own layer and the layers below (the root modules are the lowest).
LAYERS = {"": 0, "models": 1, "data": 1, "metrics": 1, "moe": 2, "training": 3, "hf": 4, "payoff": 5}
ENTRY_POINTS = {"moe_models", "moe_models.train", "moe_models.plan", "moe_models.export", "moe_models.report"}  # commands, public API


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The moe_models modules (or packages) that a file imports, absolute or relative."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            found.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moe_models"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("moe_models"))
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else ""


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return [(module, target) for module, targets in graph.items() if module not in ENTRY_POINTS
            for target in targets if target in graph and layer_of(target) != layer_of(module)
            and LAYERS[layer_of(target)] >= LAYERS[layer_of(module)]]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        for target in graph.get(module, ()):
            if target in path:
                found.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    for module in graph:
        visit(module, [module])
    return found


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_imports_point_down_the_layers():
    assert not upward_imports(GRAPH), "imports from a layer to one at its level or above"


def test_no_import_circle():
    assert not circles(GRAPH)


def test_config_imports_nothing_of_the_package():
    assert GRAPH["moe_models.config"] == set()


def test_the_checks_find_a_planted_circle_and_upward_import():
    assert "moe_models.moe.router" in GRAPH["moe_models.moe.layer"]  # the graph holds real edges
    planted = {**GRAPH, "moe_models.moe.router": GRAPH["moe_models.moe.router"] | {"moe_models.moe.layer"},
               "moe_models.metrics.sinks": GRAPH["moe_models.metrics.sinks"] | {"moe_models.moe.layer"}}
    assert ("moe_models.metrics.sinks", "moe_models.moe.layer") in upward_imports(planted)
    assert any({"moe_models.moe.layer", "moe_models.moe.router"} <= set(circle) for circle in circles(planted))


@pytest.mark.slow
def test_a_non_editable_install_finds_the_shipped_deepspeed_configs(tmp_path):
    site = install_project(tmp_path)
    probe = ("import moe_models; from moe_models.training.ds_config import resolve_deepspeed_config_path, "
             "shipped_deepspeed_configs; print(moe_models.__file__); print(shipped_deepspeed_configs()); "
             "print(resolve_deepspeed_config_path('zero2'))")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True,
                            timeout=120, env=child_env(PYTHONPATH=str(site)))
    assert result.returncode == 0, result.stderr
    package_file, configs, zero2 = result.stdout.strip().splitlines()[-3:]
    assert Path(package_file).is_relative_to(site)  # the installed copy, not the source tree
    assert configs == "['zero0', 'zero1', 'zero2', 'zero2_offload']"
    assert Path(zero2).is_relative_to(site) and Path(zero2).is_file()


def test_importable_moe_families_are_the_adapters():
    """The lower layers' list of importable MoE families (models/) is hf/'s adapter table, no more, no less."""
    from moe_models.hf.adapters import ADAPTERS
    from moe_models.models.architectures import IMPORTABLE_MOE_MODEL_TYPES
    assert sorted(IMPORTABLE_MOE_MODEL_TYPES) == sorted(ADAPTERS)
