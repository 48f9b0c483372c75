"""Imports run one way: the applications (recipes/, installed as ``hf_kd_recipes``) use the library ``hf_kd``; the
library never imports the applications, scripts or tests, its modules form no import cycle, and inside the library
imports point down the layers (LAYERS: losses -> flow -> data -> teachers -> signals -> tools -> root -> modes).

Every module is parsed with ``ast``, not imported: every ``import`` / ``from ... import`` anywhere in the file
(module level, inside functions and classes, under ``if TYPE_CHECKING``) counts, relative imports resolved, and so do
``importlib.import_module("...")`` / ``__import__("...")`` calls with a literal name. ``from PKG import name`` is an
import of the module ``PKG.name`` when that file exists, else of ``PKG``. Importing ``a.b.c`` also runs the package
``__init__`` of ``a`` and ``a.b``; those implicit edges are left out of the cycle graph (every submodule would
otherwise "cycle" through ``hf_kd/__init__.py``, which imports the trainer).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY, RECIPES = "hf_kd", "hf_kd_recipes"
FOLDERS = {LIBRARY: ROOT / "hf_kd", RECIPES: ROOT / "recipes"}
APPLICATION_FOLDERS = ("recipes", "scripts", "tests")


def _module_files(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package's folder (packages as their __init__)."""
    folder, out = FOLDERS[package], {}
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join([package, *parts])] = path
    return out


MODULES = {**_module_files(LIBRARY), **_module_files(RECIPES)}


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _dynamic_import(node: ast.AST) -> str | None:
    """The literal module name of ``importlib.import_module("x")`` / ``__import__("x")``, else None."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):
        return None
    f = node.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    return node.args[0].value if name in ("import_module", "__import__") else None


def imports_of(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in ``module``'s file."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    package = module if _is_package(module) else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in MODULES:  # `from pkg import submodule`
                    out.append((sub, [], node.lineno))
                else:
                    out.append((source, [alias.name], node.lineno))
        elif (name := _dynamic_import(node)) is not None:
            out.append((name, [], node.lineno))
    return out


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


def _library_modules() -> list[str]:
    return [m for m in MODULES if m.split(".")[0] == LIBRARY]


def test_library_never_imports_the_applications():
    application_modules = {RECIPES, *APPLICATION_FOLDERS}
    for folder in APPLICATION_FOLDERS:  # also a script run with its folder on sys.path: `import seeds`
        application_modules |= {p.stem for p in (ROOT / folder).rglob("*.py") if p.stem != "__init__"}
    bad = [f"{_where(m, line)} imports {target}" for m in _library_modules() for target, _, line in imports_of(m)
           if target.split(".")[0] in application_modules]
    assert not bad, "the library imports application code:\n" + "\n".join(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_no_import_cycle_in_the_library():
    library = set(_library_modules())
    graph, lines = {m: set() for m in library}, {}
    for m in library:
        for target, _, line in imports_of(m):
            if target in library and target != m:
                graph[m].add(target)
                lines.setdefault((m, target), line)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle) + "\n" + "\n".join(
        f"  {a} -> {b} at {_where(a, lines[a, b])}" for a, b in zip(cycle, cycle[1:]))


# The layers of hf_kd, bottom -> top (docs/architecture.md). A module imports only from its own layer or the layers
# below it. ROOT_LAYER is the modules directly in hf_kd/ (config, engine, trainer); hf_kd/__init__.py, the public API
# that also keeps the old import paths (hf_kd.pairs, ...) working, sits above all and no library module imports it.
ROOT_LAYER = "(root: config, engine, trainer)"
LAYERS = ("losses", "flow", "data", "teachers", "signals", "tools", ROOT_LAYER, "modes")


def layer_of(module: str) -> str:
    """The layer of an hf_kd module: its folder under hf_kd/, or ROOT_LAYER for the modules directly in hf_kd/."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and _is_package(module)) else ROOT_LAYER


def test_every_folder_has_a_layer():
    folders = {m.split(".")[1] for m in _library_modules() if m.count(".") == 1 and _is_package(m)}
    assert folders == set(LAYERS) - {ROOT_LAYER}, f"place every folder of hf_kd/ in LAYERS: {sorted(folders)}"


def test_imports_point_down_the_layers():
    """Every import between hf_kd modules stays in its layer or goes down: losses -> flow -> data -> teachers ->
    signals -> tools -> root (config, engine, trainer) -> modes, bottom to top (printed with -s)."""
    print("hf_kd layers, bottom -> top:", " -> ".join(LAYERS), "; hf_kd/__init__.py above all")
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for m in _library_modules():
        if m == LIBRARY:
            continue
        for target, _, line in imports_of(m):
            if target == LIBRARY:
                bad.append(f"{_where(m, line)} imports the package hf_kd (the public API): import the module itself")
            elif target.split(".")[0] == LIBRARY and rank[layer_of(target)] > rank[layer_of(m)]:
                bad.append(f"{_where(m, line)}: {layer_of(m)} imports {target} of the higher layer {layer_of(target)}")
    assert not bad, ("imports must point down " + " -> ".join(LAYERS) + " (move the piece down, never import up):\n"
                     + "\n".join(dict.fromkeys(bad)))


