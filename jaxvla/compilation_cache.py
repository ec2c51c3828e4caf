"""JAX's persistent compilation cache, on by default for every jaxvla entry point.

Compiling a train step takes tens of seconds on a CPU and minutes for a large model; XLA's
executables are cached on disk keyed by the program, the compiler options and the backend, so a
second identical run (a resume, the next seed, the test suite's repeated tiny models) loads them.

The directory is, in order: the ``directory`` argument, ``$JAXVLA_COMPILATION_CACHE``, else
``$XDG_CACHE_HOME/jaxvla/xla`` (``~/.cache/jaxvla/xla``). ``off`` (or ``0``, ``none``, empty)
as the argument or the variable turns the cache off.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("jaxvla")

ENV_VAR = "JAXVLA_COMPILATION_CACHE"
_OFF = ("off", "0", "none", "false", "")


def default_directory() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxvla", "xla")


def resolve_directory(directory: str | None = None) -> str | None:
    """The cache directory to use, or None when the cache is off (see the module docstring)."""
    choice = directory if directory is not None else os.environ.get(ENV_VAR)
    if choice is None:
        return default_directory()
    if choice.strip().lower() in _OFF:
        return None
    return os.path.abspath(os.path.expanduser(choice))


def enable(directory: str | None = None, min_compile_time_s: float = 0.5) -> str | None:
    """Turns the persistent cache on (idempotent); returns its directory, or None when off.

    Programs that compile faster than ``min_compile_time_s`` are not written: loading them would
    cost about as much as compiling. Call before the first compilation.
    """
    path = resolve_directory(directory)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OSError(f"compilation cache directory {path} cannot be created ({e.strerror}); set "
                      f"{ENV_VAR}=<writable dir> or {ENV_VAR}=off") from e
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
