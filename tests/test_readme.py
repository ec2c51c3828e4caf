"""README examples that run: each block after a ``<!-- readme-example: NAME ... -->`` marker is
executed exactly as written, so the documentation cannot drift from the code."""

import re
from pathlib import Path

import jax
import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example(name: str) -> str:
    """The fenced ```python block that follows the marker ``<!-- readme-example: NAME``."""
    text = README.read_text()
    marker = f"<!-- readme-example: {name}"
    if text.count(marker) != 1:
        pytest.fail(f"README.md must hold the marker {marker!r} exactly once (found {text.count(marker)})")
    match = re.compile(r"[^\n]*\n```python\n(.*?)\n```\n", re.S).match(text, text.index(marker))
    if match is None:
        pytest.fail(f"README.md: no ```python block right after {marker!r}")
    return match.group(1)


def test_extracts_the_block_after_the_marker():
    code = readme_example("loss-reuse")
    assert code.startswith("import functools") and "jax.grad" in code and "```" not in code


def test_loss_reuse_example_runs_as_written():
    code = readme_example("loss-reuse")
    namespace = {"__name__": "readme_loss_reuse"}
    exec(compile(code, f"{README}:loss-reuse", "exec"), namespace)  # noqa: S102 (our own README)

    loss, metrics, grads, params = (namespace[k] for k in ("loss", "metrics", "grads", "params"))
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert {"mse", "flow_time_mean", "velocity_norm", "padding_fraction"} <= set(metrics)
    # The eager loss and the jitted gradient's metrics come from the same rng: the same loss.
    np.testing.assert_allclose(float(metrics["mse"]), float(loss), rtol=1e-4)
    # Unboxed (plain arrays, no LogicallyPartitioned left), sharded on the mesh, and every module
    # receives gradient.
    assert set(params) == set(grads) == {"backbone", "action_encoder", "velocity_head"}
    leaves = jax.tree.leaves(params)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)
    assert all(x.sharding.mesh.shape == namespace["mesh"].shape for x in leaves)
    assert jax.tree.structure(params) == jax.tree.structure(grads)
    for module in grads:
        norm = sum(float(np.abs(np.asarray(g)).sum()) for g in jax.tree.leaves(grads[module]))
        assert np.isfinite(norm) and norm > 0, module
