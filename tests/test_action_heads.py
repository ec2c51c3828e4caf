"""Stage 3 action heads and losses: Euler sampler, flow times, flow-matching training on a toy
problem, quantile bins, the bin cross-entropy, module shapes / logical axes, the trainer loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core import meta

from jaxvla.data.stats import bin_actions, quantile_bin_edges, unbin_actions
from jaxvla.losses.actions import (
    bin_centres,
    binned_action_loss_from_logits,
    decode_bins,
    euler_sample,
    flow_matching_loss_from_velocity,
    make_flow_matching_loss,
    noisy_actions,
    sample_flow_times,
    velocity_target,
)
from jaxvla.models.action_heads import ActionEncoder, VelocityHead, sinusoidal_embedding


# --------------------------------------------------------------------------- (a) Euler sampler


def test_euler_sampler_straight_line_field_lands_on_target():
    target = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 4, 2)), jnp.float32)
    noise = jax.random.normal(jax.random.PRNGKey(1), target.shape) * 3.0

    def velocity(u, s):  # exact field of the path u_s = s u_0 + (1 - s) a*
        return (u - target) / s[:, None, None]

    out = jax.jit(lambda n: euler_sample(velocity, n, num_steps=10))(noise)
    np.testing.assert_allclose(np.asarray(out), np.asarray(target), atol=1e-5)


def test_euler_sampler_constant_field_and_time_grid():
    c = jnp.asarray([[[0.5, -2.0]]], jnp.float32)
    noise = jnp.ones((2, 3, 2), jnp.float32)

    def velocity(u, s):
        return jnp.broadcast_to(c, u.shape)

    out = euler_sample(velocity, noise, num_steps=10)
    np.testing.assert_allclose(np.asarray(out), np.asarray(noise - c), atol=1e-6)

    seen = []  # the times the velocity is evaluated at: 1, 1 - 1/n, ..., 1/n

    def recording_velocity(u, s):
        jax.debug.callback(lambda v: seen.append(np.asarray(v).copy()), s)
        return jnp.zeros_like(u)

    jax.block_until_ready(euler_sample(recording_velocity, noise, num_steps=4))
    jax.effects_barrier()
    np.testing.assert_allclose(np.stack(seen)[:, 0], [1.0, 0.75, 0.5, 0.25], atol=1e-6)


# --------------------------------------------------------------------------- (b) flow times


def test_flow_times_beta_1p5_1():
    s = np.asarray(sample_flow_times(jax.random.PRNGKey(0), (20000,)))
    assert s.dtype == np.float32
    assert np.all(s > 0) and np.all(s < 1)
    assert abs(s.mean() - 0.6) < 0.01
    # Beta(1.5, 1): P(s <= x) = x^1.5
    assert abs(np.mean(s <= 0.5) - 0.5**1.5) < 0.015
    other = np.asarray(sample_flow_times(jax.random.PRNGKey(1), (20000,), alpha=1.0, beta=2.0))
    assert abs(other.mean() - 1 / 3) < 0.01  # Beta(1, 2)


def test_noisy_actions_and_target():
    a = jnp.full((2, 3, 1), 0.5)
    n = jnp.full((2, 3, 1), -1.0)
    s = jnp.asarray([0.0, 1.0])
    u = noisy_actions(a, n, s)
    np.testing.assert_allclose(np.asarray(u[0]), 0.5)
    np.testing.assert_allclose(np.asarray(u[1]), -1.0)
    np.testing.assert_allclose(np.asarray(velocity_target(a, n)), -1.5)


def test_flow_loss_masks_padded_steps():
    a = jnp.zeros((2, 3, 2))
    n = jnp.ones((2, 3, 2))
    pred = jnp.ones((2, 3, 2)).at[:, 2].set(100.0)  # wrong only on the padded step
    mask = jnp.asarray([[True, True, False]] * 2)
    loss, metrics = flow_matching_loss_from_velocity(pred, a, n, mask)
    assert float(loss) == 0.0 and float(metrics["mse"]) == 0.0
    loss_all, _ = flow_matching_loss_from_velocity(pred, a, n, None)
    np.testing.assert_allclose(float(loss_all), 99.0**2 / 3, rtol=1e-5)


# --------------------------------------------------------------------------- (c) toy training

NUM_CONTEXTS, K, A = 3, 4, 2


class ToyVelocity(nn.Module):
    """ActionEncoder tokens + learned position and context embeddings -> swish MLP ->
    VelocityHead, per chunk step (the optimal field (u_k - a*_k) / s is per step)."""

    width: int = 64

    @nn.compact
    def __call__(self, u, s, context):
        x = ActionEncoder(self.width, time_dim=32, name="encoder")(u, s)
        pos = self.param("pos", nn.initializers.normal(0.1), (K, self.width))
        ctx = nn.Dense(self.width, name="context")(context)  # [B, width]
        x = x + pos[None] + ctx[:, None]
        for i in range(2):
            x = nn.swish(nn.Dense(self.width, name=f"hidden{i}")(x))
        return VelocityHead(A, name="head")(x)


def test_flow_matching_trains_and_samples_demonstrations():
    demos = jnp.asarray(np.random.default_rng(3).uniform(-0.8, 0.8, (NUM_CONTEXTS, K, A)), jnp.float32)
    model = ToyVelocity()
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, K, A)), jnp.ones((1,)),
                        jnp.zeros((1, NUM_CONTEXTS)))["params"]
    params = meta.unbox(params)

    def apply_velocity(p, batch, u_s, s):
        return model.apply({"params": p}, u_s, s, batch["context"])

    loss_fn = make_flow_matching_loss(apply_velocity)
    optimizer = optax.adam(3e-3)
    batch_size = 96

    def make_batch(rng):
        idx = jax.random.randint(rng, (batch_size,), 0, NUM_CONTEXTS)
        return {"action": demos[idx], "context": jax.nn.one_hot(idx, NUM_CONTEXTS),
                "action_pad_mask": jnp.ones((batch_size, K), bool)}

    @jax.jit
    def train(params, rng):
        opt_state = optimizer.init(params)

        def step(carry, rng):
            params, opt_state = carry
            batch_rng, loss_rng = jax.random.split(rng)
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, make_batch(batch_rng), loss_rng)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, opt_state), jax.random.split(rng, 500))
        return params, losses

    params, losses = train(params, jax.random.PRNGKey(1))
    losses = np.asarray(losses)
    start, end = losses[:20].mean(), losses[-50:].mean()
    print(f"flow loss {start:.3f} -> {end:.3f}")
    assert end < 0.3 * start, (start, end)

    contexts = jnp.repeat(jnp.eye(NUM_CONTEXTS), 16, axis=0)  # 16 samples per context
    noise = jax.random.normal(jax.random.PRNGKey(2), (contexts.shape[0], K, A))
    samples = jax.jit(lambda p, n: euler_sample(lambda u, s: model.apply({"params": p}, u, s, contexts), n))(
        params, noise)
    samples = np.asarray(samples).reshape(NUM_CONTEXTS, 16, K, A)
    for c in range(NUM_CONTEXTS):
        err = np.abs(samples[c] - np.asarray(demos[c])[None]).mean()
        print(f"context {c}: mean abs error {err:.4f}")
        assert err < 0.1, (c, err)


# --------------------------------------------------------------------------- (d) bins


def _binned_dataset():
    rng = np.random.default_rng(0)
    n = 4000
    actions = np.stack([
        rng.normal(0, 0.3, n),
        np.clip(rng.normal(0, 0.7, n), -1, 1),  # point masses at +-1 (ties)
        rng.uniform(-1, 1, n),
        np.where(rng.uniform(size=n) < 0.4, -1.0, 1.0),  # gripper
    ], axis=1).astype(np.float32)
    return actions, quantile_bin_edges(actions, 256, binary_dims=(-1,))


def test_bins_round_trip_within_half_a_bin():
    actions, edges = _binned_dataset()
    assert edges.shape == (4, 257)
    bins = bin_actions(actions, edges)
    decoded = unbin_actions(bins, edges)
    assert bins.min() >= 0 and bins.max() < 256
    for d in range(3):
        width = edges[d, bins[:, d] + 1] - edges[d, bins[:, d]]
        assert np.all(np.abs(decoded[:, d] - actions[:, d]) <= 0.5 * width + 1e-6), d
    # the gripper uses bins 0 / 1 only and decodes exactly to its two values
    assert set(np.unique(bins[:, 3]).tolist()) == {0, 1}
    np.testing.assert_array_equal(decoded[:, 3], actions[:, 3])
    # a point mass at the maximum (clipped at +1) fills zero-width bins and decodes exactly (the
    # one at the minimum lands in the first non-empty bin: within half a bin, checked above)
    at_max = actions[:, 1] == 1.0
    assert at_max.sum() > 100
    np.testing.assert_array_equal(decoded[at_max, 1], actions[at_max, 1])
    # the device-side table lookup decodes exactly as stats.unbin_actions does
    centres = bin_centres(edges)
    assert centres.shape == (4, 256)
    on_device = jax.jit(decode_bins)(jnp.asarray(bins), jnp.asarray(centres))
    np.testing.assert_array_equal(np.asarray(on_device), decoded)


# --------------------------------------------------------------------------- (e) bin cross-entropy


def test_binned_loss_perfect_and_uniform():
    num_bins = 256
    bins = jnp.asarray(np.random.default_rng(0).integers(0, num_bins, (5, 7)), jnp.int32)
    perfect = 1e4 * jax.nn.one_hot(bins, num_bins)
    loss, metrics = jax.jit(binned_action_loss_from_logits)(perfect, bins, jnp.ones((5,), bool))
    assert float(loss) < 1e-6 and float(metrics["accuracy"]) == 1.0
    uniform = jnp.zeros((5, 7, num_bins))
    loss, _ = binned_action_loss_from_logits(uniform, bins, None)
    np.testing.assert_allclose(float(loss), np.log(num_bins), rtol=1e-6)
    # masked entries do not count: wrong logits only on masked (sample, dim) pairs
    wrong = perfect.at[0].set(1e4 * jax.nn.one_hot((bins[0] + 1) % num_bins, num_bins))
    mask = jnp.ones((5, 7), bool).at[0].set(False)
    loss, metrics = binned_action_loss_from_logits(wrong, bins, mask)
    assert float(loss) < 1e-6 and float(metrics["accuracy"]) == 1.0
    loss, metrics = binned_action_loss_from_logits(wrong, bins, mask[:, 0])  # [B] mask
    assert float(loss) < 1e-6 and float(metrics["accuracy"]) == 1.0


# --------------------------------------------------------------------------- (f) modules


def test_sinusoidal_embedding():
    emb = sinusoidal_embedding(jnp.asarray([0.0, 0.5, 1.0]), 16)
    assert emb.shape == (3, 16)
    np.testing.assert_allclose(np.asarray(emb[0]), [0.0] * 8 + [1.0] * 8, atol=1e-7)
    # longest period 4: the last sine frequency is sin(2 pi s / 4)
    np.testing.assert_allclose(float(emb[1, 7]), np.sin(2 * np.pi * 0.5 / 4.0), atol=1e-6)


def test_action_modules_shapes_axes_and_gradients():
    batch, chunk, action_dim, width = 2, 14, 7, 32
    encoder = ActionEncoder(width, time_dim=16, hidden=48, dtype=jnp.bfloat16)
    head = VelocityHead(action_dim, dtype=jnp.bfloat16)
    u = jax.random.normal(jax.random.PRNGKey(0), (batch, chunk, action_dim))
    s = jnp.asarray([0.3, 0.9])
    enc_vars = jax.jit(encoder.init)(jax.random.PRNGKey(1), u, s)  # eager init: seconds of op compiles
    head_vars = jax.jit(head.init)(jax.random.PRNGKey(2), jnp.zeros((batch, chunk, width)))
    for variables in (enc_vars, head_vars):
        leaves = jax.tree_util.tree_leaves(variables["params"], is_leaf=lambda x: isinstance(x, meta.Partitioned))
        assert leaves and all(isinstance(x, meta.Partitioned) for x in leaves)
        for leaf in leaves:
            assert leaf.value.dtype == jnp.float32
            assert len(leaf.names) == leaf.value.ndim
            assert set(leaf.names) <= {"embed", "mlp", None}
    axes = nn.get_partition_spec(enc_vars)["params"]
    assert tuple(axes["action_in"]["kernel"]) == (None, "embed")
    assert tuple(axes["action_time_mlp_in"]["kernel"]) == (None, "mlp")
    assert tuple(axes["action_time_mlp_out"]["kernel"]) == ("mlp", "embed")
    assert tuple(nn.get_partition_spec(head_vars)["params"]["velocity_out"]["kernel"]) == ("embed", None)

    enc_params, head_params = meta.unbox(enc_vars["params"]), meta.unbox(head_vars["params"])
    apply_encoder = jax.jit(lambda p, s: encoder.apply({"params": p}, u, s))
    tokens = apply_encoder(enc_params, s)
    assert tokens.shape == (batch, chunk, width) and tokens.dtype == jnp.bfloat16
    velocity = jax.jit(head.apply)({"params": head_params}, tokens)
    assert velocity.shape == (batch, chunk, action_dim) and velocity.dtype == jnp.float32

    def loss(enc_params):
        v = head.apply({"params": head_params}, encoder.apply({"params": enc_params}, u, s))
        return jnp.mean(v**2)

    grads = jax.jit(jax.grad(loss))(enc_params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert g.dtype == jnp.float32
        assert float(jnp.abs(g).sum()) > 0, path
    # the time embedding matters: different s, different tokens
    other = apply_encoder(enc_params, jnp.asarray([0.7, 0.1]))
    assert float(jnp.abs(other.astype(jnp.float32) - tokens.astype(jnp.float32)).max()) > 0


# --------------------------------------------------------------------------- (g) trainer loss


def test_make_flow_matching_loss_jit_and_grad():
    def apply_velocity(params, batch, u_s, s):
        return u_s * params["w"] + params["b"] + s[:, None, None] * batch["action"]

    params = {"w": jnp.ones((3,)), "b": jnp.zeros((3,))}
    batch = {"action": jnp.full((4, 5, 3), 0.2),
             "action_pad_mask": jnp.ones((4, 5), bool).at[:, 3:].set(False)}
    loss_fn = make_flow_matching_loss(apply_velocity)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch, jax.random.PRNGKey(0))
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert set(metrics) >= {"mse", "flow_time_mean", "velocity_norm"}
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(grads))
    # same rng, same loss; no mask key -> every step counts
    again, _ = jax.jit(loss_fn)(params, batch, jax.random.PRNGKey(0))
    assert float(again) == float(loss)
    unmasked, _ = jax.jit(loss_fn)(params, {"action": batch["action"]}, jax.random.PRNGKey(0))
    assert np.isfinite(float(unmasked)) and float(unmasked) != float(loss)
