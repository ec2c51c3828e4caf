"""NSVQ quantizer: gradients, eval lookup, distance-preserving noise, dead-code replacement."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from jaxvla.models.nsvq import NSVQ, replace_dead_codes, replacement_steps

K, D = 8, 4


def _init(seed=0):
    model = NSVQ(num_codes=K, code_dim=D)
    x = jnp.zeros((2, 3, D))
    variables = model.init(jax.random.PRNGKey(seed), x, train=False)
    return model, meta.unbox(variables)["params"]


def _numpy_nearest(x, cb):
    d = ((x[..., None, :] - cb) ** 2).sum(-1)
    idx = d.argmin(-1)
    return idx, cb[idx]


def test_gradients_reach_input_and_codebook():
    model, params = _init()
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 5, D))
    target = jax.random.normal(jax.random.PRNGKey(2), (4, 5, D))

    def loss(params, x):
        out = model.apply({"params": params}, x, train=True, rng=jax.random.PRNGKey(3))
        return jnp.mean((out["quantized"] - target) ** 2)

    g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, x)
    for g in (g_params["codebook"], g_x):
        assert np.all(np.isfinite(np.asarray(g)))
        assert float(jnp.abs(g).sum()) > 0


def test_eval_returns_nearest_codes():
    model, params = _init()
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (3, 7, D))) * 0.2
    out = model.apply({"params": params}, jnp.asarray(x), train=False)
    idx, codes = _numpy_nearest(x, np.asarray(params["codebook"]))
    assert out["indices"].dtype == jnp.int32 and out["indices"].shape == (3, 7)
    np.testing.assert_array_equal(np.asarray(out["indices"]), idx)
    np.testing.assert_array_equal(np.asarray(out["quantized"]), codes)
    counts = np.bincount(idx.ravel(), minlength=K).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(out["counts"]), counts)
    np.testing.assert_allclose(float(out["used_fraction"]), (counts > 0).mean())
    p = counts[counts > 0] / counts.sum()
    np.testing.assert_allclose(float(out["perplexity"]), np.exp(-(p * np.log(p)).sum()), rtol=1e-5)


def test_noise_substitution_preserves_distance():
    model, params = _init()
    x = jax.random.normal(jax.random.PRNGKey(5), (16, D))
    out = model.apply({"params": params}, x, train=True, rng=jax.random.PRNGKey(6))
    _, codes = _numpy_nearest(np.asarray(x), np.asarray(params["codebook"]))
    q_dist = np.linalg.norm(np.asarray(out["quantized"]) - np.asarray(x), axis=-1)
    c_dist = np.linalg.norm(codes - np.asarray(x), axis=-1)
    np.testing.assert_allclose(q_dist, c_dist, rtol=1e-4, atol=1e-6)
    assert not np.allclose(np.asarray(out["quantized"]), codes)  # noisy, not the hard code


def test_replacement_revives_dead_codes():
    model, _ = _init()
    centers = np.eye(D, dtype=np.float32)
    centers = np.concatenate([centers, -centers])  # 8 well-separated clusters
    rng = np.random.default_rng(0)
    data = (np.repeat(centers, 16, axis=0) + 0.01 * rng.normal(size=(128, D))).astype(np.float32)
    cb = np.full((K, D), 100.0, np.float32)  # 6 codes far from everything
    cb[0], cb[1] = centers[0], centers[5]
    before = model.apply({"params": {"codebook": jnp.asarray(cb)}}, jnp.asarray(data), train=False)
    assert int((np.asarray(before["counts"]) > 0).sum()) == 2

    new_cb, n = jax.jit(replace_dead_codes, static_argnames="threshold")(
        jnp.asarray(cb), before["counts"], jnp.asarray(data), jax.random.PRNGKey(7), threshold=0.1
    )
    new_cb = np.asarray(new_cb)
    assert int(n) == 6
    np.testing.assert_array_equal(new_cb[:2], cb[:2])  # alive codes unchanged
    for k in range(2, K):  # dead codes sit on a candidate, within the noise
        assert np.min(np.linalg.norm(data - new_cb[k], axis=-1)) < 1e-2
    new_params = {"params": {"codebook": jnp.asarray(new_cb)}}
    after = model.apply(new_params, jnp.asarray(data), train=False)
    assert int((np.asarray(after["counts"]) > 0).sum()) > 2


def test_replacement_nothing_dead_when_uniform():
    cb = jnp.arange(K * D, dtype=jnp.float32).reshape(K, D)
    new_cb, n = replace_dead_codes(cb, jnp.ones(K), jnp.zeros((3, D)), jax.random.PRNGKey(0), 0.1)
    assert int(n) == 0
    np.testing.assert_array_equal(np.asarray(new_cb), np.asarray(cb))


def test_replacement_steps_lapa_schedule():
    expected = set(range(10, 101, 10)) | set(range(100, 1001, 100)) | set(range(1000, 5001, 500))
    steps = jnp.arange(0, 7001)
    got = np.asarray(jax.jit(jax.vmap(replacement_steps))(steps))
    np.testing.assert_array_equal(np.flatnonzero(got), sorted(expected))
    stopped = np.asarray(jax.vmap(lambda s: replacement_steps(s, stop_after=300))(steps))
    np.testing.assert_array_equal(np.flatnonzero(stopped), sorted(s for s in expected if s <= 300))
    vipra = replacement_steps(130_000, schedule=((10, 200_000, 10),), stop_after=120_000)
    assert not bool(vipra) and bool(replacement_steps(120_000, ((10, 200_000, 10),), 120_000))


def test_module_under_jit_without_mesh():
    assert jax.device_count() == 8
    model = NSVQ(num_codes=K, code_dim=D)
    x = jax.random.normal(jax.random.PRNGKey(8), (2, 4, D)).astype(jnp.bfloat16)
    variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.PRNGKey(0))
    box = variables["params"]["codebook"]
    assert isinstance(box, nn.LogicallyPartitioned) and box.names == ("codebook", "codebook_dim")
    assert box.value.dtype == jnp.float32

    @jax.jit
    def step(variables, x, key):
        tr = model.apply(variables, x, train=True, rng=key)
        ev = model.apply(variables, x, train=False)
        return tr, ev

    tr, ev = step(variables, x, jax.random.PRNGKey(1))
    for out in (tr, ev):
        assert out["quantized"].shape == x.shape and out["quantized"].dtype == jnp.bfloat16
        assert out["indices"].shape == (2, 4) and out["counts"].shape == (K,)
        assert 1.0 <= float(out["perplexity"]) <= K + 1e-4
    np.testing.assert_array_equal(np.asarray(tr["indices"]), np.asarray(ev["indices"]))
