"""The latent action quantizer: model structure, loss, replacement hook, learning on rendered frames,
sharding, the labeller and the quality evaluation."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvla.config import apply_overrides, load_config
from jaxvla.losses.laq import flow_ramp, laq_loss, make_nsvq_replacement
from jaxvla.models.laq import LAQ, make_laq, patchify, unpatchify
from jaxvla.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(image_size=32, patch_size=8, dim=32, num_heads=2, head_dim=16, encoder_depth=1, temporal_depth=1,
            decoder_depth=1, quant_dim=8, code_grid=2, codebook_size=8)


def unbox(tree):
    return jax.tree.map(lambda a: a.unbox() if hasattr(a, "unbox") else a, tree, is_leaf=lambda a: hasattr(a, "unbox"))


def init(model: LAQ, seed: int = 0):
    frames = jnp.zeros((1, model.num_frames, model.image_size, model.image_size, 3))
    return unbox(model.init({"params": jax.random.PRNGKey(seed)}, frames))["params"]


def random_frames(model: LAQ, batch: int, seed: int = 0) -> jax.Array:
    shape = (batch, model.num_frames, model.image_size, model.image_size, 3)
    return jax.random.uniform(jax.random.PRNGKey(seed), shape, minval=-1.0, maxval=1.0)


def tiny_laq_config(variant: str, data_dir, **overrides):
    """``configs/laq.py:<variant>_small`` on the session's rendered Meta-World dataset, small enough
    that a CPU step takes tens of milliseconds."""
    config = load_config(os.path.join(REPO, "configs", f"laq.py:{variant}_small"))
    values = {
        "batch_size": 8,
        "log_every": 10,
        "eval_every": 0,
        "image_every": 0,
        "eval_batches": 2,
        "checkpoint.async_save": False,
        "model.dim": 64,
        "model.num_heads": 2,
        "model.head_dim": 32,
        "model.encoder_depth": 1,
        "model.temporal_depth": 1,
        "model.decoder_depth": 1,
        "model.lpips_weight": 0.0,
        "data.data_dir": str(data_dir),
        "data.generate_metaworld": False,
        "data.shuffle_buffer": 256,
        "data.gap_frames": 8 if variant == "lapa" else 0,
        "data.clip_stride": 4,
        **overrides,
    }
    return apply_overrides(config, values)


# -- model --------------------------------------------------------------------------------------


def test_patchify_round_trip_is_exact():
    images = jax.random.uniform(jax.random.PRNGKey(0), (2, 3, 32, 32, 3))
    patches = patchify(images, 8)
    assert patches.shape == (2, 3, 16, 8 * 8 * 3)
    np.testing.assert_array_equal(np.asarray(patches[0, 0, 1]), np.asarray(images[0, 0, :8, 8:16].reshape(-1)))
    np.testing.assert_array_equal(np.asarray(unpatchify(patches, 8)), np.asarray(images))


@pytest.mark.parametrize("variant, frames", [("lapa", 2), ("vipra", 4)])
def test_shapes_and_untrained_residual_model_copies_the_context(variant, frames):
    model = LAQ(variant=variant, num_frames=frames, **TINY)
    params = init(model)
    x = random_frames(model, 3)
    out = model.apply({"params": params}, x, train=True, rng=jax.random.PRNGKey(1))
    steps, tokens = frames - 1, 4
    assert out["recon"].shape == (3, steps, 32, 32, 3)
    assert out["indices"].shape == (3, steps, tokens) and out["indices"].dtype == jnp.int32
    assert out["quantized"].shape == out["latents"].shape == (3, steps, tokens, 8)
    assert out["counts"].shape == (8,) and float(out["counts"].sum()) == 3 * steps * tokens
    assert 1.0 <= float(out["perplexity"]) <= 8.0
    # Zero-initialised residual head: an untrained model predicts the copy-frame baseline.
    np.testing.assert_allclose(np.asarray(out["recon"]), np.asarray(x[:, :-1]), atol=1e-6)
    encoded = model.apply({"params": params}, x, method=model.encode)
    np.testing.assert_array_equal(np.asarray(encoded["indices"]), np.asarray(
        model.apply({"params": params}, x, train=False)["indices"]))


def test_vipra_decoder_is_causal():
    model = LAQ(variant="vipra", num_frames=4, residual=False, **TINY)
    params = init(model)
    x = random_frames(model, 2)
    context = x[:, :-1]  # o_0, o_1, o_2: outputs predict o_1, o_2, o_3
    quantized = jax.random.normal(jax.random.PRNGKey(3), (2, 3, 4, 8))
    decode = jax.jit(lambda c, q: model.apply({"params": params}, c, q, method=model.decode))
    base = np.asarray(decode(context, quantized))
    # Change o_2 (k + 2 for k = 0): the predictions of o_1 and o_2 must not move, that of o_3 must.
    changed = np.asarray(decode(context.at[:, 2].set(-context[:, 2]), quantized))
    np.testing.assert_allclose(changed[:, :2], base[:, :2], atol=1e-5)
    assert np.abs(changed[:, 2] - base[:, 2]).max() > 1e-3
    # Same for the latent action of a later transition.
    changed = np.asarray(decode(context, quantized.at[:, 1].add(3.0)))
    np.testing.assert_allclose(changed[:, 0], base[:, 0], atol=1e-5)
    assert np.abs(changed[:, 1] - base[:, 1]).max() > 1e-3


def test_lapa_decoder_reads_codes_and_matches_the_full_forward_pass():
    model = LAQ(variant="lapa", num_frames=2, residual=False, **TINY)
    params = init(model)
    x = random_frames(model, 2)
    out = model.apply({"params": params}, x, train=False)
    decoded = model.apply({"params": params}, x[:, :1], out["indices"], method=model.decode_codes)
    # The decoder's context is the patch embedding of x_t alone: decoding from x_t and the codes
    # reproduces the full forward pass.
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(out["recon"]), atol=1e-5)
    other = model.apply({"params": params}, x[:, :1], (out["indices"] + 1) % 8, method=model.decode_codes)
    assert np.abs(np.asarray(other) - np.asarray(decoded)).max() > 1e-3


def _tree_norm(tree) -> float:
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree))))


def test_lapa_decoder_context_is_the_detached_patch_embedding():
    """LAPA decodes from ``first_frame_tokens.detach()``: the patch embedding of x_t, no gradient
    into it (nor into the frame) from the decoder; the encoder path alone trains the embedding."""
    model = LAQ(variant="lapa", residual=False, **TINY)
    params = init(model)
    x = random_frames(model, 2)
    quantized = jax.random.normal(jax.random.PRNGKey(3), (2, 1, 4, 8))

    def decoded(p, context):
        return jnp.sum(jnp.square(model.apply({"params": p}, context, quantized, method=model.decode)))

    g_params, g_context = jax.grad(decoded, argnums=(0, 1))(params, x[:, :1])
    assert float(jnp.abs(g_context).max()) == 0.0
    for name in ("patch_norm_in", "patch_embed", "patch_norm_out", "spatial_encoder", "temporal_encoder",
                 "to_quant", "reduce"):
        assert _tree_norm(g_params[name]) == 0.0, name
    for name in ("decoder", "decoder_pos", "from_quant", "pixel_head"):
        assert _tree_norm(g_params[name]) > 0, name
    # The value does read x_t through the embedding (only its gradient is cut).
    base = model.apply({"params": params}, x[:, :1], quantized, method=model.decode)
    moved = model.apply({"params": params}, -x[:, :1], quantized, method=model.decode)
    assert float(jnp.abs(moved - base).max()) > 1e-3
    # Through the whole model the embedding is trained by the encoder path.
    frames = (np.asarray(x) * 127.5 + 127.5).astype(np.uint8)
    grads = jax.grad(lambda p: laq_loss(p, {"frames": frames}, jax.random.PRNGKey(0), model=model)[0])(params)
    assert _tree_norm(grads["patch_embed"]) > 0


def _numpy_conv(x, kernel, bias, stride, pad):
    """NHWC convolution by hand: ``x [N, H, W, C]``, ``kernel [kh, kw, C, F]``."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    rows, cols = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], rows, cols, kernel.shape[-1]))
    for i in range(rows):
        for j in range(cols):
            window = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]  # [N, kh, kw, C]
            out[:, i, j] = np.einsum("nhwc,hwcf->nf", window, kernel) + bias
    return out


