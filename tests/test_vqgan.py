"""VQGAN tokenizer: shapes, LWM parity against an independent reference, and weight conversion.

The parity test builds a random parameter tree in LWM's exact layout (auto-named Flax modules),
runs a reference forward written here directly over those names (lax convs, float64 numpy group
norm), converts the tree with ``jaxvla.io.lwm`` and checks the model agrees.
"""

import collections
import importlib.util
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict
from flax.linen import meta
import flax.linen as nn

from jaxvla.io.lwm import (
    count_params,
    load_lwm_vqgan,
    load_vqgan_params,
    lwm_vqgan_to_params,
    params_to_lwm_vqgan,
)
from jaxvla.io.weights import flatten_dict, unflatten_dict
from jaxvla.models.vqgan import VQGAN, vqgan_variant

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# LWM's architecture at toy size: 16x16 -> 4x4 tokens, widths 32/64/64 (GroupNorm(32)-valid),
# level 1 changes width so both the encoder and decoder have a 1x1 shortcut.
TINY = dict(
    resolution=16,
    in_channels=3,
    hidden_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    z_channels=8,
    codebook_size=16,
    embed_dim=8,
    norm_groups=32,
)


# One level, no resampling: the smallest graph that still has every kind of block, for tests
# whose cost is XLA compilation (gradients).
MICRO = dict(TINY, resolution=8, channel_mult=(1,))

# XLA's CPU backend spends seconds optimising these conv graphs, far longer than they run.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILE)


# --- LWM-layout tree, written independently of jaxvla.io.lwm ------------------------------------


def lwm_shapes(cfg):
    """Flat {"a/b/kernel": shape} of LWM's VQGAN tree for a config, by walking its module order."""
    shapes = {}
    hidden, mult, nrb = cfg["hidden_channels"], cfg["channel_mult"], cfg["num_res_blocks"]

    def conv(prefix, k, cin, cout):
        shapes[prefix + "/kernel"] = (k, k, cin, cout)
        shapes[prefix + "/bias"] = (cout,)

    def gn(prefix, c):
        shapes[prefix + "/scale"] = (c,)
        shapes[prefix + "/bias"] = (c,)

    def res(prefix, cin, cout):
        gn(prefix + "/GroupNorm_0", cin)
        conv(prefix + "/Conv_0", 3, cin, cout)
        gn(prefix + "/GroupNorm_1", cout)
        conv(prefix + "/Conv_1", 3, cout, cout)
        if cin != cout:
            conv(prefix + "/Conv_2", 1, cin, cout)

    c = hidden
    conv("encoder/Conv_0", 3, cfg["in_channels"], c)
    for i, m in enumerate(mult):
        for b in range(nrb):
            res(f"encoder/DownsamplingBlock_{i}/ResnetBlock_{b}", c, hidden * m)
            c = hidden * m
        if i != len(mult) - 1:
            conv(f"encoder/DownsamplingBlock_{i}/Downsample_0/Conv_0", 3, c, c)
    res("encoder/MidBlock_0/ResnetBlock_0", c, c)
    res("encoder/MidBlock_0/ResnetBlock_1", c, c)
    gn("encoder/GroupNorm_0", c)
    conv("encoder/Conv_1", 3, c, cfg["z_channels"])
    conv("quant_conv", 1, cfg["z_channels"], cfg["embed_dim"])
    shapes["quantize/embeddings"] = (cfg["codebook_size"], cfg["embed_dim"])
    conv("post_quant_conv", 1, cfg["embed_dim"], cfg["z_channels"])
    c = hidden * mult[-1]
    conv("decoder/Conv_0", 3, cfg["z_channels"], c)
    res("decoder/MidBlock_0/ResnetBlock_0", c, c)
    res("decoder/MidBlock_0/ResnetBlock_1", c, c)
    for n, i in enumerate(reversed(range(len(mult)))):
        for b in range(nrb + 1):
            res(f"decoder/UpsamplingBlock_{n}/ResnetBlock_{b}", c, hidden * mult[i])
            c = hidden * mult[i]
        if i != 0:
            conv(f"decoder/UpsamplingBlock_{n}/Upsample_0/Conv_0", 3, c, c)
    gn("decoder/GroupNorm_0", c)
    conv("decoder/Conv_1", 3, c, cfg["in_channels"])
    return shapes


