"""LWM's published VQGAN parameters <-> ``jaxvla.models.vqgan.VQGAN`` parameters.

LWM's Flax VQGAN names its submodules automatically (``encoder/DownsamplingBlock_0/
ResnetBlock_1/Conv_0``); ours are descriptive (``encoder/down_0/res_1/conv_0``). The math and
every tensor layout are identical, so conversion is a pure renaming. Two naming quirks matter:

* the decoder creates its upsampling blocks lowest resolution first, so LWM's
  ``UpsamplingBlock_0`` is our ``up_{L-1}`` and ``UpsamplingBlock_{L-1}`` is our ``up_0``;
* a ResnetBlock whose width changes has a 1x1 skip projection, LWM ``Conv_2`` / our ``shortcut``.

The renaming table is derived from the variant's config (widths per level), so every tensor's
expected shape is known; conversion fails loudly on a missing, misshapen or unexpected tensor.
Everything here is numpy only; no device is touched.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

import numpy as np

from jaxvla.io.weights import flatten_dict, load_param_tree, unflatten_dict


class _Tensor(NamedTuple):
    lwm: str  # "/"-joined path in LWM's tree
    ours: str  # "/"-joined path in our params tree
    shape: tuple[int, ...]


# Fields the layout depends on; missing ones default to LWM's values (the "lwm" variant).
_LAYOUT_FIELDS = ("in_channels", "hidden_channels", "channel_mult", "num_res_blocks", "z_channels", "codebook_size", "embed_dim")


def _config(variant: str | Mapping[str, Any]) -> dict:
    """A variant name or VQGAN kwargs -> the fields the layout needs (others are ignored)."""
    from jaxvla.models.vqgan import vqgan_variant

    if isinstance(variant, str):
        variant = vqgan_variant(variant)
    defaults = vqgan_variant("lwm")
    config = {key: variant.get(key, defaults[key]) for key in _LAYOUT_FIELDS}
    config["channel_mult"] = tuple(int(m) for m in config["channel_mult"])
    return config


def lwm_vqgan_layout(variant: str | Mapping[str, Any] = "lwm") -> list[_Tensor]:
    """Every tensor of the VQGAN as ``(lwm_path, our_path, shape)``, in network order."""
    cfg = _config(variant)
    hidden, mults, num_res = cfg["hidden_channels"], cfg["channel_mult"], cfg["num_res_blocks"]
    z_channels, embed_dim = cfg["z_channels"], cfg["embed_dim"]
    num_levels = len(mults)
    table: list[_Tensor] = []

    def conv(lwm: str, ours: str, kernel: int, c_in: int, c_out: int) -> None:
        table.append(_Tensor(f"{lwm}/kernel", f"{ours}/kernel", (kernel, kernel, c_in, c_out)))
        table.append(_Tensor(f"{lwm}/bias", f"{ours}/bias", (c_out,)))

    def norm(lwm: str, ours: str, channels: int) -> None:
        table.append(_Tensor(f"{lwm}/scale", f"{ours}/scale", (channels,)))
        table.append(_Tensor(f"{lwm}/bias", f"{ours}/bias", (channels,)))

    def resnet(lwm: str, ours: str, c_in: int, c_out: int) -> None:
        norm(f"{lwm}/GroupNorm_0", f"{ours}/norm_0", c_in)
        conv(f"{lwm}/Conv_0", f"{ours}/conv_0", 3, c_in, c_out)
        norm(f"{lwm}/GroupNorm_1", f"{ours}/norm_1", c_out)
        conv(f"{lwm}/Conv_1", f"{ours}/conv_1", 3, c_out, c_out)
        if c_in != c_out:
            conv(f"{lwm}/Conv_2", f"{ours}/shortcut", 1, c_in, c_out)

    def mid(lwm: str, ours: str, channels: int) -> None:
        for index in range(2):
            resnet(f"{lwm}/ResnetBlock_{index}", f"{ours}/res_{index}", channels, channels)

    # Encoder.
    conv("encoder/Conv_0", "encoder/stem", 3, cfg["in_channels"], hidden)
    width = hidden
    for level, mult in enumerate(mults):
        lwm_level, our_level = f"encoder/DownsamplingBlock_{level}", f"encoder/down_{level}"
        for index in range(num_res):
            resnet(f"{lwm_level}/ResnetBlock_{index}", f"{our_level}/res_{index}", width, hidden * mult)
            width = hidden * mult
        if level != num_levels - 1:
            conv(f"{lwm_level}/Downsample_0/Conv_0", f"{our_level}/downsample/conv", 3, width, width)
    mid("encoder/MidBlock_0", "encoder/mid", width)
    norm("encoder/GroupNorm_0", "encoder/norm_out", width)
    conv("encoder/Conv_1", "encoder/conv_out", 3, width, z_channels)

    # Quantiser.
    conv("quant_conv", "quant_conv", 1, z_channels, embed_dim)
    table.append(_Tensor("quantize/embeddings", "quantizer/codebook", (cfg["codebook_size"], embed_dim)))
    conv("post_quant_conv", "post_quant_conv", 1, embed_dim, z_channels)

    # Decoder: LWM's UpsamplingBlock_{n} is the n-th created, i.e. resolution level L-1-n.
    width = hidden * mults[-1]
    conv("decoder/Conv_0", "decoder/stem", 3, z_channels, width)
    mid("decoder/MidBlock_0", "decoder/mid", width)
    for created, level in enumerate(reversed(range(num_levels))):
        lwm_level, our_level = f"decoder/UpsamplingBlock_{created}", f"decoder/up_{level}"
        for index in range(num_res + 1):
            resnet(f"{lwm_level}/ResnetBlock_{index}", f"{our_level}/res_{index}", width, hidden * mults[level])
            width = hidden * mults[level]
        if level != 0:
            conv(f"{lwm_level}/Upsample_0/Conv_0", f"{our_level}/upsample/conv", 3, width, width)
    norm("decoder/GroupNorm_0", "decoder/norm_out", width)
    conv("decoder/Conv_1", "decoder/conv_out", 3, width, cfg["in_channels"])
    return table


def _strip_params_wrapper(tree: Mapping[str, Any]) -> Mapping[str, Any]:
    """``{"params": tree}`` -> ``tree``; anything else is returned as is."""
    if isinstance(tree, Mapping) and set(tree.keys()) == {"params"} and isinstance(tree["params"], Mapping):
        return tree["params"]
    return tree


def _unbox(tree: Any) -> Any:
    """Strips flax ``nn.LogicallyPartitioned`` boxes (what ``model.init`` returns), if any."""
    from flax.linen import meta

    return meta.unbox(tree)


def _describe(variant: str | Mapping[str, Any]) -> str:
    cfg = _config(variant)
    name = f"variant {variant!r}" if isinstance(variant, str) else "the given variant kwargs"
    return f"layout of {name}: " + ", ".join(f"{k}={v}" for k, v in cfg.items())


def _rename(
    tree: Mapping[str, Any], table: list[_Tensor], source: str, *, to_ours: bool, layout: str
) -> dict:
    """Renames ``tree``'s tensors per ``table``, validating presence, shape and no leftovers."""
    if not isinstance(tree, Mapping):
        raise ValueError(f"{source}: expected a nested dict of arrays, found {type(tree).__name__}")
    flat = flatten_dict(_strip_params_wrapper(tree))
    problems: list[str] = []
    out: dict[str, np.ndarray] = {}
    expected_paths = set()
    for tensor in table:
        src, dst = (tensor.lwm, tensor.ours) if to_ours else (tensor.ours, tensor.lwm)
        expected_paths.add(src)
        if src not in flat:
            problems.append(f"missing {source} tensor '{src}' (expected shape {tensor.shape})")
            continue
        value = np.asarray(flat[src])
        if value.shape != tensor.shape:
            problems.append(
                f"{source} tensor '{src}': expected shape {tensor.shape}, found {value.shape}"
            )
            continue
        if not (np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16"):
            problems.append(f"{source} tensor '{src}': expected floating point, found {value.dtype}")
            continue
        out[dst] = value.astype(np.float32)
    unexpected = sorted(set(flat) - expected_paths)
    for path in unexpected:
        problems.append(f"unexpected {source} tensor '{path}' (shape {np.shape(flat[path])})")
    if problems:
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise ValueError(
            f"{source} VQGAN tree does not match the expected layout "
            f"({len(problems)} problem(s)):\n  " + "\n  ".join(shown) + more
            + f"\n(checked against the {layout}; is that the config the weights were trained with?)"
        )
    return unflatten_dict(out)


def lwm_vqgan_to_params(
    lwm_tree: Mapping[str, Any], variant_kwargs: str | Mapping[str, Any] = "lwm"
) -> dict:
    """LWM's VQGAN tree (optionally ``{"params": ...}``-wrapped) -> our ``params`` (float32 numpy).

    ``variant_kwargs`` is the ``VQGAN`` kwargs (or a variant name) the tree was trained with.
    The result is the ``"params"`` collection: use ``{"params": result}`` with ``model.apply``.
    Raises ValueError naming every missing, misshapen or unexpected LWM tensor.
    """
    table = lwm_vqgan_layout(variant_kwargs)
    return _rename(lwm_tree, table, "LWM", to_ours=True, layout=_describe(variant_kwargs))


def params_to_lwm_vqgan(
    params: Mapping[str, Any], variant_kwargs: str | Mapping[str, Any] = "lwm"
) -> dict:
    """Our ``params`` (plain, boxed, or ``{"params": ...}``) -> LWM's tree (float32 numpy, unwrapped)."""
    table = lwm_vqgan_layout(variant_kwargs)
    return _rename(_unbox(params), table, "jaxvla", to_ours=False, layout=_describe(variant_kwargs))


def validate_vqgan_params(
    params: Mapping[str, Any], variant_kwargs: str | Mapping[str, Any] = "lwm"
) -> dict:
    """Checks our-layout ``params`` against the variant; returns them as float32 numpy, unwrapped."""
    table = [_Tensor(t.ours, t.ours, t.shape) for t in lwm_vqgan_layout(variant_kwargs)]
    return _rename(_unbox(params), table, "jaxvla", to_ours=True, layout=_describe(variant_kwargs))


def load_lwm_vqgan(path: str | os.PathLike, variant: str | Mapping[str, Any] = "lwm") -> dict:
    """Loads LWM's published VQGAN file (.pkl via the restricted unpickler, .npz, .msgpack).

    Returns our ``params`` collection (nested dict of float32 numpy arrays).
    """
    return lwm_vqgan_to_params(load_param_tree(path), variant)


def load_vqgan_params(path: str | os.PathLike, variant: str | Mapping[str, Any] = "lwm") -> dict:
    """Loads VQGAN weights in either layout: LWM's original, or ours (``convert_lwm_vqgan.py``).

    The layout is told apart by LWM's ``quantize`` vs our ``quantizer`` top-level key.
    """
    tree = _strip_params_wrapper(load_param_tree(path))
    if "quantize" in tree:
        return lwm_vqgan_to_params(tree, variant)
    return validate_vqgan_params(tree, variant)


def count_params(tree: Mapping[str, Any]) -> int:
    """Total number of scalars in a nested dict of arrays."""
    return int(sum(np.size(v) for v in flatten_dict(_strip_params_wrapper(tree)).values()))
