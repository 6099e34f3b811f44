"""The dependency direction (eval -> baselines -> asynclane), packaging and config/registry sync.

Imports are read from the AST (static imports anywhere in a module, and importlib.import_module
or __import__ with a literal name), so nothing here imports the code under test.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC, CONF = ROOT / "src", ROOT / "conf"

# no upward reference is sanctioned: the harness (eval) imports baselines to fill the registry
ALLOWED: set = set()


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(SRC).parent.parts)
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) == "__import__")):
            out.add(node.args[0].value)
    return out


def files(*parts: str) -> list[Path]:
    return sorted((SRC.joinpath(*parts)).rglob("*.py"))


def offenders(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for p in paths:
        rel = p.relative_to(SRC).as_posix()
        for mod in imported_modules(p):
            for f in forbidden:
                if (mod == f or mod.startswith(f + ".")) and (rel, f) not in ALLOWED:
                    bad.append(f"{rel} imports {mod}")
    return bad


def test_asynclane_never_imports_baselines_or_eval():
    assert files("asynclane")
    assert offenders(files("asynclane"), ("baselines", "eval")) == []


def test_baselines_never_import_eval():
    assert offenders(files("baselines"), ("eval",)) == []


def test_samplers_never_see_tasks():
    samplers = files("baselines") + files("asynclane", "samplers") + [SRC / "asynclane" / "rules.py"]
    assert offenders([p for p in samplers if p.exists()], ("eval", "eval.tasks")) == []


def test_tasks_never_see_samplers():
    assert offenders(files("eval", "tasks"), ("baselines", "asynclane.samplers", "asynclane.sampler")) == []


def test_imports_are_resolved_relative_to_the_package():
    # guard the checker itself: a relative import inside eval/tasks resolves under eval.tasks
    assert "eval.tasks.synthetic" in imported_modules(SRC / "eval" / "tasks" / "__init__.py")


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_is_listed_for_the_wheel():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(SRC).parts) for p in SRC.rglob("__init__.py")}
    found |= {".".join(("eval", "conf", *p.parent.relative_to(CONF).parts)) for p in CONF.rglob("__init__.py")}
    assert found == listed, f"pyproject packages differ from the source tree: {found ^ listed}"
    groups = {p for p in CONF.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    assert all((g / "__init__.py").exists() for g in groups), "each config group needs an __init__.py"


def test_every_config_folder_ships_its_yaml():
    data = _pyproject()["tool"]["setuptools"]["package-data"]
    for folder in {p.parent for p in CONF.rglob("*.yaml")}:
        package = ".".join(("eval", "conf", *folder.relative_to(CONF).parts))
        assert "*.yaml" in data.get(package, []), f"{package}: its YAML files are not package data (pyproject.toml)"


def _yaml_names(group: str) -> dict[str, str]:
    from omegaconf import OmegaConf

    return {p.stem: OmegaConf.load(p).get("name") for p in sorted((CONF / group).glob("*.yaml"))}


def test_task_registry_matches_configs():
    from omegaconf import OmegaConf

    from eval.tasks import TASKS

    names = _yaml_names("task")
    assert names == {k: k for k in TASKS}, "conf/task/<key>.yaml must exist for each task, with name: <key>"
    for key, cls in TASKS.items():
        assert OmegaConf.load(CONF / "task" / f"{key}.yaml").version == cls.version