def test_layer_of():
    assert [layer_of(m) for m in ("hf_kd.losses", "hf_kd.losses.logits", "hf_kd.trainer", "hf_kd.modes.chain",
                                  "hf_kd.tools.metric_modules.f1.f1")] == ["losses", "losses", ROOT_LAYER, "modes",
                                                                           "tools"]


def test_losses_import_only_torch_stdlib_and_losses():
    """hf_kd/losses/ is pure tensor maths: torch, the standard library and other hf_kd.losses modules."""
    allowed = set(sys.stdlib_module_names) | {"torch"}
    bad = []
    for m in _library_modules():
        if not m.startswith(f"{LIBRARY}.losses"):
            continue
        for target, _, line in imports_of(m):
            if not (target.split(".")[0] in allowed or target == f"{LIBRARY}.losses"
                    or target.startswith(f"{LIBRARY}.losses.")):
                bad.append(f"{_where(m, line)} imports {target}")
    assert not bad, "hf_kd.losses imports beyond torch and the standard library:\n" + "\n".join(dict.fromkeys(bad))


def _top_level_names(module: str) -> tuple[set[str], list[str] | None]:
    """(names a module defines at top level, not the ones it imports; its __all__ or None)."""
    tree = ast.parse(MODULES[module].read_text())
    defined, exported = set(), None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        defined.add(n.id)
                        if n.id == "__all__":
                            exported = list(ast.literal_eval(node.value))
    return defined, exported


def _public_module(module: str) -> bool:
    return module in MODULES and not any(part.startswith("_") for part in module.split("."))


def _private_use(target: str, names: list[str]) -> str | None:
    """Why importing ``names`` from ``target`` (an hf_kd module) is not public API, or None."""
    if not _public_module(target):
        return f"{target} is not a public module of hf_kd"
    defined, exported = _top_level_names(target)
    for name in names:
        if exported is not None and name not in exported:
            return f"{name} is not in {target}.__all__"
        if exported is None and (name.startswith("_") or name not in defined):
            return f"{name} is not a public name defined in {target}"
    return None


def test_recipes_use_only_the_public_api():
    """The recipes import only hf_kd's public API, in PEP 8's sense:

    - a public module is ``hf_kd`` or a submodule whose dotted path has no part starting with ``_``;
    - a public name of a module is in its ``__all__`` where it has one (``hf_kd/__init__.py`` does: the names it
      re-exports), otherwise one the module itself defines at top level (def, class, assignment) without a leading
      ``_``; names a module merely imports are its implementation details.

    Recipes may import each other (``hf_kd_recipes.*``) and any third-party package.
    """
    bad = []
    for m in (m for m in MODULES if m.split(".")[0] == RECIPES):
        for target, names, line in imports_of(m):
            if target.split(".")[0] == LIBRARY and (why := _private_use(target, names)):
                bad.append(f"{_where(m, line)}: {why}")
    assert not bad, "recipes reach past hf_kd's public API:\n" + "\n".join(bad)


def test_every_package_is_installed():
    """pyproject.toml lists the packages (recipes/ is mapped to hf_kd_recipes): a new subpackage must be added."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {LIBRARY: "hf_kd", RECIPES: "recipes"}
    found, listed = {m for m in MODULES if _is_package(m)}, set(config["packages"])
    assert found == listed, (f"add to [tool.setuptools] packages: {sorted(found - listed)}; "
                             f"listed but not found: {sorted(listed - found)}")
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"] == {
        "hf-kd": f"{RECIPES}.cli:main"}


def _run(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout


def test_command_line_help():
    """`hf-kd --help` lists the commands; the recipe's --help, run as a file and through hf-kd, lists its flags."""
    beside = Path(sys.executable).parent / "hf-kd"  # the interpreter's own console script, else the one on PATH
    hf_kd = str(beside) if beside.exists() else shutil.which("hf-kd")
    listing = _run([hf_kd, "--help"])
    assert all(c in listing for c in ("distill", "distill-mlm", "distill-image", "cache-teacher"))
    for cmd in ([sys.executable, "recipes/distill_clm.py", "--help"], [hf_kd, "distill", "--help"]):
        flags = _run(cmd)
        for flag in ("--student_layers", "--block_size", "--quick", "--dry_run", "--temperature", "--kd_weight"):
            assert flag in flags, (cmd, flag)
    assert "--student_layers" in _run([sys.executable, "-m", RECIPES, "distill", "--help"])