def test_lapa_latents_project_each_frame_then_subtract():
    """d = P(e_{t+H}) - P(e_t) with P = conv(ReLU(conv(Linear(e)))) on LAPA's 8x8 -> 4x4 -> 2x2
    layout, checked against a NumPy computation from the encoder tokens."""
    from jaxvla.models.laq import reducer_layout

    assert reducer_layout(8, 2) == ((3, 2, 1), (3, 1, 0))  # LAPA code_seq_len 4
    assert reducer_layout(8, 1) == ((3, 2, 1), (4, 1, 0))  # code_seq_len 1
    assert reducer_layout(16, 4) == ((3, 2, 1), (3, 2, 1))  # code_seq_len 16
    model = LAQ(variant="lapa", **{**TINY, "image_size": 64})  # 8x8 patch grid, 2x2 codes
    params = init(model)
    x = random_frames(model, 2)
    tokens = np.asarray(model.apply({"params": params}, x, method=lambda m, f: m._lapa_tokens(f)), np.float64)
    latents = np.asarray(model.apply({"params": params}, x, train=False)["latents"])  # [2, 1, 4, 8]
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def project(e):  # [B, N, D] -> [B, 4, Q]
        y = (e @ p["to_quant"]["kernel"] + p["to_quant"]["bias"]).reshape(len(e), 8, 8, -1)
        y = np.maximum(_numpy_conv(y, p["reduce"]["conv_0"]["kernel"], p["reduce"]["conv_0"]["bias"], 2, 1), 0)
        y = _numpy_conv(y, p["reduce"]["conv_1"]["kernel"], p["reduce"]["conv_1"]["bias"], 1, 0)
        return y.reshape(len(e), 4, -1)

    expected = project(tokens[:, 1]) - project(tokens[:, 0])
    np.testing.assert_allclose(latents[:, 0], expected, rtol=1e-4, atol=1e-5)
    subtract_first = project(tokens[:, 1] - tokens[:, 0])  # the old order: not the same (ReLU, biases)
    assert np.abs(subtract_first - expected).max() > 1e-2