def random_lwm_tree(cfg, seed=0):
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in lwm_shapes(cfg).items():
        if path.endswith("kernel"):
            fan_in = shape[0] * shape[1] * shape[2]
            value = rng.normal(size=shape) / np.sqrt(fan_in)
        elif path.endswith("scale"):
            value = 1.0 + 0.2 * rng.normal(size=shape)
        elif path.endswith("embeddings"):
            value = rng.normal(size=shape)
        else:  # biases
            value = 0.1 * rng.normal(size=shape)
        flat[path] = value.astype(np.float32)
    return unflatten_dict(flat)


# --- Reference forward over the LWM names ---------------------------------------------------------


def ref_conv(p, x, stride=1, padding="SAME"):
    y = jax.lax.conv_general_dilated(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(p["kernel"]),
        (stride, stride),
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    return np.asarray(y) + p["bias"]


def ref_group_norm(p, x, groups=32, eps=1e-6):
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + eps)
    return (g.reshape(b, h, w, c) * p["scale"] + p["bias"]).astype(np.float32)


def silu(x):
    return x / (1.0 + np.exp(-x))


def ref_resnet(p, x):
    h = ref_conv(p["Conv_0"], silu(ref_group_norm(p["GroupNorm_0"], x)))
    h = ref_conv(p["Conv_1"], silu(ref_group_norm(p["GroupNorm_1"], h)))
    skip = ref_conv(p["Conv_2"], x) if "Conv_2" in p else x
    return h + skip


def ref_mid(p, x):
    return ref_resnet(p["ResnetBlock_1"], ref_resnet(p["ResnetBlock_0"], x))


def numbered(p, prefix):
    return sorted((k for k in p if k.startswith(prefix)), key=lambda k: int(k.rsplit("_", 1)[1]))


def ref_encode_latents(tree, x):
    enc = tree["encoder"]
    h = ref_conv(enc["Conv_0"], x)
    for name in numbered(enc, "DownsamplingBlock_"):
        block = enc[name]
        for res in numbered(block, "ResnetBlock_"):
            h = ref_resnet(block[res], h)
        if "Downsample_0" in block:
            h = np.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
            h = ref_conv(block["Downsample_0"]["Conv_0"], h, stride=2, padding="VALID")
    h = ref_mid(enc["MidBlock_0"], h)
    h = ref_conv(enc["Conv_1"], silu(ref_group_norm(enc["GroupNorm_0"], h)))
    return ref_conv(tree["quant_conv"], h)


def ref_quantize(tree, z):
    codebook = tree["quantize"]["embeddings"].astype(np.float64)
    d = ((z.astype(np.float64)[..., None, :] - codebook) ** 2).sum(-1)
    return np.argmin(d, axis=-1), d


def ref_decode_latents(tree, z):
    dec = tree["decoder"]
    h = ref_conv(dec["Conv_0"], ref_conv(tree["post_quant_conv"], z))
    h = ref_mid(dec["MidBlock_0"], h)
    for name in numbered(dec, "UpsamplingBlock_"):
        block = dec[name]
        for res in numbered(block, "ResnetBlock_"):
            h = ref_resnet(block[res], h)
        if "Upsample_0" in block:
            h = np.repeat(np.repeat(h, 2, axis=1), 2, axis=2)
            h = ref_conv(block["Upsample_0"]["Conv_0"], h)
    return ref_conv(dec["Conv_1"], silu(ref_group_norm(dec["GroupNorm_0"], h)))


# --- Helpers --------------------------------------------------------------------------------------
#
# Real ``model.init`` is avoided on purpose: XLA compiles one RNG program per parameter, which
# costs tens of seconds on a shared CPU. Parameter structure comes from ``jax.eval_shape`` and
# values from numpy instead; only the codebook initializer is run for real.


def images(shape, seed=0):
    return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


def abstract_variables(model, image_shape):
    """``model.init`` traced, not run: LogicallyPartitioned boxes around ShapeDtypeStructs."""
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(image_shape, jnp.float32))


