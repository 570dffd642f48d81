"""The shape of the code (ARCHITECTURE.md): one package per pipeline stage, imports strictly downward,
no import cycles, and imports inside functions only where listed below (the habit of
go-containerregistry's depcheck). The checker reads the source with `ast`, so an import inside a
function counts as much as one at the top of a module.

The rank table: errors → core → tar/spec → plan/layer → image → registry → sandbox →
rootfs/cache/sources/sinks → build → cli. A package may import from its own package and from lower
ranks; never from a higher rank, never from a peer on its own rank. sandbox sits one rank below
rootfs/cache/sources/sinks (not beside them, as ARCHITECTURE.md sketches it) because the
customisation layer (rootfs.customize) runs its scripts in the sandbox and the sinks sweep their
temporary files with the sandbox's sweeper, while the sandbox itself needs nothing above tar.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "nsbuild"

RANKS: dict[str, int] = {
    "errors": 0,
    "core": 1,
    "tar": 2,
    "spec": 2,
    "plan": 3,
    "layer": 3,
    "image": 4,
    "registry": 5,
    "sandbox": 6,
    "sbom": 6,  # SBOM/provenance documents and their attachment: reads layers, talks to registries via registry/
    "rootfs": 7,
    "cache": 7,
    "sources": 7,
    "sinks": 7,
    "build": 8,
    "cli": 9,
    "__main__": 10,  # `python -m nsbuild`: the console entry point, above everything
    "__init__": 0,  # the top-level package marker, importing nothing
}

# Imports inside functions, each with why it is not at the top of its module: (importer, imported).
# Anything not listed here must be a module-level import. The only reason accepted so far: nsbuild.registry
# imports requests (urllib3, idna, charset detection...), and so does every module importing it
# (registry.usage, sources.pull, sinks.push, cache.shared, build.remote); a build that touches no
# registry, `nsbuild schema` or `nsbuild cache` should not pay for it.
_REQUESTS = "keeps requests (nsbuild.registry) out of commands and builds that need no registry"
_START = "start-up: only the command that runs imports its stages"
ALLOWED_LOCAL: dict[tuple[str, str], str] = {
    ("nsbuild.build.build", "nsbuild.build.buildimage"): "buildImage's pipeline only for a buildImage spec",
    ("nsbuild.build.build", "nsbuild.rootfs.customize"): "the sandbox only for a build with fakeRootCommands",
    ("nsbuild.build.steps", "nsbuild.sandbox.scripts"): "the scripts' modules only for a build with scripts",
    ("nsbuild.sandbox.cleanup", "nsbuild.sandbox.runner"): "a tree left with subordinate ids only"
    " (a build without scripts starts without the namespace machinery)",
    ("nsbuild.build.build", "nsbuild.sinks.push"): _REQUESTS + " (preflight of --cache-to)",
    ("nsbuild.build.build", "nsbuild.cache.shared"): _REQUESTS + " (--cache-from/--cache-to)",
    ("nsbuild.build.steps", "nsbuild.sinks.push"): _REQUESTS + " (preflight of and push to a docker:// output)",
    ("nsbuild.build.steps", "nsbuild.registry.usage"): _REQUESTS + " (docker:// output)",
    ("nsbuild.build.steps", "nsbuild.sources.pull"): _REQUESTS + " (docker:// fromImage)",
    ("nsbuild.build.steps", "nsbuild.cache.shared"): _REQUESTS + " (the blob record of a docker:// output)",
    ("nsbuild.sources.inspect", "nsbuild.sources.pull"): _REQUESTS + " (nsbuild inspect docker://)",
    ("nsbuild.cli.cli", "nsbuild.build.remote"): _REQUESTS + " (nsbuild push)",
    ("nsbuild.cli.cli", "nsbuild.sinks.push"): _REQUESTS + " (--json of a push)",
    ("nsbuild.cli.cli", "nsbuild.registry.usage"): _REQUESTS + " (docker:// references in options)",
    ("nsbuild.cli.cli", "nsbuild.registry"): _REQUESTS + " (registry flags)",
    ("nsbuild.sbom.publish", "nsbuild.sbom.referrers"): _REQUESTS + " (SBOMs attached in a registry)",
    ("nsbuild.build.multi", "nsbuild.registry.usage"): _REQUESTS + " (nsbuild index -o docker://)",
    ("nsbuild.build.multi", "nsbuild.sinks.push"): _REQUESTS + " (preflight of nsbuild index -o docker://)",
    ("nsbuild.build.multi", "nsbuild.sinks.indexpush"): _REQUESTS + " (nsbuild index -o docker://)",
    ("nsbuild.build.multi", "nsbuild.cache.shared"): _REQUESTS + " (the blob record of nsbuild index -o docker://)",
    # Start-up (issue 17): a command imports the stages it runs when it runs, so that `--version`,
    # `--help`, a spec error or `nsbuild schema` load none of the build machinery.
    **{
        ("nsbuild.cli.cli", module): _START + f" ({why})"
        for module, why in (
            ("nsbuild.build.build", "builds"),
            ("nsbuild.build.context", "builds"),
            ("nsbuild.build.depfile", "--depfile"),
            ("nsbuild.build.multi", "nsbuild index"),
            ("nsbuild.cache.cache", "builds, push and the cache commands"),
            ("nsbuild.cli.doctor", "nsbuild doctor"),
            ("nsbuild.sources.inspect", "nsbuild inspect"),
            ("nsbuild.spec.overrides", "builds"),
            ("nsbuild.spec.spec", "builds and nsbuild schema"),
        )
    },
}


@dataclass(frozen=True)
class Import:
    source: str  # dotted module name of the importer
    target: str  # dotted module name imported
    local: bool  # inside a function
    line: int


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(module: str) -> str:
    """`nsbuild.plan.store` → plan; `nsbuild.errors` → errors; `nsbuild` → __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _resolve(node: ast.ImportFrom, source: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".") if is_package else source.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(node: ast.AST, source: str, is_package: bool, modules: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    base = _resolve(node, source, is_package)
    # `from nsbuild.build import remote` imports the module nsbuild.build.remote
    found = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
    rest = [a for a in node.names if f"{base}.{a.name}" not in modules]
    return found + ([base] if rest else [])


def _walk(node: ast.AST, local: bool):
    for child in ast.iter_child_nodes(node):
        inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, inner
        yield from _walk(child, inner)


def collect(root: Path) -> list[Import]:
    """Every import of an nsbuild module by an nsbuild module under `root` (the package folder)."""
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(root, p) for p in paths}
    found: list[Import] = []
    for path in paths:
        source = module_name(root, path)
        tree = ast.parse(path.read_text(), str(path))
        for node, local in _walk(tree, False):
            for target in _targets(node, source, path.name == "__init__.py", modules):
                if target == root.name or target.startswith(root.name + "."):
                    found.append(Import(source, target, local, node.lineno))
    return found