def test_remat_policies_give_the_same_gradients():
    frames = None
    grads = {}
    for policy in ("none", "full", "dots_saveable"):
        model = LAQ(variant="vipra", num_frames=3, residual=False, remat=policy, **TINY)
        params = init(model)
        if frames is None:
            frames = (np.asarray(random_frames(model, 2)) * 127.5 + 127.5).astype(np.uint8)
        grads[policy] = jax.grad(lambda p: laq_loss(p, {"frames": frames}, jax.random.PRNGKey(0), model=model)[0])(params)
    for policy in ("full", "dots_saveable"):
        for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[policy])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="config.remat_policy='some'"):
        init(LAQ(variant="lapa", remat="some", **TINY))


@pytest.mark.parametrize("variant", ["lapa", "vipra"])
def test_scan_unroll_keeps_parameters_outputs_and_gradients(variant):
    """``scan_unroll`` changes only the compiled loop: unroll=1 (a loop) and unroll=0 (every block
    inlined, = depth) build the same parameter tree (same values, still stacked on ``layers``) and
    give the same outputs, loss and gradients."""
    sizes = {**TINY, "encoder_depth": 2, "temporal_depth": 2, "decoder_depth": 2}
    num_frames = 2 if variant == "lapa" else 3
    shape = (2, num_frames, TINY["image_size"], TINY["image_size"], 3)
    frames = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    params, results = {}, {}
    for unroll in (1, 0):
        model = LAQ(variant=variant, num_frames=num_frames, residual=False, scan_unroll=unroll, **sizes)
        params[unroll] = unbox(jax.jit(model.init)({"params": jax.random.PRNGKey(0)}, jnp.zeros(shape)))["params"]

        def run(p, model=model):  # one compile: the outputs, the loss and its gradients
            loss = lambda q: laq_loss(q, {"frames": frames}, jax.random.PRNGKey(0), model=model)[0]
            value, grads = jax.value_and_grad(loss)(p)
            out = model.apply({"params": p}, jnp.asarray(frames, jnp.float32) / 127.5 - 1.0)
            return {k: out[k] for k in ("recon", "latents", "quantized", "indices")}, value, grads

        results[unroll] = jax.jit(run)(params[unroll])
    assert jax.tree.structure(params[0]) == jax.tree.structure(params[1])
    assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(params[0]["decoder"]["layers"])), \
        "parameters stay stacked on the layers axis"
    jax.tree.map(np.testing.assert_array_equal, params[0], params[1])
    (out0, loss0, grads0), (out1, loss1, grads1) = results[0], results[1]
    for key in ("recon", "latents", "quantized"):
        np.testing.assert_allclose(out0[key], out1[key], rtol=1e-5, atol=1e-5, err_msg=key)
    np.testing.assert_array_equal(out0["indices"], out1["indices"])
    np.testing.assert_allclose(loss0, loss1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads0, grads1)
    with pytest.raises(ValueError, match="scan unroll must be >= 0"):
        LAQ(variant=variant, num_frames=num_frames, scan_unroll=-1, **TINY).init(
            {"params": jax.random.PRNGKey(0)}, jnp.zeros(shape))


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        init(LAQ(variant="lapa", **{**TINY, "patch_size": 7}))
    with pytest.raises(ValueError, match="num_frames=2"):
        init(LAQ(variant="lapa", num_frames=3, **TINY))
    model = LAQ(variant="lapa", **TINY)
    with pytest.raises(ValueError, match=r"expected frames \[B, 2, 32, 32, 3\]"):
        model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 3, 32, 32, 3)))