def random_params(model, image_shape, seed=0):
    """Unboxed {"params": ...} of fan-in-scaled random numpy values for ``model``."""
    rng = np.random.default_rng(seed)
    flat = flatten_dict(meta.unbox(abstract_variables(model, image_shape))["params"])
    out = {}
    for path, leaf in flat.items():
        shape = leaf.shape
        if path.endswith("kernel"):
            value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        elif path.endswith("scale"):
            value = np.ones(shape)
        elif path.endswith("codebook"):
            value = rng.normal(size=shape)
        else:
            value = 0.05 * rng.normal(size=shape)
        out[path] = value.astype(np.float32)
    return {"params": unflatten_dict(out)}


@pytest.fixture(scope="module")
def small():
    model = VQGAN(**vqgan_variant("small"))
    return model, random_params(model, (1, 64, 64, 3))


@pytest.fixture(scope="module")
def tiny():
    tree = random_lwm_tree(TINY)
    return VQGAN(**TINY), tree, {"params": lwm_vqgan_to_params(tree, TINY)}


# --- Variants and shapes --------------------------------------------------------------------------


def test_variants():
    assert vqgan_variant("lwm") == dict(
        resolution=256,
        in_channels=3,
        hidden_channels=128,
        channel_mult=(1, 2, 2, 4, 6),
        num_res_blocks=2,
        z_channels=64,
        codebook_size=8192,
        embed_dim=64,
        norm_groups=32,
    )
    assert vqgan_variant("small")["resolution"] == 64
    with pytest.raises(ValueError, match="lwm.*small"):
        vqgan_variant("huge")


def test_lwm_shapes_and_param_count():
    model = VQGAN(**vqgan_variant("lwm"))
    params = meta.unbox(abstract_variables(model, (2, 256, 256, 3)))["params"]
    assert params["quantizer"]["codebook"].shape == (8192, 64)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))

    # Counted from LWM's layout walked above, independently of the model and the converter.
    expected = sum(int(np.prod(s)) for s in lwm_shapes(vqgan_variant("lwm")).values())
    assert expected == 146_244_675
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)) == expected

    variables = {"params": params}
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    tokens = jax.eval_shape(lambda v, x: model.apply(v, x, method=VQGAN.encode), variables, x)
    assert (tokens.shape, tokens.dtype) == ((2, 16, 16), jnp.int32)
    recon = jax.eval_shape(
        lambda v, t: model.apply(v, t, method=VQGAN.decode),
        variables,
        jax.ShapeDtypeStruct((2, 16, 16), jnp.int32),
    )
    assert (recon.shape, recon.dtype) == ((2, 256, 256, 3), jnp.float32)


def test_logical_axes_on_every_param():
    variables = abstract_variables(VQGAN(**vqgan_variant("small")), (1, 64, 64, 3))
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    boxes = jax.tree_util.tree_leaves(variables["params"], is_leaf=is_box)
    assert boxes and all(is_box(b) for b in boxes)
    names = flatten_dict(jax.tree_util.tree_map(lambda b: b.names, variables["params"], is_leaf=is_box))
    assert names["quantizer/codebook"] == ("codebook", "codebook_dim")
    assert names["encoder/down_2/res_0/shortcut/kernel"] == (None, None, "conv_in", "conv_out")
    assert names["decoder/up_1/upsample/conv/bias"] == ("conv_out",)
    assert names["decoder/norm_out/scale"] == ("norm",)
    for path, axes in names.items():
        *_, module, leaf = path.split("/")
        if module == "quantizer":
            continue
        if module.startswith("norm"):
            assert axes == ("norm",), path
        elif leaf == "kernel":
            assert axes == (None, None, "conv_in", "conv_out"), path
        else:
            assert axes == ("conv_out",), path


def test_codebook_init_is_lwm_uniform():
    from jaxvla.models.vqgan import VectorQuantizer

    variables = jit(VectorQuantizer(512, 32).init)(jax.random.key(0), jnp.zeros((1, 32)))
    codebook = meta.unbox(variables)["params"]["codebook"]
    assert codebook.shape == (512, 32) and codebook.dtype == jnp.float32
    assert float(jnp.abs(codebook).max()) <= 1.0 / 512
    assert float(codebook.std()) > 0.4 / 512  # uniform(-a, a) has std a/sqrt(3)


