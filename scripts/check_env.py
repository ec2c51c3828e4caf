"""Checks that the installed packages are exactly the locked ones (make test / make demo run it).

    python scripts/check_env.py [--lock=requirements/lock.txt]

Prints the versions of the packages whose APIs jaxvla depends on most, then compares every
``name==version`` line of the lock with what this interpreter has installed; exits 1 naming each
missing or different package (and how to fix it). Standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata

KEY_PACKAGES = (
    "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tensorflow-cpu",
    "tensorflow-datasets", "transformers", "torch",
)
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)")


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str) -> dict[str, str]:
    """{canonical name: version} of every pinned line of the lock file."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError as e:
        raise SystemExit(f"check_env: cannot read the lock file {path}: {e.strerror}")
    pins = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith(("#", "--")):
            continue
        match = _PIN.match(line)
        if match:
            pins[canonical(match.group(1))] = match.group(3)
        elif not line[0].isspace():
            raise SystemExit(f"check_env: {path}:{number}: expected 'name==version', found {line.strip()!r}")
    if not pins:
        raise SystemExit(f"check_env: {path} pins no package")
    return pins


def installed_versions() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def compare(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    """One line per locked package that is missing or at another version."""
    problems = []
    for name, version in sorted(locked.items()):
        have = installed.get(name)
        if have is None:
            problems.append(f"{name}=={version} is locked but not installed")
        elif have != version:
            problems.append(f"{name} is {have}, the lock says {version}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lock", default="requirements/lock.txt")
    args = parser.parse_args(argv)
    locked, installed = read_lock(args.lock), installed_versions()
    print("environment: " + ", ".join(f"{n} {installed.get(n, 'missing')}" for n in KEY_PACKAGES))
    problems = compare(locked, installed)
    if problems:
        print(f"check_env: this environment ({sys.prefix}) does not match {args.lock}:", file=sys.stderr)
        for line in problems:
            print("  " + line, file=sys.stderr)
        print("Reinstall from the lock: rm -rf .venv && make test (or make demo).", file=sys.stderr)
        return 1
    print(f"check_env: all {len(locked)} locked packages installed at their locked versions ({args.lock})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
