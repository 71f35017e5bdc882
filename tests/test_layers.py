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


# The wiring, bottom to top: each module imports only modules of its own layer or of layers below it.
LAYERS = ("sand", "resources", "sand_assets", "jobs", "sand_assets.definitions", "jobs.cli")


def layer(module: str) -> int:
    """The index in LAYERS of a dotted module name (the longest entry that is it or a package above it)."""
    found = [i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + ".")]
    return max(found, key=lambda i: len(LAYERS[i]))


def upward_imports(path: Path, root: Path = REPO) -> list[str]:
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    found = []
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]  # a module or a name
        else:
            continue
        upward = [name for name in names if name.partition(".")[0] in LAYERS and layer(name) > layer(module)]
        found += [f"{module}:{node.lineno} imports {upward[0]}"] if upward else []
    return found


def test_the_wiring_imports_top_down():
    """sand_assets.definitions (the code location) sits above the assets, jobs, sensors and resources it gathers;
    only the `sand` command (jobs.cli) imports it, and nothing imports the command."""
    modules = [p for folder in ("resources", "sand_assets", "jobs") for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(modules) > 10
    assert [ref for path in modules for ref in upward_imports(path)] == []


def test_the_layer_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "sand_assets" / "loop.py"
    module.parent.mkdir()
    module.write_text("from jobs.retraining import new_data_sensor\nfrom sand_assets import definitions\n")
    assert upward_imports(module, tmp_path) == ["sand_assets.loop:1 imports jobs.retraining",
                                                "sand_assets.loop:2 imports sand_assets.definitions"]
