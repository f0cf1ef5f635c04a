"""The code's structure: imports run one way, dvc.yaml's deps match the code, one CLI shell, light commands."""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Layers from low to high: a module imports only its own layer or lower ones (docs/architecture.md).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("pipeline.params", "pipeline.errors", "pipeline.atomic", "pipeline.cli"),
    ("pipeline.data",),
    ("pipeline.engine", "pipeline.pretrain"),
    ("pipeline.features",),
    ("pipeline.tracking",),
    ("pipeline.sweep",),
    ("pipeline.evaluate",),
    ("pipeline.report",),
    ("pipeline.tools",),
    ("stages",),
)
# The commands: what a user or dvc.yaml runs. Importing one must not pull in torch & co. (fast --help).
HEAVY = ("torch", "ray", "mlflow", "open_clip", "sklearn", "matplotlib", "torchvision")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def project_modules() -> dict[str, Path]:
    files = [*(REPO / "pipeline").rglob("*.py"), *(REPO / "stages").glob("*.py")]
    return {module_name(p): p for p in files}


@cache
def imports_of(module: str) -> frozenset[str]:
    """Project modules `module` imports anywhere in its file (lazy imports inside functions included)."""
    modules = project_modules()
    found: set[str] = set()
    for node in ast.walk(ast.parse(modules[module].read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            # `import a.b.c` also runs a and a.b; keep every project module on the way.
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules)
    found.discard(module)
    return frozenset(found)


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(imports_of(current))
    return seen


def layer(module: str) -> int:
    if module in ("pipeline", "stages"):  # the packages' own __init__: docstring only
        return 0
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md")


def test_every_module_has_a_layer_and_imports_only_downwards() -> None:
    upward = []
    for module in project_modules():
        if module.endswith("__main__"):  # `python -m pipeline.sweep` runs the command: an entry point
            continue
        upward += [f"{module} -> {target}" for target in imports_of(module) if layer(target) > layer(module)]
    assert not upward, "imports that run upward:\n" + "\n".join(sorted(upward))


def test_every_module_opens_with_a_one_line_docstring() -> None:
    missing = []
    for module, path in project_modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        if not doc or not doc.splitlines()[0].strip():
            missing.append(module)
    assert not missing, f"modules without a docstring: {missing}"


def _calls(name: str) -> list[str]:
    """Modules (outside pipeline/cli.py) that call something named `name` (e.g. basicConfig)."""
    where = []
    for module, path in project_modules().items():
        if module == "pipeline.cli":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    where.append(module)
    return sorted(set(where))


@pytest.mark.parametrize("name", ["ArgumentParser", "basicConfig", "load_params"])
def test_cli_logging_and_params_loading_live_in_the_one_shell(name: str) -> None:
    assert _calls(name) == []


def commands() -> list[str]:
    stages = sorted(m for m in project_modules() if m.startswith("stages.") and m != "stages")
    tools = sorted(m for m in project_modules() if m.startswith("pipeline.tools.") and "__" not in m)
    return stages + tools


@pytest.mark.parametrize("command", commands())
def test_commands_import_nothing_heavy(command: str) -> None:
    """So `--help` answers at once: the libraries are imported inside the command's run function."""
    code = f"import sys, {command}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    heavy = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert heavy.stdout.strip() == "", f"{command} imports {heavy.stdout.strip()} at module level"


def _package_data() -> list[Path]:
    return [p for p in (REPO / "pipeline").rglob("*.json")]


def _owning_package(path: Path) -> str:
    folder = path.parent
    while not (folder / "__init__.py").is_file():
        folder = folder.parent
    return module_name(folder / "__init__.py")


def stage_commands() -> dict[str, tuple[str, list[str]]]:
    """dvc.yaml stage -> (command module, literal code deps)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        words = body["cmd"].split()
        module = words[words.index("-m") + 1]
        deps = [d for d in body.get("deps", []) if "${" not in d]
        out[name] = (module, deps)
    return out


def _docstring_only(path: Path) -> bool:
    """A package's `__init__.py` that holds nothing but its docstring changes no stage's result."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


@pytest.mark.parametrize("stage", sorted(stage_commands()))
def test_dvc_stage_deps_cover_the_code_it_runs(stage: str) -> None:
    module, deps = stage_commands()[stage]
    assert module.startswith("stages."), f"dvc.yaml stage {stage} must run a stages/ module, runs {module}"
    for dep in deps:
        assert (REPO / dep).exists(), f"dvc.yaml stage {stage} lists {dep}, which does not exist"
    used = closure(module)
    files = {project_modules()[m] for m in used}
    files |= {p for p in _package_data() if _owning_package(p) in used}
    missing = sorted(
        str(f.relative_to(REPO)) for f in files
        if not any(f == REPO / d or (REPO / d) in f.parents for d in deps)
        and not _docstring_only(f)
    )
    assert not missing, f"dvc.yaml stage {stage} runs code it does not list in deps: {missing}"
