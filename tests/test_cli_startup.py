"""CLI start-up (issue 17): a command imports what it runs and no more — no pydantic (typer's coercion
is replaced for the plain parameter types, nsbuild.cli.params), no build machinery for `--version`,
`--help` or a spec error, no SBOM code for a build that makes no documents — and the replaced
coercion gives the values and the messages typer's own gives. Checked by the modules loaded, not by
timing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.core import write_spec

PYTHON = str(Path(os.path.dirname(sys.executable)) / "python")
NSBUILD = str(Path(os.path.dirname(sys.executable)) / "nsbuild")
# Runs the CLI as `nsbuild ARGS...` would, then writes the names of the modules it loaded to LOG.
RUN = """
import atexit, sys
log, sys.argv = sys.argv[1], ["nsbuild", *sys.argv[2:]]
atexit.register(lambda: open(log, "w").write("\\n".join(sorted(sys.modules))))
from nsbuild.cli.cli import main
main()
"""


def modules_of(tmp_path: Path, *args: str) -> tuple[set[str], subprocess.CompletedProcess]:
    log = tmp_path / "modules.txt"
    proc = subprocess.run([PYTHON, "-c", RUN, str(log), *args], capture_output=True, text=True, cwd=tmp_path)
    return set(log.read_text().split()), proc


@pytest.mark.parametrize(
    "args",
    [["--version"], ["--help"], ["layered", "--help"], ["schema"], ["layered", "bad.json", "-o", "x.tar"]],
)
def test_commands_that_build_nothing_load_no_build_code(tmp_path: Path, args: list[str]) -> None:
    write_spec(tmp_path, {"name": "x", "tagg": "1"}, "bad.json")
    loaded, proc = modules_of(tmp_path, *args)
    assert proc.returncode in (0, 2), proc.stderr
    assert "pydantic" not in loaded
    assert not {m for m in loaded if m.startswith(("nsbuild.build", "nsbuild.sbom.", "nsbuild.sandbox"))}
    if args[-1] == "x.tar":
        assert proc.returncode == 2 and "tagg: unknown attribute" in proc.stderr


def test_a_build_without_documents_loads_no_sbom_code(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/f").write_text("x\n")
    write_spec(tmp_path, {"name": "x", "tag": "1", "contents": ["tree"]})
    args = ["layered", "-q", "spec.json", "-o", "x.tar", "-j", "2", "--label", "a=b", "--cache-dir", "cache"]
    loaded, proc = modules_of(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert "pydantic" not in loaded
    assert {m for m in loaded if m.startswith("nsbuild.sbom.")} <= {"nsbuild.sbom.formats"}
    assert (tmp_path / "x.tar").stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["layered", "s.json", "-j", "x"], "Invalid value for '--jobs' / '-j': Input should be a valid integer"),
        (
            ["layered", "s.json", "-j", "-1"],
            "Invalid value for '--jobs' / '-j': Input should be greater than or equal to 0",
        ),
        (
            ["cache", "prune", "--older-than", "soon"],
            "Invalid value for '--older-than': Input should be a valid number",
        ),
        (["cache", "prune", "--older-than", "-2"], "'--older-than': Input should be greater than or equal to 0"),
    ],
)
def test_bad_values_are_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    proc = subprocess.run([NSBUILD, *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_values_reach_the_command_typed(tmp_path: Path) -> None:
    """Path, int, float, bool and repeated options, through the replaced coercion."""
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/f").write_text("x\n")
    write_spec(tmp_path, {"name": "x", "tag": "1", "contents": ["tree"]})
    cmd = [NSBUILD, "layered", "-q", "--json", "spec.json", "-o", "oci:out:t", "--no-cache", "-j", "1"]
    proc = subprocess.run([*cmd, "--label", "a=1", "--label", "b=2"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert '"format": "oci-dir"' in proc.stdout
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [NSBUILD, "cache", "prune", "--cache-dir", str(cache), "--older-than", "1.5"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and str(cache) in proc.stdout, proc.stderr


SANDBOX_FOR_SWEEPS = {"nsbuild.sandbox", "nsbuild.sandbox.sweep", "nsbuild.sandbox.cleanup"}
SANDBOX_FOR_SWEEPS |= {"nsbuild.sandbox.ids", "nsbuild.sandbox.tree"}


def test_a_build_without_scripts_loads_no_namespace_machinery(tmp_path: Path) -> None:
    """No script, no sandbox: only the sweep of dead builds' temporary trees (and what it removes them
    with) is loaded; the backends, the runner, the scripts' modules and buildImage's pipeline are not."""
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/f").write_text("x\n")
    write_spec(tmp_path, {"name": "x", "tag": "1", "contents": ["tree"]})
    loaded, proc = modules_of(tmp_path, "layered", "-q", "spec.json", "-o", "x.tar", "--cache-dir", "cache")
    assert proc.returncode == 0, proc.stderr
    assert {m for m in loaded if m.startswith("nsbuild.sandbox")} <= SANDBOX_FOR_SWEEPS
    assert not {"nsbuild.build.buildimage", "nsbuild.rootfs.customize"} & loaded


def test_a_build_with_scripts_loads_what_runs_them(tmp_path: Path) -> None:
    """The other side of the test above: the lazily loaded modules are loaded, and run, when needed."""
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/f").write_text("x\n")
    spec = {"name": "x", "tag": "1", "contents": ["tree"], "extraCommands": "echo made > made"}
    spec["fakeRootCommands"] = "test -e made"
    write_spec(tmp_path, spec)
    loaded, proc = modules_of(tmp_path, "layered", "-q", "spec.json", "-o", "x.tar", "--no-cache")
    assert proc.returncode == 0, proc.stderr
    assert {"nsbuild.sandbox.scripts", "nsbuild.rootfs.customize", "nsbuild.sandbox.backends"} <= loaded