@pytest.mark.parametrize("size, count", [("lapa", 1.0e8), ("vipra", 5.0e7)])
def test_paper_sizes_build_abstractly_with_logical_axes(size, count):
    model = make_laq(size)
    frames = jax.ShapeDtypeStruct((1, model.num_frames, model.image_size, model.image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda f: model.init({"params": jax.random.PRNGKey(0)}, f), frames)
    leaves = jax.tree.leaves(variables, is_leaf=lambda a: hasattr(a, "names"))
    total = sum(int(np.prod(leaf.value.shape if hasattr(leaf, "value") else leaf.shape)) for leaf in leaves)
    assert total > count
    named = [leaf for leaf in leaves if hasattr(leaf, "names")]
    assert len(named) == len(leaves), "every parameter carries logical axes"
    assert any("embed" in leaf.names for leaf in named) and any("layers" in leaf.names for leaf in named)


# -- loss ---------------------------------------------------------------------------------------


def test_gradients_reach_encoder_decoder_and_codebook():
    # residual=False: the residual head starts at zero, so at init only it gets gradient.
    model = LAQ(variant="lapa", residual=False, **TINY)
    params = init(model)
    frames = (np.asarray(random_frames(model, 4)) * 127.5 + 127.5).astype(np.uint8)
    grads = jax.grad(lambda p: laq_loss(p, {"frames": frames}, jax.random.PRNGKey(0), model=model)[0])(params)
    for path in (("spatial_encoder",), ("temporal_encoder",), ("to_quant",), ("quantizer", "codebook"),
                 ("decoder",), ("pixel_head",)):
        subtree = grads
        for key in path:
            subtree = subtree[key]
        norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(subtree))))
        assert norm > 0 and np.isfinite(norm), path


