"""The repository's structure: one-way imports, public names only, lint-clean, self-documented."""

import ast
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "crat_ft"
SOURCES = [*PACKAGE.rglob("*.py"), *(ROOT / "cli").rglob("*.py")]
# The one-way order of the packages, lowest first (docs/architecture.md#module-map): a module imports only
# from its own layer or a lower one. Every module of crat_ft/ and cli/ must fall in one layer.
LAYERS = [
    ("crat_ft",),  # the package itself: its version
    ("crat_ft.common",),  # errors, files, progress, run records, torchrun, the stack, LVIS json
    ("crat_ft.engine",),  # configs, checkpoints, mmengine's Runner
    ("crat_ft.cache",),
    ("crat_ft.detector",),  # the frozen detector, the RoI policy, extraction
    ("crat_ft.evaluation",),
    ("crat_ft.heads",),  # the retrained heads, their losses and samplers, CRAT's maths, export, registration
    ("crat_ft.analysis",),
    ("crat_ft.synthetic",),
    ("crat_ft.pipeline",),  # the commands' library functions
    ("crat_ft.cli",),
    # the old public names for users' configs and code (custom_imports); nothing of crat-ft imports them
    ("crat_ft.plugin", "crat_ft.metric", "crat_ft.losses", "crat_ft.transfusion"),
]


def _module_name(path: Path) -> str:
    if path.is_relative_to(ROOT / "cli"):  # installed as crat_ft.cli
        parts = ("crat_ft", "cli", *path.relative_to(ROOT / "cli").with_suffix("").parts)
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """Every ``import crat_ft...`` / ``from crat_ft... import ...`` in a file, at any depth (functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("crat_ft"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("crat_ft")]
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p) for p in SOURCES}
    graph = {}
    for path in SOURCES:
        me = _module_name(path)
        deps = set()
        for module, names in _imports(path):
            for name in names:  # "from crat_ft.cache import schema" imports a module
                if f"{module}.{name}" in modules:
                    deps.add(f"{module}.{name}")
            if module in modules:
                deps.add(module)
        graph[me] = deps - {me}
    return graph


def test_no_import_cycle_even_through_function_level_imports():
    graph = _graph()
    # a package's __init__ re-exports its submodules: an import of the package depends on them
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d.startswith(m + "."):  # a package importing its own submodules
                continue
            if state.get(d) == "open":
                cycle = stack[stack.index(d) :] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def _layer(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if any(module == p or (p != "crat_ft" and module.startswith(p + ".")) for p in layer):
            return i
    return None


def test_every_module_has_a_layer():
    assert sorted(m for m in _graph() if _layer(m) is None) == []


def test_imports_go_down_the_layers_only_even_inside_functions():
    graph = _graph()
    upward = [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m in sorted(graph)
        for d in sorted(graph[m])
        if _layer(m) is not None and _layer(d) is not None and _layer(d) > _layer(m)
    ]
    assert upward == []


def test_the_layer_check_sees_an_upward_import(tmp_path):
    # the scan the layer test relies on finds an import inside a function
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from crat_ft.pipeline.demo import run_demo\n")
    assert _imports(path) == [("crat_ft.pipeline.demo", ["run_demo"])]
    assert _layer("crat_ft.pipeline.demo") > _layer("crat_ft.common.errors")


def test_every_package_is_installed():
    # pyproject's [tool.setuptools] packages: a package left out is missing from a regular (non-editable) install
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("packages = [", 1)[1].split("]", 1)[0]
    listed = set(re.findall(r'"(crat_ft[\w.]*)"', section))
    packages = {_module_name(p) for p in SOURCES if p.name == "__init__.py"}
    assert packages - listed == set()


def test_no_module_is_longer_than_450_lines():
    # a longer module does more than one job: split it along its seams (docs/architecture.md#module-map)
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in SOURCES}
    assert {path: n for path, n in lengths.items() if n > 450} == {}


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in [*SOURCES, *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        for module, names in _imports(path):
            offenders += [f"{path.relative_to(ROOT)}: from {module} import {n}" for n in names if n.startswith("_")]
    assert offenders == []


MODULES = sorted(_module_name(p) for p in SOURCES)


@pytest.fixture(scope="module")
def fresh_imports(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every module imported alone in an interpreter of its own, two at a time (an import keeps one core busy)."""
    cwd = tmp_path_factory.mktemp("imports")  # outside the checkout: the installed package is imported

    def run(module: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300, cwd=cwd
        )

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(MODULES, pool.map(run, MODULES)))


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports_alone_in_a_fresh_process(module, fresh_imports):
    # cli/ is installed as crat_ft.cli
    r = fresh_imports[module]
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_project_cites_only_its_own_documents():
    places = [
        *SOURCES,
        *(ROOT / "configs").rglob("*.py"),
        ROOT / "pyproject.toml",
        ROOT / "README.md",
        *(ROOT / "benchmarks").glob("*.py"),
        *(ROOT / "scripts").glob("*"),
        *(ROOT / "docs").rglob("*.md"),
    ]
    cited = [str(p.relative_to(ROOT)) for p in places if "DESIGN" in p.read_text() or "../shared" in p.read_text()]
    assert cited == []
    anchors = {
        "pipeline",
        "module-map",
        "crat-as-implemented",
        "rebalanced-classifier",
        "cache-schema",
        "evaluation-protocol",
        "reliability",
        "environment",
        "synthetic-benchmark",
        "performance-targets",
        "supported-detector-parts",
        "end-to-end-plugin",
    }
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    # GitHub's anchors: the heading lower-cased, punctuation but hyphens dropped, spaces as hyphens
    re = __import__("re")
    slugs = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^## (.+)$", architecture, re.M)
    }
    assert anchors <= slugs, anchors - slugs
    for path in places:
        for ref in set(__import__("re").findall(r"docs/architecture\.md#([a-z-]+)", path.read_text())):
            assert ref in anchors, f"{path.relative_to(ROOT)} cites a missing section #{ref}"


def test_ruff_check_passes():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed; run `bash scripts/setup.sh`")
    r = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:]
