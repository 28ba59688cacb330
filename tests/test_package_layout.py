"""The package's shape: imports point down its layers only, with no circle; the commands at the top, each module's
name once; the run folder's files opened by their owner alone; a non-editable install, used from another directory,
finds its shipped files."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, child_env, install_project

PACKAGE = REPO / "moe_models"
# Each subpackage may import from its own layer and the layers below; the root holds the commands (train, export,
# report, payoff) and the public API, above every layer.
LAYERS = {"run": 0, "models": 1, "data": 1, "metrics": 1, "moe": 2, "hf": 3, "training": 4, "comparison": 5, "": 6}
# The run folder's files (run/folder.py's docstring lists them), by the names code opens them with.
RUN_FOLDER_FILES = ("run_config.json", "metrics.jsonl", "moe_config.json", "complete.json", "plan.json")
RUN_FOLDER_OWNER = {"moe_models.run.folder", "moe_models.run.checkpoint_folder"}


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
    return [(module, target) for module, targets in graph.items()
            for target in targets if target in graph and layer_of(target) != layer_of(module)
            and LAYERS[layer_of(target)] >= LAYERS[layer_of(module)]]


def names_at_two_levels(paths: list[Path]) -> dict[str, list[str]]:
    """Module names (a file's stem, a package's folder) that stand for two modules at different places."""
    places: dict[str, list[str]] = {}
    for path in paths:
        name = path.parent.name if path.name == "__init__.py" else path.stem
        if path.name != "__init__.py" or path.parent != PACKAGE:
            places.setdefault(name, []).append(str(path.relative_to(PACKAGE)))
    return {name: where for name, where in places.items() if len(where) > 1}


def run_folder_files_opened(path: Path) -> list[str]:
    """The run folder's file names that a module's code names as a whole string (a path it would open)."""
    return [node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and node.value in RUN_FOLDER_FILES]


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
    assert GRAPH["moe_models.run.config"] == set()


def test_no_two_modules_share_a_name():
    assert not names_at_two_levels(sorted(PACKAGE.rglob("*.py")))


def test_only_the_run_folder_owner_opens_its_files():
    assert {module: run_folder_files_opened(path) for path in PACKAGE.rglob("*.py")
            if (module := module_name(path)) not in RUN_FOLDER_OWNER and run_folder_files_opened(path)} == {}


def test_the_name_and_file_checks_find_planted_ones(tmp_path):
    planted = tmp_path / "export.py"
    planted.write_text('path = folder / "run_config.json"\ntext = "written to run_config.json at the start"\n')
    assert run_folder_files_opened(planted) == ["run_config.json"]  # a path, not a sentence that names it
    assert "export" in names_at_two_levels([PACKAGE / "export.py", PACKAGE / "hf" / "export.py"])
    assert not names_at_two_levels([PACKAGE / "export.py", PACKAGE / "hf" / "exporter.py"])


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


def test_docs_architecture_lists_every_module():
    """docs/architecture.md's map of the package names every module (the names are unique) and no module that is
    gone."""
    text = (REPO / "docs" / "architecture.md").read_text()
    tree = text[text.index("moe_models/\n") + len("moe_models/\n"):]
    tree = tree[:tree.index("```")]
    listed = {word for line in tree.splitlines() for word in line.split()[:1] if word.endswith((".py", "/"))}
    modules = {p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    folders = {f"{p.name}/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert listed == modules | folders | {"__init__.py"}