def test_small_forward(small):
    model, params = small
    codebook = params["params"]["quantizer"]["codebook"]
    x = images((2, 64, 64, 3), seed=1)
    video = jnp.stack([x, x[::-1]], axis=1)  # [2, 2, 64, 64, 3]

    @jit
    def run(params, x, video):
        out = model.apply(params, x)
        return dict(
            out=out,
            video_tokens=model.apply(params, video, method=VQGAN.encode),
            decoded=model.apply(params, out["indices"], method=VQGAN.decode),
        )

    results = run(params, x, video)
    out = results["out"]
    assert out["recon"].shape == (2, 64, 64, 3) and out["recon"].dtype == jnp.float32
    assert out["z_e"].shape == out["z_q"].shape == (2, 8, 8, 32)
    assert out["z_e"].dtype == out["z_q"].dtype == jnp.float32
    assert out["indices"].shape == (2, 8, 8) and out["indices"].dtype == jnp.int32
    assert all(bool(jnp.isfinite(v).all()) for v in out.values())
    assert 0.01 < float(jnp.std(out["recon"])) < 100.0
    assert int(out["indices"].min()) >= 0 and int(out["indices"].max()) < 512
    assert len(np.unique(out["indices"])) > 1
    np.testing.assert_array_equal(out["z_q"], codebook[out["indices"]])
    # z_q is the nearest code to z_e.
    distances = ((np.asarray(out["z_e"])[..., None, :] - codebook) ** 2).sum(-1)
    np.testing.assert_allclose(distances.min(-1), ((out["z_e"] - out["z_q"]) ** 2).sum(-1), rtol=1e-4)

    # decode(encode(x)) is __call__'s recon, clipped. (The decoder in __call__ sees
    # z_e + (z_q - z_e), equal to z_q up to float rounding, hence the tolerance.)
    decoded = results["decoded"]
    assert decoded.shape == (2, 64, 64, 3)
    assert float(decoded.min()) >= -1.0 and float(decoded.max()) <= 1.0
    np.testing.assert_allclose(decoded, np.clip(out["recon"], -1, 1), atol=1e-3)

    # A time axis folds into the batch: [B, T, H, W, 3] -> [B, T, h, w] -> [B, T, H, W, 3].
    video_tokens = results["video_tokens"]
    assert video_tokens.shape == (2, 2, 8, 8) and video_tokens.dtype == jnp.int32
    np.testing.assert_array_equal(video_tokens[:, 0], out["indices"])
    np.testing.assert_array_equal(video_tokens[:, 1], out["indices"][::-1])
    video_decoded = jax.eval_shape(lambda t: model.apply(params, t, method=VQGAN.decode), video_tokens)
    assert video_decoded.shape == (2, 2, 64, 64, 3)


