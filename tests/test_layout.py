"""The package's shape: one package per stage, imports running one way, no circle, modules a page or so."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import medsft_lightning

PACKAGE = Path(medsft_lightning.__file__).parent
# Bottom to top: a module may import its own stage and the stages below it, never one above.
STAGES = ["hub", "data", "generation", "training", "tools", "cli"]
MAX_LINES = 300


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def stage(module: str) -> str | None:
    """``medsft_lightning.data.sources`` → ``data``; the root package itself has no stage."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports(module: str) -> set[str]:
    """Every medsft module ``module`` imports, at the top or inside a function (lazy imports count)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` the module mod
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        found |= {n for n in names if n.startswith("medsft_lightning.") and n != module}
    return found


def test_every_module_belongs_to_a_stage_with_a_docstring_saying_what_it_owns():
    stray = sorted(m for m in MODULES if m != "medsft_lightning" and stage(m) not in STAGES)
    assert not stray, f"modules outside the stages {STAGES}: {stray}"
    for name in STAGES[:-1]:
        init = PACKAGE / name / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert "import" in doc and len(doc) > 200, f"{init}: say what the stage owns and what it may import"


def test_imports_run_one_way_bottom_to_top():
    upward = []
    for module in MODULES:
        if stage(module) is None:
            continue
        for target in imports(module):
            if STAGES.index(stage(target)) > STAGES.index(stage(module)):
                upward.append(f"{module} imports {target}")
    assert not upward, "a stage imports one above it:\n  " + "\n  ".join(sorted(upward))


def test_no_import_circle():
    graph = {m: imports(m) & set(MODULES) for m in MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " → ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in MODULES:
        visit(module, [])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_fits_on_a_few_screens(module):
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]}: {lines} lines; split it by job (at most {MAX_LINES})"


def test_the_checker_sees_lazy_and_package_imports():
    """The walk above must see what it is meant to police, or the two tests before it could not fail."""
    assert "medsft_lightning.hub.tiny" in imports("medsft_lightning.hub")  # inside a function
    assert "medsft_lightning.training.optim" in imports("medsft_lightning.training.module")  # from pkg import mod
    assert "medsft_lightning.training.export" in imports("medsft_lightning.cli")  # lazy, in after_fit


def test_public_names_and_old_module_paths_still_import():
    from medsft_lightning.data.datamodule import MedicalDataModule
    from medsft_lightning.training import loggers
    from medsft_lightning.training.module import MedSFTModule

    assert medsft_lightning.MedicalDataModule is MedicalDataModule
    assert medsft_lightning.MedSFTModule is MedSFTModule
    from medsft_lightning.data import MedicalDataModule as old_place

    assert old_place is MedicalDataModule
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import medsft_lightning.loggers as old_loggers
    assert old_loggers is loggers  # the same module, so isinstance checks and class identity hold
    assert loggers.__spec__.name == "medsft_lightning.training.loggers"
    assert any("moved to medsft_lightning.training.loggers" in str(w.message) for w in caught)
    for old in medsft_lightning.MOVED:
        new = f"medsft_lightning.{medsft_lightning.MOVED[old]}"
        assert new in MODULES, f"MOVED names {old} → {new}, which does not exist"


@pytest.mark.e2e  # a console-script subprocess
def test_a_saved_config_with_the_old_logger_class_path_still_runs(tmp_path):
    """Run folders hold config.yaml files from before the stages: ``class_path: medsft_lightning.loggers.…``."""
    repo = PACKAGE.parent
    text = (repo / "configs" / "demo.yaml").read_text(encoding="utf-8")
    assert "medsft_lightning.training.loggers.MedSwanLabLogger" in text
    old = tmp_path / "config.yaml"
    old.write_text(text.replace("medsft_lightning.training.loggers.", "medsft_lightning.loggers."), encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "medsft_lightning.cli", "fit", "--config", str(old), "--print_config"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "class_path: medsft_lightning.loggers.MedSwanLabLogger" in out.stdout
    assert "moved to medsft_lightning.training.loggers" in out.stderr
