"""The lock file and the environment check (scripts/check_env.py, run by make test / make demo)."""

import ast
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
sys.path.insert(0, str(ROOT / "scripts"))
import check_env  # noqa: E402


def _setup_requirements() -> list[str]:
    """install_requires + the dev and sim extras, read from setup.py's source (not executed)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return list(values["CORE"]) + list(values["EXTRAS"]["dev"]) + list(values["EXTRAS"]["sim"])


def test_lock_satisfies_every_setup_requirement():
    locked = check_env.read_lock(str(LOCK))
    requirements = _setup_requirements()
    assert len(requirements) > 20
    for text in requirements:
        requirement = Requirement(text)
        name = check_env.canonical(requirement.name)
        assert name in locked, f"{name} is required by setup.py but missing from the lock: run make lock"
        assert requirement.specifier.contains(Version(locked[name]), prereleases=True), (
            f"the lock's {name}=={locked[name]} does not satisfy setup.py's {text}: run make lock"
        )


def test_lock_pins_every_line_with_hashes():
    lines = LOCK.read_text().splitlines()
    pins = [i for i, line in enumerate(lines) if line and not line[0].isspace() and not line.startswith("#")]
    assert len(pins) == len(check_env.read_lock(str(LOCK))) > 100
    for i in pins:
        assert "==" in lines[i] and lines[i].endswith("\\"), lines[i]
        assert lines[i + 1].strip().startswith("--hash=sha256:"), lines[i]


def test_read_lock_parses_pins_and_names_a_bad_line(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text(
        "# comment\nFoo_Bar.baz==1.2.3 \\\n    --hash=sha256:00\n    # via x\netils[epath]==1.0\ntorch==2.13.0+cpu\n"
    )
    assert check_env.read_lock(str(lock)) == {"foo-bar-baz": "1.2.3", "etils": "1.0", "torch": "2.13.0+cpu"}
    lock.write_text("numpy==2.0\nnumpy>=2\n")
    with pytest.raises(SystemExit, match=r"lock.txt:2: expected 'name==version', found 'numpy>=2'"):
        check_env.read_lock(str(lock))


def test_check_env_fails_loudly_on_a_mismatch(tmp_path):
    numpy_version = metadata.version("numpy")
    lock = tmp_path / "lock.txt"
    lock.write_text(f"numpy=={numpy_version}\nnot-a-package-xyz==1.0\njax==0.0.1\n")
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_env.py"), f"--lock={lock}"], capture_output=True, text=True
    )
    assert run.returncode == 1
    assert f"jax is {metadata.version('jax')}, the lock says 0.0.1" in run.stderr
    assert "not-a-package-xyz==1.0 is locked but not installed" in run.stderr
    assert "numpy" not in run.stderr.split("match")[1]  # the matching package is not reported
    lock.write_text(f"numpy=={numpy_version}\n")
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_env.py"), f"--lock={lock}"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert f"numpy {numpy_version}" in run.stdout