def test_loss_values_and_flow_term():
    model = LAQ(variant="vipra", num_frames=3, **TINY)
    params = init(model)
    frames = (np.asarray(random_frames(model, 2)) * 127.5 + 127.5).astype(np.uint8)
    loss_fn = jax.jit(lambda p, b: laq_loss(p, b, jax.random.PRNGKey(0), model=model, recon_loss="l1",
                                            flow_weight=0.5, flow_start=100, flow_warmup=100))
    early, metrics_early = loss_fn(params, {"frames": frames, "step": np.full((2,), 50, np.int32)})
    late, metrics_late = loss_fn(params, {"frames": frames, "step": np.full((2,), 150, np.int32)})
    x = frames.astype(np.float32) / 127.5 - 1.0
    copy_l1 = np.mean(np.abs(x[:, :-1] - x[:, 1:]))  # untrained residual model == copy baseline
    assert float(metrics_early["recon_loss"]) == pytest.approx(copy_l1, rel=1e-5)
    assert float(early) == pytest.approx(copy_l1, rel=1e-5) and float(metrics_early["flow_weight"]) == 0.0
    assert float(metrics_late["flow_weight"]) == pytest.approx(0.25)
    assert float(metrics_late["flow_loss"]) > 0
    assert float(late) == pytest.approx(copy_l1 + 0.25 * float(metrics_late["flow_loss"]), rel=1e-5)
    assert float(metrics_early["psnr"]) == pytest.approx(float(metrics_early["psnr_copy"]), abs=1e-3)