def test_bad_shapes_are_reported(small):
    model, params = small
    with pytest.raises(ValueError, match="resolution=64"):
        jax.eval_shape(lambda x: model.apply(params, x, method=VQGAN.encode), images((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="8x8 tokens"):
        jax.eval_shape(lambda t: model.apply(params, t, method=VQGAN.decode), jnp.zeros((1, 4, 4), jnp.int32))
    with pytest.raises(ValueError, match="resolution"):
        jax.eval_shape(lambda x: model.apply(params, x), jnp.zeros((64, 64, 3)))
    with pytest.raises(ValueError, match="embed_dim=32"):
        jax.eval_shape(lambda z: model.apply(params, z, method=VQGAN.quantize), jnp.zeros((1, 8, 8, 16)))
    with pytest.raises(ValueError, match="norm_groups"):
        jax.eval_shape(VQGAN(**{**TINY, "hidden_channels": 24}).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_straight_through_gradients():
    """Reconstruction trains the encoder through the quantiser but never the codebook."""
    model = VQGAN(**MICRO)
    variables = {"params": lwm_vqgan_to_params(random_lwm_tree(MICRO), MICRO)}
    x = images((2, 8, 8, 3), seed=2)

    def loss(params):
        out = model.apply({"params": params}, x)
        reconstruction = jnp.mean((out["recon"] - x) ** 2)
        codebook = jnp.sum((out["z_q"] - jax.lax.stop_gradient(out["z_e"])) ** 2)
        return reconstruction + codebook, out

    grads, out = jit(jax.grad(loss, has_aux=True))(variables["params"])
    assert float(jnp.abs(grads["encoder"]["stem"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["quant_conv"]["kernel"]).max()) > 0
    # The codebook gradient is exactly that of the codebook term: 2 * sum of (e_k - z_e) over
    # the positions assigned to code k, so nothing leaked in from reconstruction.
    z_e = np.asarray(out["z_e"]).reshape(-1, MICRO["embed_dim"])
    z_q = np.asarray(out["z_q"]).reshape(-1, MICRO["embed_dim"])
    expected = np.zeros((MICRO["codebook_size"], MICRO["embed_dim"]), np.float32)
    np.add.at(expected, np.asarray(out["indices"]).reshape(-1), 2.0 * (z_q - z_e))
    np.testing.assert_allclose(grads["quantizer"]["codebook"], expected, rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    model = VQGAN(**TINY, dtype=jnp.bfloat16)
    variables = meta.unbox(abstract_variables(model, (1, 16, 16, 3)))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    out = jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
    assert out["recon"].dtype == out["z_e"].dtype == out["z_q"].dtype == jnp.float32
    assert out["indices"].dtype == jnp.int32


# --- LWM parity and conversion --------------------------------------------------------------------


def test_upsample_matches_lwm_resize():
    # LWM upsamples with jax.image.resize(method="nearest"); the model uses a cheaper-to-
    # differentiate broadcast that must be bit-identical at 2x (odd sizes included).
    from jaxvla.models.vqgan import upsample_nearest_2x

    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
    want = jax.image.resize(x, (2, 10, 6, 4), method="nearest")
    np.testing.assert_array_equal(upsample_nearest_2x(x), want)


def test_parity_with_lwm_reference(tiny):
    model, tree, params = tiny
    x = np.asarray(images((2, 16, 16, 3), seed=3))

    ref_z = ref_encode_latents(tree, x)
    ref_idx, distances = ref_quantize(tree, ref_z)
    # The test is meaningful only with several codes in use and no near-ties.
    assert len(np.unique(ref_idx)) > 3
    two_best = np.sort(distances, axis=-1)[..., :2]
    assert float((two_best[..., 1] - two_best[..., 0]).min()) > 1e-4
    ref_recon = ref_decode_latents(tree, tree["quantize"]["embeddings"][ref_idx])
    assert float(np.abs(ref_recon).max()) > 0.1

    @jit
    def run(params, x, ref_idx):
        apply = lambda *args, method: model.apply(params, *args, method=method)  # noqa: E731
        z_e = apply(x, method=VQGAN.encode_latents)
        z_q = params["params"]["quantizer"]["codebook"][ref_idx]
        return dict(
            z_e=z_e,
            indices=apply(x, method=VQGAN.encode),
            quantized=apply(z_e, method=VQGAN.quantize),
            decoded=apply(ref_idx, method=VQGAN.decode),
            decoded_latents=apply(z_q, method=VQGAN.decode_latents),
            call=model.apply(params, x),
        )

    got = run(params, x, jnp.asarray(ref_idx, jnp.int32))
    np.testing.assert_allclose(got["z_e"], ref_z, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got["indices"], ref_idx)
    np.testing.assert_array_equal(got["quantized"][1], ref_idx)
    np.testing.assert_array_equal(got["quantized"][0], tree["quantize"]["embeddings"][ref_idx])
    np.testing.assert_allclose(got["decoded_latents"], ref_recon, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["decoded"], np.clip(ref_recon, -1, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got["call"]["indices"], ref_idx)
    np.testing.assert_allclose(got["call"]["z_e"], ref_z, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["call"]["recon"], ref_recon, rtol=1e-4, atol=1e-4)


def test_converted_tree_matches_model_and_round_trips(tiny):
    model, tree, params = tiny
    boxed = abstract_variables(model, (1, 16, 16, 3))
    init = meta.unbox(boxed)
    got = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params)
    want = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), init)
    assert got == want

    back = params_to_lwm_vqgan(params, TINY)
    assert flatten_dict(back).keys() == flatten_dict(tree).keys()
    for path, value in flatten_dict(tree).items():
        np.testing.assert_array_equal(flatten_dict(back)[path], value)
    again = lwm_vqgan_to_params({"params": back}, TINY)
    for path, value in flatten_dict(params["params"]).items():
        np.testing.assert_array_equal(flatten_dict(again)[path], value)
    # Boxed (nn.LogicallyPartitioned) variables, as model.init returns them, convert too.
    boxed = jax.tree_util.tree_map(lambda s: np.ones(s.shape, s.dtype), boxed)
    assert isinstance(boxed["params"]["quantizer"]["codebook"], nn.LogicallyPartitioned)
    assert count_params(params_to_lwm_vqgan(boxed, TINY)) == count_params(params["params"])


def test_converter_errors_name_path_and_shapes(tiny):
    _, tree, _ = tiny
    flat = flatten_dict(tree)

    missing = dict(flat)
    del missing["decoder/UpsamplingBlock_2/ResnetBlock_1/Conv_1/kernel"]
    with pytest.raises(ValueError, match=r"missing LWM tensor 'decoder/UpsamplingBlock_2/ResnetBlock_1/Conv_1/kernel' \(expected shape \(3, 3, 32, 32\)\)"):
        lwm_vqgan_to_params(unflatten_dict(missing), TINY)

    misshapen = dict(flat)
    misshapen["quantize/embeddings"] = np.zeros((16, 4), np.float32)
    with pytest.raises(ValueError, match=r"'quantize/embeddings': expected shape \(16, 8\), found \(16, 4\)"):
        lwm_vqgan_to_params(unflatten_dict(misshapen), TINY)

    extra = dict(flat)
    extra["encoder/Attention_0/kernel"] = np.zeros((1,), np.float32)
    with pytest.raises(ValueError, match="unexpected LWM tensor 'encoder/Attention_0/kernel'"):
        lwm_vqgan_to_params(unflatten_dict(extra), TINY)

    # The real LWM tree is not a tiny one.
    with pytest.raises(ValueError, match="expected shape"):
        lwm_vqgan_to_params(tree, "lwm")


def test_pickle_loading_and_cli(tiny, tmp_path):
    model, tree, params = tiny
    wrappers = {
        "plain.pkl": tree,
        "wrapped.pkl": {"params": tree},
        "ordered.pkl": collections.OrderedDict(params=collections.OrderedDict(tree)),
        "frozen.pkl": FrozenDict({"params": tree}),
    }
    for name, obj in wrappers.items():
        path = tmp_path / name
        path.write_bytes(pickle.dumps(obj, protocol=4))
        loaded = load_lwm_vqgan(path, TINY)
        for key, value in flatten_dict(params["params"]).items():
            np.testing.assert_array_equal(flatten_dict(loaded)[key], value, err_msg=f"{name}: {key}")

    spec = importlib.util.spec_from_file_location(
        "convert_lwm_vqgan", os.path.join(REPO, "scripts", "convert_lwm_vqgan.py")
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # The CLI only knows named variants; give it the tiny one through the module's table.
    from jaxvla.models import vqgan as vqgan_module

    vqgan_module._VARIANTS["_test_tiny"] = TINY
    try:
        for suffix in (".npz", ".msgpack"):
            out = tmp_path / f"converted{suffix}"
            rc = script.main(
                [f"--input={tmp_path / 'wrapped.pkl'}", f"--output={out}", "--variant=_test_tiny"]
            )
            assert rc == 0 and out.exists()
            loaded = load_vqgan_params(out, TINY)
            for key, value in flatten_dict(params["params"]).items():
                np.testing.assert_array_equal(flatten_dict(loaded)[key], value)
        # A wrong variant fails cleanly, without writing anything.
        bad_out = tmp_path / "bad.npz"
        assert script.main([f"--input={tmp_path / 'plain.pkl'}", f"--output={bad_out}", "--variant=small"]) == 1
        assert not bad_out.exists()
    finally:
        del vqgan_module._VARIANTS["_test_tiny"]
