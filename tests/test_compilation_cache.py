"""The persistent compilation cache (jaxvla/compilation_cache.py)."""

import json
import os
import subprocess
import sys

from jaxvla import compilation_cache

# Compiles one program (forced into the cache: min time 0) and reports whether JAX says it came
# from the persistent cache (jax.monitoring's cache-hit event), in a fresh process.
_CHILD = r"""
import json, sys
import jax
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if "cache_hits" in event else None)
from jaxvla import compilation_cache
print(json.dumps({"dir": compilation_cache.enable(min_compile_time_s=0.0)}))
f = jax.jit(lambda x: (jax.numpy.sin(x) @ x.T).sum() * 3.0)
print(json.dumps({"value": float(f(jax.numpy.ones((8, 8)))), "hits": len(hits)}))
"""


def _run(env):
    run = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env={**os.environ, **env})
    assert run.returncode == 0, run.stderr
    first, second = (json.loads(line) for line in run.stdout.strip().splitlines()[-2:])
    return first["dir"], second


def test_directory_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation_cache.resolve_directory() == str(tmp_path / "xdg" / "jaxvla" / "xla")
    monkeypatch.setenv(compilation_cache.ENV_VAR, str(tmp_path / "env"))
    assert compilation_cache.resolve_directory() == str(tmp_path / "env")
    assert compilation_cache.resolve_directory(str(tmp_path / "arg")) == str(tmp_path / "arg")  # argument wins
    for off in ("off", "OFF", "0", "none", ""):
        assert compilation_cache.resolve_directory(off) is None
        monkeypatch.setenv(compilation_cache.ENV_VAR, off)
        assert compilation_cache.resolve_directory() is None


def test_second_process_loads_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    directory, first = _run({compilation_cache.ENV_VAR: str(cache)})
    assert directory == str(cache) and first["hits"] == 0
    assert any(name.endswith("-cache") for name in os.listdir(cache))  # the executable was written
    _, second = _run({compilation_cache.ENV_VAR: str(cache)})
    assert second["hits"] >= 1 and second["value"] == first["value"]
    # Off: nothing is read or written.
    directory, off = _run({compilation_cache.ENV_VAR: "off"})
    assert directory is None and off["hits"] == 0 and off["value"] == first["value"]