def test_vipra_encode_deltas_subtracts_consecutive_projections():
    plain = LAQ(variant="vipra", num_frames=4, **TINY)
    deltas = LAQ(variant="vipra", num_frames=4, encode_deltas=True, **TINY)
    params = init(plain)  # the flag adds no parameter: one tree serves both
    frames = random_frames(plain, 2, seed=3)
    projected = np.asarray(plain.apply({"params": params}, frames, method=plain.encode)["latents"])  # P(e_1..e_3)
    difference = np.asarray(deltas.apply({"params": params}, frames, method=deltas.encode)["latents"])
    np.testing.assert_allclose(difference[:, 1:], projected[:, 1:] - projected[:, :-1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(difference[:, 0], projected[:, 0], atol=1e-3)  # minus P(e_0), which is not zero


@pytest.mark.parametrize("recon_loss", ["l1", "mse"])
def test_motion_weighted_reconstruction(recon_loss):
    model = LAQ(variant="vipra", num_frames=3, **TINY)
    params = init(model)
    # A trained-looking pixel head (the untrained residual head predicts the copy exactly).
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.05 if "pixel_head" in jax.tree_util.keystr(path) else a, params)
    frames = np.zeros((2, 3, 32, 32, 3), np.uint8) + 100
    frames[:, 1, 8:16, 8:16] = 250  # a moving square: 8x8 pixels change, the rest is static
    frames[:, 2, 12:20, 12:20] = 250
    rng = jax.random.PRNGKey(0)
    weight = 9.0
    loss, metrics = laq_loss(params, {"frames": frames}, rng, model=model, recon_loss=recon_loss, motion_weight=weight)
    plain, plain_metrics = laq_loss(params, {"frames": frames}, rng, model=model, recon_loss=recon_loss)
    # Independent computation in NumPy from the model's own reconstruction.
    x = frames.astype(np.float64) / 127.5 - 1.0
    recon = np.asarray(model.apply({"params": params}, jnp.asarray(x, jnp.float32), train=True, rng=rng)["recon"])
    error = np.abs(recon - x[:, 1:]) if recon_loss == "l1" else np.square(recon - x[:, 1:])
    w = 1.0 + weight * np.abs(x[:, 1:] - x[:, :-1]).mean(-1, keepdims=True)
    expected = (error * w).sum() / (w.sum() * 3)
    assert float(metrics["recon_loss"]) == pytest.approx(expected, rel=1e-4)
    assert float(plain_metrics["recon_loss"]) == pytest.approx(error.mean(), rel=1e-4)
    # The moving pixels weigh 1 + 9 * 1.18 = 11.6x the static ones.
    assert float(metrics["recon_loss"]) != pytest.approx(float(plain_metrics["recon_loss"]), rel=1e-2)
    copy_error = np.abs(x[:, :-1] - x[:, 1:]) if recon_loss == "l1" else np.square(x[:, :-1] - x[:, 1:])
    assert float(metrics["recon_loss_copy"]) == pytest.approx((copy_error * w).sum() / (w.sum() * 3), rel=1e-4)
    with pytest.raises(ValueError, match="motion_weight must be >= 0"):
        laq_loss(params, {"frames": frames}, rng, model=model, motion_weight=-1.0)


def test_flow_ramp():
    values = [float(flow_ramp(s, 100, 50)) for s in (0, 100, 125, 150, 1000)]
    assert values == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert float(flow_ramp(101, 100, 0)) == 1.0 and float(flow_ramp(100, 100, 0)) == 0.0


def test_replacement_hook_follows_the_schedule():
    init_aux, post_step = make_nsvq_replacement(("quantizer", "codebook"), 4, threshold=0.1)
    codebook = jnp.arange(8.0).reshape(4, 2)
    params = {"quantizer": {"codebook": codebook}}
    aux = init_aux(params)
    outputs = {"aux/code_counts": jnp.asarray([5.0, 5.0, 0.0, 0.0]), "aux/candidates": jnp.full((6, 2), 100.0)}
    step = jax.jit(post_step)
    # Step index 3 completes step 4: not a check; counts accumulate, nothing moves.
    params, aux, metrics = step(params, aux, outputs, 3, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(params["quantizer"]["codebook"]), np.asarray(codebook))
    np.testing.assert_array_equal(np.asarray(aux["code_counts"]), [5, 5, 0, 0])
    assert float(metrics["codes_replaced"]) == 0
    # Step index 9 completes step 10, LAPA's first check: codes 2 and 3 are dead and move.
    params, aux, metrics = step(params, aux, outputs, 9, jax.random.PRNGKey(0))
    new = np.asarray(params["quantizer"]["codebook"])
    np.testing.assert_array_equal(new[:2], np.asarray(codebook)[:2])
    np.testing.assert_allclose(new[2:], 100.0, atol=0.01)
    assert float(metrics["codes_replaced"]) == 2
    np.testing.assert_array_equal(np.asarray(aux["code_counts"]), 0)


# -- training on rendered frames ------------------------------------------------------------------


def _eval_gain(result) -> float:
    return result.metrics["eval/psnr"] - result.metrics["eval/psnr_copy"]


@pytest.fixture(scope="module")
def trained_lapa(metaworld_dataset, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("laq") / "lapa"
    config = tiny_laq_config("lapa", metaworld_dataset["out"], num_steps=300, eval_every=300, **{
        "data.eval_split": "train", "optimizer.warmup_steps": 10})
    return train(config, str(workdir), devices=jax.devices()[:1])


def test_lapa_small_beats_the_copy_frame_baseline(trained_lapa):
    history = trained_lapa.history
    assert _eval_gain(trained_lapa) > 1.0, trained_lapa.metrics
    first, last = history[0][1]["recon_loss"], history[-1][1]["recon_loss"]
    assert last < 0.8 * first
    assert trained_lapa.metrics["eval/codes_used_fraction"] >= 0.5


def test_stage_refuses_mismatched_data(metaworld_dataset):
    from jaxvla.stages import build_stage

    with pytest.raises(ValueError, match="config.data.sample='clips'"):
        build_stage(tiny_laq_config("lapa", metaworld_dataset["out"], **{"data.sample": "clips"}))
    with pytest.raises(ValueError, match="config.data.image_size=32"):
        build_stage(tiny_laq_config("lapa", metaworld_dataset["out"], **{"data.image_size": 32}))


# -- labeller and evaluation ----------------------------------------------------------------------


def test_labels_are_deterministic_aligned_and_joinable(trained_lapa, metaworld_dataset, tmp_path):
    from jaxvla.data.latent_labels import join_latent_labels, load_latent_labels
    from jaxvla.data.pipeline import get_dataset_spec, make_trajectory_dataset, trajectory_frames
    from jaxvla.frozen import load_laq
    from jaxvla.latent_actions import label_dataset

    laq = load_laq(trained_lapa.workdir)
    assert laq.step == 300 and list(laq.frame_offsets) == [0, 8]
    data = laq.config.data
    first = label_dataset(laq, data, str(tmp_path / "a"), progress=False)
    second = label_dataset(laq, data, str(tmp_path / "b"), batch_size=16, progress=False)
    info, labels = load_latent_labels(first)
    _, labels_b = load_latent_labels(second)
    assert info["laq_config_hash"] == laq.config_hash and info["code_shape"] == [1, 4]
    assert info["meta"]["step"] == 300
    assert labels.keys == labels_b.keys and len(labels) == 2  # 2 tasks x 1 train episode
    np.testing.assert_array_equal(labels.codes, labels_b.codes)

    trajectories = dict(trajectory_frames(data, "train", image_size=64))
    for key, images in trajectories.items():
        frames, codes = labels[key]
        np.testing.assert_array_equal(frames, np.arange(len(images) - 8))
        for t in (0, len(frames) // 2, len(frames) - 1):  # spot checks against a direct encoder call
            direct = laq.encode(np.stack([images[t], images[t + 8]])[None])
            np.testing.assert_array_equal(codes[t], direct[0])
    assert len(set(labels.codes.reshape(-1).tolist())) > 1, "the labels are not all one code"

    with pytest.raises(FileExistsError, match="--overwrite"):
        label_dataset(laq, data, first, progress=False)

    # The pretraining side: the join attaches exactly these codes by (traj_key, frame).
    spec = get_dataset_spec("metaworld")
    trajectories_ds = make_trajectory_dataset(spec, "train", False, 0, 0, 1, data_dir=str(metaworld_dataset["out"]))
    joined = join_latent_labels(trajectories_ds.dataset, first, expected_hash=laq.config_hash)
    for trajectory in joined.as_numpy_iterator():
        key = trajectory["traj_key"][0].decode()
        frames, codes = labels[key]
        np.testing.assert_array_equal(trajectory["latent_action"][frames], codes)
        assert trajectory["has_latent"].sum() == len(frames)


def test_labeller_resumes_a_finished_part(trained_lapa, tmp_path):
    from jaxvla.data.latent_labels import INFO_FILE, load_latent_labels
    from jaxvla.frozen import load_laq
    from jaxvla.latent_actions import label_dataset

    laq = load_laq(trained_lapa.workdir)
    out = tmp_path / "labels"
    label_dataset(laq, laq.config.data, str(out), progress=False)
    os.remove(out / INFO_FILE)  # crashed after the part finished, before the index
    label_dataset(laq, laq.config.data, str(out), resume=True, progress=False)
    assert len(load_latent_labels(out)[1]) == 2


def test_labeller_resumes_mid_split_with_the_same_laq_only(trained_lapa, tmp_path, monkeypatch):
    """A labelling killed after its first shard continues from it, labelling only the rest, to the
    labels an uninterrupted run writes; a LAQ trained again (another weights fingerprint) does not
    continue it, nor keep a finished part."""
    from jaxvla.data import latent_labels as ll
    from jaxvla.frozen import LoadedLAQ, load_laq
    from jaxvla.latent_actions import label_dataset

    laq = load_laq(trained_lapa.workdir)
    assert laq.weights_fingerprint and len(laq.weights_fingerprint) == 64
    reference = ll.load_latent_labels(label_dataset(laq, laq.config.data, str(tmp_path / "reference"),
                                                    progress=False))[1]
    added = []
    real_add = ll.LatentLabelWriter.add

    def add(writer, key, *args):
        if len(added) == 1 and not writer.resumed_count:
            raise KeyboardInterrupt  # killed while labelling the second trajectory
        added.append(key)
        return real_add(writer, key, *args)

    monkeypatch.setattr(ll.LatentLabelWriter, "add", add)
    out = tmp_path / "labels"
    with pytest.raises(KeyboardInterrupt):
        label_dataset(laq, laq.config.data, str(out), shard_size=1, progress=False)
    assert not ll.is_complete(out) and len(added) == 1

    retrained = property(lambda self: "0" * 64)
    with monkeypatch.context() as patch:
        patch.setattr(LoadedLAQ, "weights_fingerprint", retrained)
        with pytest.raises(ll.LabelResumeError, match="LAQ weights"):
            label_dataset(laq, laq.config.data, str(out), resume=True, overwrite=True, progress=False)
    assert len(added) == 1

    label_dataset(laq, laq.config.data, str(out), resume=True, shard_size=1, progress=False)
    assert len(added) == 2 and added[1] != added[0]  # only the second trajectory was labelled again
    info, labels = ll.load_latent_labels(out)
    assert info["laq_weights"] == laq.weights_fingerprint
    assert sorted(labels.keys) == sorted(reference.keys)
    for key in reference.keys:
        for got, want in zip(labels[key], reference[key]):
            np.testing.assert_array_equal(got, want)

    with monkeypatch.context() as patch:
        patch.setattr(LoadedLAQ, "weights_fingerprint", retrained)
        with pytest.raises(ll.LabelResumeError, match="finished part was labelled with laq_weights="):
            label_dataset(laq, laq.config.data, str(out), resume=True, overwrite=True, progress=False)


def test_eval_laq_script_prints_the_figures(trained_lapa, tmp_path):
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "eval_laq.py"), f"--checkpoint={trained_lapa.workdir}",
         "--eval_split=val", "--batch_size=16", "--set=bootstrap=100", "--gate", f"--json={out}"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    import json

    result = json.loads(out.read_text())
    assert proc.returncode == (0 if result["gate"]["passed"] else 3), proc.stderr[-3000:]
    for text in ("copy-frame baseline PSNR", "| linear | task_phase_codes |", "| knn | gain_over_task_phase |",
                 "codes used", "LAQ gate: "):
        assert text in proc.stdout, text
    assert result["step"] == 300 and result["frame_offsets"] == [0, 8] and result["variant"] == "lapa"
    # 2 tasks x 1 held-out episode; one latent (4 tokens) per window start t = 0 .. T - 8.
    assert result["held_out_episodes"] == 2 and result["held_out_latents"] > 0
    assert result["psnr"] > result["psnr_copy_baseline"]
    assert 1.0 <= result["usage"]["code_perplexity"]["value"] <= 8.0
    for probe in ("linear", "knn"):
        entry = result[probe]["codes"]["xyz_r2"]
        assert np.isfinite(entry["value"]) and entry["ci95"][0] <= entry["value"] <= entry["ci95"][1]
        assert np.isfinite(result[probe]["gain_over_task_phase"]["xyz_r2"]["value"])
    assert result["gate"]["thresholds"]["min_xyz_r2"] == 0.5
    assert result["gate"]["passed"] == (result["gate"]["reasons"] == [])


def test_eval_laq_script_names_a_missing_checkpoint(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "eval_laq.py"), f"--checkpoint={tmp_path / 'nothing'}"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 1 and "nothing" in proc.stderr
