"""The package's import graph: imports only go down the layers, no cycles (between modules or between packages),
no file over 600 lines.

Layers (docs/DEVELOPING.md), lowest first:
    0 base      ops (kernels and their references), the small shared utilities (devices, seeding, media, testing)
    1 models    the J-DiT, the ST-VAE, their file I/O (models/checkpoints.py) and latent encoding
    1 perf      the static sm_90 report: compiles the ops' kernels ahead of time (imports ops only)
    2 parallel  process groups, devices per rank, FSDP/DDP wrapping, context parallelism
    3 data, flow, eval: independent of each other (a peer never imports a peer)
    4 train
    5 cli       the entry package: one module per subcommand (the demo job included)

Every import statement counts, function-local ones included (ast.walk sees them all). No file is exempt by name.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lavin_fast"

# Longest matching dotted prefix decides; (layer, group). Imports inside one group are free (cycles aside);
# across groups they must go to a strictly lower layer.
LAYERS: dict[str, tuple[int, str]] = {
    "lavin_fast": (0, "base"),
    "lavin_fast.ops": (0, "base"),
    "lavin_fast.models": (1, "models"),
    "lavin_fast.checkpoint": (1, "models"),  # backwards-compatible re-export of models.checkpoints for users
    "lavin_fast.perf": (1, "perf"),
    "lavin_fast.parallel": (2, "parallel"),
    "lavin_fast.data": (3, "data"),
    "lavin_fast.flow": (3, "flow"),
    "lavin_fast.eval": (3, "eval"),
    "lavin_fast.train": (4, "train"),
    "lavin_fast.cli": (5, "entry"),
    "lavin_fast.__main__": (5, "entry"),  # `python -m lavin_fast`: the command line, counted with the cli package
}

MAX_LINES = 600


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, pathlib.Path()).name == "__init__.py"


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """Every lavin_fast module `name` imports (top-level and function-local)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return {m for m in found if m == "lavin_fast" or m.startswith("lavin_fast.")}


def _resolve(module: str) -> str:
    """The known module an import names (an attribute path falls back to its module)."""
    while module not in MODULES and "." in module:
        module = module.rpartition(".")[0]
    return module


GRAPH = {name: {_resolve(m) for m in _imports(name, path)} - {name} for name, path in MODULES.items()}


def layer_of(module: str) -> tuple[int, str]:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise KeyError(module)


def test_every_module_has_a_layer():
    assert all(layer_of(m) for m in MODULES)
    assert "lavin_fast.models.checkpoints" in MODULES and "lavin_fast.ops.dispatch" in MODULES  # the walk finds files


def test_imports_only_go_down():
    bad = []
    for src, targets in GRAPH.items():
        (ls, gs) = layer_of(src)
        for dst in targets:
            if dst == "lavin_fast" and src != dst:
                continue  # the package's __init__ (the version) is importable from anywhere
            ld, gd = layer_of(dst)
            if gs != gd and not ld < ls:
                bad.append(f"{src} (layer {ls} {gs}) imports {dst} (layer {ld} {gd})")
    assert not bad, "imports that do not go down a layer:\n" + "\n".join(sorted(bad))


def test_nothing_inside_imports_the_compat_module():
    users = sorted(src for src, targets in GRAPH.items() if "lavin_fast.checkpoint" in targets)
    assert not users, f"lavin_fast.checkpoint is for user code only; import lavin_fast.models.checkpoints: {users}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def package_of(module: str) -> str:
    """lavin_fast.X for a module inside package X; a top-level module (media, testing, ...) is a unit of its own."""
    if module == "lavin_fast.__main__":
        return "lavin_fast.cli"
    parts = module.split(".")
    if len(parts) >= 2 and _is_package(".".join(parts[:2])):
        return ".".join(parts[:2])
    return module


PACKAGE_GRAPH: dict[str, set[str]] = {}
for _src, _dsts in GRAPH.items():
    PACKAGE_GRAPH.setdefault(package_of(_src), set()).update(package_of(d) for d in _dsts)
for _pkg in PACKAGE_GRAPH:
    PACKAGE_GRAPH[_pkg].discard(_pkg)


def test_no_package_level_cycles():
    assert _cycles(PACKAGE_GRAPH) == [], "packages that import each other (directly or around a loop)"


def test_packages_import_only_lower_packages():
    bad = [f"{src} imports {dst}" for src, dsts in PACKAGE_GRAPH.items() for dst in dsts
           if dst != "lavin_fast" and layer_of(dst)[1] != layer_of(src)[1] and layer_of(dst)[0] >= layer_of(src)[0]]  # fmt: skip
    assert not bad, "package-level imports that do not go down: " + "; ".join(sorted(bad))


def test_the_checks_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("lavin_fast.flow.pipeline") == (3, "flow") and layer_of("lavin_fast.cli.sample") == (5, "entry")
    assert layer_of("lavin_fast.cli.kernels")[0] > layer_of("lavin_fast.train.trainer")[0]
    assert (
        package_of("lavin_fast.parallel.distributed") == "lavin_fast.parallel"
        and package_of("lavin_fast.media") == "lavin_fast.media"
    )
    assert layer_of("lavin_fast.parallel.distributed")[0] < layer_of("lavin_fast.data.pipelines")[0]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_files_stay_short(name):
    path = MODULES[name]
    rel = path.relative_to(PACKAGE).as_posix()
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{rel} has {lines} lines (> {MAX_LINES}): split it into files with one job each"


# print() outside the entry layer, each with its reason; everything else logs (logging.getLogger(__name__)).
PRINT_EXEMPT = {
    "lavin_fast.perf.aot": "the progress lines of `lavin-fast kernels --report` (command output, written to stderr)",
    "lavin_fast.perf.kernel_report": "the same report's progress lines (stderr)",
}


def test_library_code_logs_instead_of_printing():
    printing = []
    for name, path in MODULES.items():
        if layer_of(name)[1] == "entry" or name in PRINT_EXEMPT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                printing.append(f"{name}:{node.lineno}")
    assert not printing, f"library code prints (use logging.getLogger(__name__)): {printing}"
