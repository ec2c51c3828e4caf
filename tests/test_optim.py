"""jaxvla.optim against closed forms computed here: learning-rate schedules, the weight-decay mask
(kernels decayed; biases, norm scales, embeddings not), global-norm gradient clipping and frozen
parameters. Every expected value is computed in NumPy / math from the formulas, not with optax."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvla.config import base_config
from jaxvla.io.weights import unflatten_dict
from jaxvla.optim import count_frozen, make_optimizer, make_schedule


def optimizer_config(**overrides):
    cfg = base_config().optimizer
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def schedule_values(cfg, num_steps, steps):
    schedule = make_schedule(cfg, num_steps)
    return np.array([float(schedule(jnp.asarray(s))) for s in steps])


# --------------------------------------------------------------------------- schedules


def test_warmup_cosine_schedule_values():
    peak, warmup, total, ratio = 3e-4, 10, 110, 0.1
    end = peak * ratio

    def expected(step):
        if step < warmup:
            return peak * step / warmup  # linear from 0
        progress = min(step - warmup, total - warmup) / (total - warmup)  # cosine over the remaining steps
        return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    steps = [0, 1, 5, 9, 10, 11, 35, 60, 85, 109, 110, 500]
    cfg = optimizer_config(schedule="warmup_cosine", learning_rate=peak, warmup_steps=warmup, decay_steps=total,
                           end_lr_ratio=ratio)
    got = schedule_values(cfg, num_steps=1000, steps=steps)
    np.testing.assert_allclose(got, [expected(s) for s in steps], rtol=1e-5, atol=1e-12)
    # Landmarks, by hand: half of the warm-up, the peak, the cosine's midpoint, the floor.
    np.testing.assert_allclose(got[[2, 4, 7, 10, 11]], [peak / 2, peak, (peak + end) / 2, end, end], rtol=1e-5)

    # decay_steps = 0: the schedule spans num_steps.
    cfg = optimizer_config(schedule="warmup_cosine", learning_rate=peak, warmup_steps=warmup, decay_steps=0,
                           end_lr_ratio=ratio)
    np.testing.assert_allclose(schedule_values(cfg, num_steps=total, steps=steps), [expected(s) for s in steps],
                               rtol=1e-5, atol=1e-12)


def test_rsqrt_schedule_values():
    peak, warmup = 2e-3, 100

    def expected(step):
        s = max(step, 1)  # step 0 counts as step 1 (no division by zero, no zero learning rate)
        return peak * s / warmup if s <= warmup else peak * math.sqrt(warmup / s)

    steps = [0, 1, 25, 50, 99, 100, 101, 400, 2500, 10_000]
    cfg = optimizer_config(schedule="rsqrt", learning_rate=peak, warmup_steps=warmup)
    got = schedule_values(cfg, num_steps=1000, steps=steps)
    np.testing.assert_allclose(got, [expected(s) for s in steps], rtol=1e-5)
    # By hand: 4x the warm-up halves the rate, 100x divides it by ten.
    np.testing.assert_allclose(got[[5, 7, 9]], [peak, peak / 2, peak / 10], rtol=1e-5)


def test_constant_schedule_with_and_without_warmup():
    cfg = optimizer_config(schedule="constant", learning_rate=1e-3, warmup_steps=4)
    np.testing.assert_allclose(schedule_values(cfg, 100, [0, 1, 2, 4, 50]), [0, 2.5e-4, 5e-4, 1e-3, 1e-3], rtol=1e-6)
    cfg = optimizer_config(schedule="constant", learning_rate=1e-3, warmup_steps=0)
    np.testing.assert_allclose(schedule_values(cfg, 100, [0, 7, 99]), [1e-3] * 3, rtol=1e-6)
    with pytest.raises(ValueError, match="schedule='linear' is unknown"):
        make_schedule(optimizer_config(schedule="linear"), 10)


# --------------------------------------------------------------------------- weight decay


def _params():
    rng = np.random.default_rng(0)
    shapes = {
        "mlp/kernel": (3, 4), "mlp/bias": (4,),
        "attention/q_proj/kernel": (4, 2, 2),
        "input_norm/scale": (4,), "final_norm/scale": (4,),
        "embed_text/embedding": (5, 4), "codebook": (3, 2),
    }
    flat = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    return unflatten_dict(flat), flat


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        out.update(_flat(v, path) if isinstance(v, dict) else {path: np.asarray(v)})
    return out


def _one_update(cfg, params, grads):
    optimizer, _ = make_optimizer(cfg, num_steps=10)
    state = optimizer.init(params)
    updates, _ = optimizer.update(grads, state, params)
    return _flat(updates)


def test_adamw_decays_kernels_but_not_biases_norms_or_embeddings():
    lr, wd, eps = 0.01, 0.1, 1e-8
    params, flat = _params()
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
    flat_grads = _flat(grads)
    cfg = optimizer_config(name="adamw", learning_rate=lr, weight_decay=wd, eps=eps, grad_clip_norm=0.0)
    assert cfg.weight_decay_exclude  # the default mask: bias|scale|norm|embed|codebook
    updates = _one_update(cfg, params, grads)

    # Adam's first step, bias-corrected: m_hat = g, v_hat = g^2, so the direction is g / (|g| + eps).
    decayed = {"mlp/kernel", "attention/q_proj/kernel"}
    for path, p in flat.items():
        g = flat_grads[path].astype(np.float64)
        adam = g / (np.abs(g) + eps)
        want = -lr * (adam + (wd * p if path in decayed else 0.0))
        np.testing.assert_allclose(updates[path], want, rtol=1e-5, atol=1e-7, err_msg=path)

    # No exclusion pattern: every parameter decays.
    cfg = optimizer_config(name="adamw", learning_rate=lr, weight_decay=wd, eps=eps, grad_clip_norm=0.0,
                           weight_decay_exclude="")
    updates = _one_update(cfg, params, grads)
    for path, p in flat.items():
        g = flat_grads[path].astype(np.float64)
        np.testing.assert_allclose(updates[path], -lr * (g / (np.abs(g) + eps) + wd * p), rtol=1e-5, atol=1e-7,
                                   err_msg=path)


def test_weight_decay_alone_shrinks_only_kernels():
    """With zero gradients Adam's direction is 0, so the whole update is the decay: -lr * wd * p on
    kernels and exactly 0 elsewhere."""
    lr, wd = 0.5, 0.2
    params, flat = _params()
    zeros = jax.tree.map(np.zeros_like, params)
    updates = _one_update(optimizer_config(name="adamw", learning_rate=lr, weight_decay=wd), params, zeros)
    for path, p in flat.items():
        want = -lr * wd * p if path.endswith("kernel") else np.zeros_like(p)
        np.testing.assert_allclose(updates[path], want, rtol=1e-6, atol=0, err_msg=path)


# --------------------------------------------------------------------------- clipping


def test_gradients_are_clipped_to_the_global_norm():
    """SGD with lr 1 and no momentum makes the update -clip(g): a gradient of global norm 5 (3 in
    one leaf, 4 in another) comes out with norm exactly grad_clip_norm, scaled as a whole (not
    per leaf); one under the threshold is untouched."""
    params = {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}
    big = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([0.0, 4.0], np.float32)}
    cfg = optimizer_config(name="sgd", learning_rate=1.0, b1=0.0, grad_clip_norm=2.0)
    updates = _one_update(cfg, params, big)
    np.testing.assert_allclose(updates["a"], [-1.2, 0.0], rtol=1e-6)  # 3 * 2 / 5
    np.testing.assert_allclose(updates["b"], [0.0, -1.6], rtol=1e-6)  # 4 * 2 / 5
    norm = math.sqrt(sum(float(np.sum(u ** 2)) for u in updates.values()))
    assert abs(norm - 2.0) < 1e-6

    small = {"a": np.array([0.3, 0.0], np.float32), "b": np.array([0.0, 0.4], np.float32)}
    updates = _one_update(cfg, params, small)
    np.testing.assert_allclose(updates["a"], [-0.3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], [0.0, -0.4], rtol=1e-6)

    # grad_clip_norm = 0 turns clipping off.
    updates = _one_update(optimizer_config(name="sgd", learning_rate=1.0, b1=0.0, grad_clip_norm=0.0), params, big)
    np.testing.assert_allclose(updates["b"], [0.0, -4.0], rtol=1e-6)


def test_clipping_precedes_adamw_moments():
    """AdamW's first step normalises g away, so clipping shows on the second: after grads g1 (norm
    10, clipped to 1) and g2 (norm 0.5), m and v hold the clipped g1."""
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 1.0
    params = {"w": np.zeros(2, np.float32)}
    g1, g2 = np.array([6.0, 8.0]), np.array([0.3, -0.4])
    cfg = optimizer_config(name="adamw", learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=0.0, grad_clip_norm=1.0)
    optimizer, _ = make_optimizer(cfg, num_steps=10)
    state = optimizer.init(params)
    _, state = optimizer.update({"w": g1.astype(np.float32)}, state, params)
    updates, _ = optimizer.update({"w": g2.astype(np.float32)}, state, params)

    c1 = g1 / 10.0  # clipped to norm 1
    m = (1 - b1) * (b1 * c1 + g2)  # two EMA steps: b1 * (1 - b1) c1 + (1 - b1) g2
    v = (1 - b2) * (b2 * c1 ** 2 + g2 ** 2)
    m_hat, v_hat = m / (1 - b1 ** 2), v / (1 - b2 ** 2)
    # rtol: optax forms 1 - b2^2 in float32 (a cancellation worth ~3e-5 relative)
    np.testing.assert_allclose(updates["w"], -lr * m_hat / (np.sqrt(v_hat) + eps), rtol=2e-4)


# --------------------------------------------------------------------------- freezing


def test_frozen_parameters_get_no_update():
    params, flat = _params()
    grads = jax.tree.map(np.ones_like, params)
    cfg = optimizer_config(name="sgd", learning_rate=0.1, b1=0.0, grad_clip_norm=0.0, freeze=r"^embed_|codebook")
    updates = _one_update(cfg, params, grads)
    for path in flat:
        frozen = path.startswith("embed_") or path == "codebook"
        np.testing.assert_array_equal(updates[path], np.zeros_like(flat[path]) if frozen else -0.1 * np.ones_like(
            flat[path]), err_msg=path)
    assert count_frozen(params, r"^embed_|codebook") == (2, 5 * 4 + 3 * 2)
