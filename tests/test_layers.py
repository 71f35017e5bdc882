"""The engine (sand/) stands alone: no module of it imports the Dagster wiring (sand_assets, resources, jobs) or
Dagster, at module level or inside a function, nor runs a wiring module by name."""
import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "sand"
WIRING = {"sand_assets", "jobs", "resources", "dagster"}
# The training child's entry point speaks the Pipes protocol (dagster-pipes: no dependency on Dagster itself).
PIPES = {"dagster_pipes": {"training/pipes_main.py"}}
REPO = ENGINE.parent


def names_a_module(text: str) -> bool:
    """Whether a string is the dotted name of a module of the project (as in `python -m sand_assets.definitions`;
    a bare word such as "resources" is too often something else)."""
    parts = text.split(".")
    if len(parts) < 2 or not all(part.isidentifier() for part in parts):
        return False
    base = REPO.joinpath(*parts)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def wiring_references(path: Path, root: Path = ENGINE) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and names_a_module(node.value):
            names = [node.value]  # e.g. `python -m sand_assets.definitions`
        else:
            continue
        relative = path.relative_to(root).as_posix()
        for name in names:
            top = name.partition(".")[0]
            if top in WIRING or (top in PIPES and relative not in PIPES[top]):
                found.append(f"{relative}:{node.lineno} {name}")
    return found


def test_the_engine_imports_no_wiring_and_no_dagster():
    modules = sorted(ENGINE.rglob("*.py"))
    assert len(modules) > 40
    assert [ref for path in modules for ref in wiring_references(path)] == []


def test_the_check_sees_lazy_imports_and_modules_run_by_name(tmp_path):
    module = tmp_path / "training" / "job.py"
    module.parent.mkdir()
    module.write_text("def run():\n    from sand_assets.definitions import defs\n    import dagster\n"
                      "    return ['-m', 'jobs.cli'], 'resources'\n")
    assert wiring_references(module, tmp_path) == [
        "training/job.py:2 sand_assets.definitions", "training/job.py:3 dagster", "training/job.py:4 jobs.cli"]