def rank_violations(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        src, dst = package_of(imp.source), package_of(imp.target)
        if src == dst:
            continue
        if src not in RANKS or dst not in RANKS:
            bad.append(f"{imp.source}:{imp.line}: package {src if src not in RANKS else dst} is not in RANKS")
        elif RANKS[dst] >= RANKS[src]:
            how = "a peer" if RANKS[dst] == RANKS[src] else "upward"
            bad.append(f"{imp.source}:{imp.line} imports {imp.target} ({how}: {src} → {dst})")
    return bad


def local_violations(imports: list[Import], allowed: dict[tuple[str, str], str]) -> list[str]:
    return [
        f"{i.source}:{i.line} imports {i.target} inside a function (not in ALLOWED_LOCAL)"
        for i in imports
        if i.local and (i.source, i.target) not in allowed
    ]


def cycles(imports: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), plus self-imports."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        graph.setdefault(i.source, set()).add(i.target)
        graph.setdefault(i.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_go_strictly_downward() -> None:
    assert rank_violations(collect(ROOT)) == []


def test_no_import_cycles() -> None:
    assert cycles(collect(ROOT)) == []


def test_imports_inside_functions_are_the_listed_ones() -> None:
    imports = collect(ROOT)
    assert local_violations(imports, ALLOWED_LOCAL) == []
    # a stale entry would let a later, unreasoned import of the same pair in silently
    used = {(i.source, i.target) for i in imports if i.local}
    assert sorted(set(ALLOWED_LOCAL) - used) == []


def test_every_package_has_a_rank() -> None:
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    packages |= {p.stem for p in ROOT.glob("*.py")}
    assert sorted(packages - set(RANKS)) == []


# The checker itself, on a small fake tree: each rule must catch what it is there to catch.


def _fake_tree(tmp: Path, files: dict[str, str]) -> Path:
    root = tmp / "nsbuild"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(root).parents:
            (root / parent / "__init__.py").touch()
        path.write_text(text)
    return root


def test_checker_catches_an_upward_import(tmp_path: Path) -> None:
    root = _fake_tree(
        tmp_path,
        {
            "core/refs.py": "from nsbuild.build.build import run\n",
            "build/build.py": "from nsbuild.core import refs\n",
        },
    )
    assert rank_violations(collect(root)) == ["nsbuild.core.refs:1 imports nsbuild.build.build (upward: core → build)"]


def test_checker_catches_a_peer_import(tmp_path: Path) -> None:
    root = _fake_tree(tmp_path, {"cache/cache.py": "from nsbuild.sinks import archive\n", "sinks/archive.py": ""})
    assert rank_violations(collect(root)) == [
        "nsbuild.cache.cache:1 imports nsbuild.sinks.archive (a peer: cache → sinks)"
    ]


def test_checker_catches_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    root = _fake_tree(
        tmp_path,
        {
            "build/build.py": "from nsbuild.build.remote import push\n",
            "build/remote.py": "def push():\n    from nsbuild.build import build\n",
        },
    )
    imports = collect(root)
    assert rank_violations(imports) == []  # same package: the rank table has nothing to say
    assert cycles(imports) == [["nsbuild.build.build", "nsbuild.build.remote"]]
    assert local_violations(imports, {}) == [
        "nsbuild.build.remote:2 imports nsbuild.build.build inside a function (not in ALLOWED_LOCAL)"
    ]
    assert local_violations(imports, {("nsbuild.build.remote", "nsbuild.build.build"): "why"}) == []


def test_checker_resolves_relative_imports(tmp_path: Path) -> None:
    root = _fake_tree(tmp_path, {"tar/owners.py": "from ..cli import cli\n", "cli/cli.py": ""})
    assert rank_violations(collect(root)) == ["nsbuild.tar.owners:1 imports nsbuild.cli.cli (upward: tar → cli)"]


@pytest.mark.parametrize("statement", ["import nsbuild.cli.cli", "from nsbuild.cli.cli import main"])
def test_checker_sees_both_import_forms(tmp_path: Path, statement: str) -> None:
    root = _fake_tree(tmp_path, {"spec/spec.py": statement + "\n", "cli/cli.py": ""})
    assert len(rank_violations(collect(root))) == 1


def test_the_cli_and_a_local_build_do_not_import_requests() -> None:
    """What ALLOWED_LOCAL pays for: loading the commands and the local build path leaves requests out."""
    import subprocess
    import sys

    code = (
        "import sys, nsbuild.cli.cli, nsbuild.build.build, nsbuild.build.buildimage, nsbuild.build.steps; "
        "print(sorted(m for m in ('requests', 'nsbuild.registry', 'nsbuild.build.remote', 'nsbuild.sources.pull', "
        "'nsbuild.sinks.push', 'nsbuild.cache.shared') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]"
