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

from jaxvla.io.tensor_check import checked_tensor, raise_problems
from jaxvla.io.weights import flatten_dict, load_param_tree, unflatten_dict
from jaxvla.models.vqgan import vqgan_variant


class _Tensor(NamedTuple):
    lwm: str  # "/"-joined path in LWM's tree
    ours: str  # "/"-joined path in our params tree
    shape: tuple[int, ...]


# Fields the layout depends on; missing ones default to LWM's values (the "lwm" variant).
_LAYOUT_FIELDS = ("in_channels", "hidden_channels", "channel_mult", "num_res_blocks", "z_channels", "codebook_size", "embed_dim")


def _config(variant: str | Mapping[str, Any]) -> dict:
    """A variant name or VQGAN kwargs -> the fields the layout needs (others are ignored)."""
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
        value = checked_tensor(flat, src, tensor.shape, problems, kind=f"{source} tensor")
        if value is not None:
            out[dst] = value
    unexpected = sorted(set(flat) - expected_paths)
    for path in unexpected:
        problems.append(f"unexpected {source} tensor '{path}' (shape {np.shape(flat[path])})")
    raise_problems(problems, f"{source} VQGAN tree does not match the expected layout",
                   f"checked against the {layout}; is that the config the weights were trained with?")
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


# ----------------------------------------------------------------------------------------------
# LWM's LLaMA (EasyLM layout) -> jaxvla.models.llama.Llama params.
#
# The layout below is taken from the EasyLM / LWM Flax code (``FlaxLLaMAForCausalLMModule`` and
# LWM's ``FlaxVideoLLaMAForCausalLMModule``) as remembered; real LWM weight files were not
# available offline, so it is verified only against synthetic trees built in the tests.


def rope_interleaved_to_half(x: np.ndarray) -> np.ndarray:
    """Permutes the last (head_dim) axis from EasyLM's interleaved RoPE layout, where the pair
    ``(x[2i], x[2i+1])`` is rotated by frequency ``i`` (a complex number), to the backbone's /
    HF's rotate-half layout, where the pair is ``(x[i], x[i + Dh/2])``: new ``[r*Dh/2 + i]`` =
    old ``[2i + r]``. Applied to the output columns of ``wq`` and ``wk`` (the same permutation of
    q and k leaves every attention score unchanged, and RoPE then acts identically)."""
    dh = x.shape[-1]
    return np.swapaxes(x.reshape(*x.shape[:-1], dh // 2, 2), -1, -2).reshape(x.shape)


def rope_half_to_interleaved(x: np.ndarray) -> np.ndarray:
    """The inverse of :func:`rope_interleaved_to_half`."""
    dh = x.shape[-1]
    return np.swapaxes(x.reshape(*x.shape[:-1], 2, dh // 2), -1, -2).reshape(x.shape)


def _lwm_llama_layer_table(config) -> list[tuple[str, str, tuple, str]]:
    """(LWM path inside a block, our path inside a layer, LWM shape, kind) for one layer."""
    d, h, kv, dh, f = config.dim, config.num_heads, config.num_kv_heads, config.head_dim, config.mlp_dim
    return [
        ("attention/wq/kernel", "attention/q_proj/kernel", (d, h * dh), "qk"),
        ("attention/wk/kernel", "attention/k_proj/kernel", (d, kv * dh), "qk"),
        ("attention/wv/kernel", "attention/v_proj/kernel", (d, kv * dh), "v"),
        ("attention/wo/kernel", "attention/o_proj/kernel", (h * dh, d), "o"),
        ("feed_forward/w1/kernel", "mlp/gate_proj/kernel", (d, f), "plain"),
        ("feed_forward/w3/kernel", "mlp/up_proj/kernel", (d, f), "plain"),
        ("feed_forward/w2/kernel", "mlp/down_proj/kernel", (f, d), "plain"),
        ("attention_norm/kernel", "input_norm/scale", (d,), "plain"),
        ("ffn_norm/kernel", "post_attention_norm/scale", (d,), "plain"),
    ]


def lwm_llama_to_params(tree: Mapping[str, Any], config) -> dict:
    """LWM's (EasyLM-layout) LLaMA parameter tree -> ``jaxvla.models.llama.Llama`` params
    (float32 numpy) for ``config`` (a ``LlamaConfig``; ``scan_layers`` picks the output layout).

    ``tree`` is nested or "/"-flat, optionally wrapped in one or more ``{"params": ...}`` levels.
    Names (kernels are ``[in, out]``, as Flax ``nn.Dense`` stores them)::

        transformer/wte/embedding [V, D]                 -> embed_text/embedding
        transformer/vte/embedding [V_img, D]             -> embed_image/embedding  (vision models)
        transformer/h/{i}/attention/wq/kernel [D, H*Dh]  -> q_proj/kernel [D, H, Dh]  (RoPE-permuted)
        transformer/h/{i}/attention/wk/kernel [D, KV*Dh] -> k_proj/kernel [D, KV, Dh] (RoPE-permuted)
        transformer/h/{i}/attention/wv/kernel [D, KV*Dh] -> v_proj/kernel [D, KV, Dh]
        transformer/h/{i}/attention/wo/kernel [H*Dh, D]  -> o_proj/kernel [H, Dh, D]
        transformer/h/{i}/feed_forward/w1 (gate), w3 (up) [D, F], w2 (down) [F, D]
        transformer/h/{i}/attention_norm/kernel [D]      -> input_norm/scale
        transformer/h/{i}/ffn_norm/kernel [D]            -> post_attention_norm/scale
        transformer/ln_f/kernel [D]                      -> final_norm/scale
        lm_head/kernel [D, V]                            -> head_text/kernel
        vision_head/kernel [D, V_img]                    -> head_image/kernel   (vision models)

    A scanned LWM tree (``scan_layers=True`` in LWM's config) keeps one block under
    ``transformer/h/<name>`` (e.g. ``scan_decoder``) with the layers stacked on axis 0 (LWM's
    default ``param_scan_axis``); that form is accepted too.

    RoPE: EasyLM/LWM rotate q/k as complex numbers over interleaved pairs ``(2i, 2i+1)``
    (``apply_rotary_emb`` reshapes to ``[..., Dh/2, 2]``); the backbone uses rotate-half. Each head's
    ``wq``/``wk`` output columns are permuted with :func:`rope_interleaved_to_half` (the inverse of
    the permutation HF's ``convert_llama_weights_to_hf`` applies to Meta's checkpoints).

    ``embed_image``/``head_image`` are filled when ``config.image_vocab > 0`` and required then;
    when ``config.image_vocab == 0`` any vision tensors are ignored. Latent/action tables are not in
    LWM's files and are left out (``init_from`` initialises them fresh). With
    ``config.tie_embeddings`` the heads are not produced. Raises ValueError listing every missing,
    misshapen or (apart from ignored vision tensors) unexpected tensor.
    """
    while isinstance(tree, Mapping) and set(tree.keys()) == {"params"}:
        tree = tree["params"]
    if not isinstance(tree, Mapping):
        raise ValueError(f"LWM LLaMA tree: expected a nested dict of arrays, found {type(tree).__name__}")
    flat = {k: v for k, v in flatten_dict(tree).items()}
    d, n = config.dim, config.num_layers
    h, kv, dh = config.num_heads, config.num_kv_heads, config.head_dim
    problems: list[str] = []
    used: set[str] = set()

    def get(path: str, shape: tuple) -> np.ndarray | None:
        used.add(path)
        return checked_tensor(flat, path, shape, problems, kind="LWM tensor")

    out: dict[str, np.ndarray | None] = {
        "embed_text/embedding": get("transformer/wte/embedding", (config.text_vocab, d)),
        "final_norm/scale": get("transformer/ln_f/kernel", (d,)),
    }
    if not config.tie_embeddings:
        out["head_text/kernel"] = get("lm_head/kernel", (d, config.text_vocab))
    vision = ("transformer/vte/embedding", "vision_head/kernel")
    if config.image_vocab > 0:
        out["embed_image/embedding"] = get(vision[0], (config.image_vocab, d))
        if not config.tie_embeddings:
            out["head_image/kernel"] = get(vision[1], (d, config.image_vocab))
    else:
        used.update(vision)

    # Per-layer blocks (h/0 .. h/{n-1}) or one scanned block (h/<name>, layers on axis 0).
    children = sorted({k.split("/")[2] for k in flat if k.startswith("transformer/h/") and k.count("/") >= 3})
    scanned = [c for c in children if not c.isdigit()]
    table = _lwm_llama_layer_table(config)

    def convert(value: np.ndarray, kind: str, lead: tuple) -> np.ndarray:
        if kind in ("qk", "v"):
            value = value.reshape(*lead, d, -1, dh)
            return rope_interleaved_to_half(value) if kind == "qk" else value
        if kind == "o":
            return value.reshape(*lead, h, dh, d)
        return value

    layers: dict[str, np.ndarray | None] = {}
    if scanned and len(scanned) == 1 and not any(c.isdigit() for c in children):
        prefix = f"transformer/h/{scanned[0]}/"
        for lwm, ours, shape, kind in table:
            value = get(prefix + lwm, (n,) + shape)
            layers[ours] = None if value is None else convert(value, kind, (n,))
        per_layer = None
    else:
        per_layer = []
        for i in range(n):
            layer = {}
            for lwm, ours, shape, kind in table:
                value = get(f"transformer/h/{i}/{lwm}", shape)
                layer[ours] = None if value is None else convert(value, kind, ())
            per_layer.append(layer)
    for path in sorted(set(flat) - used):
        problems.append(f"unexpected LWM tensor '{path}' (shape {np.shape(flat[path])})")
    raise_problems(problems, "LWM LLaMA tree does not match the expected layout",
                   f"config: dim={d}, layers={n}, heads={h}, kv_heads={kv}, head_dim={dh}, mlp_dim={config.mlp_dim}, "
                   f"text_vocab={config.text_vocab}, image_vocab={config.image_vocab}")
    if per_layer is not None:
        if config.scan_layers:
            layers = {key: np.stack([layer[key] for layer in per_layer]) for key in per_layer[0]}
        else:
            for i, layer in enumerate(per_layer):
                out.update({f"layers_{i}/{k}": np.ascontiguousarray(v) for k, v in layer.items()})
    if layers:
        if config.scan_layers:
            out.update({f"layers/{k}": np.ascontiguousarray(v) for k, v in layers.items()})
        else:
            for i in range(n):
                out.update({f"layers_{i}/{k}": np.ascontiguousarray(v[i]) for k, v in layers.items()})
    return unflatten_dict(out)


def read_easylm_streaming(path: str | os.PathLike) -> dict:
    """Reads an EasyLM/LWM ``StreamingCheckpointer`` file: a msgpack stream of
    ``(key path, flax.serialization.to_bytes(array))`` pairs (no pickle). Returns a nested dict."""
    import msgpack
    from flax import serialization

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    flat = {}
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, read_size=1 << 24, max_buffer_size=0, raw=False)
        for item in unpacker:
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (list, tuple))
                    and isinstance(item[1], bytes)):
                raise ValueError(f"{path}: not an EasyLM streaming checkpoint (found {type(item).__name__} entry)")
            key, value = item
            name = "/".join(str(k) for k in key)
            try:
                flat[name] = np.asarray(serialization.msgpack_restore(value))
            except ValueError as e:  # e.g. numpy refusing an object dtype for a buffer
                raise ValueError(f"{path}: entry '{name}' is not an array: {e}") from e
            if flat[name].dtype.hasobject:
                raise ValueError(f"{path}: entry '{name}' has object dtype; object arrays are not admitted in a "
                                 "parameter tree")
    if not flat:
        raise ValueError(f"{path}: empty checkpoint")
    return unflatten_dict(flat)


def load_lwm_llama(path: str | os.PathLike, config) -> dict:
    """LWM LLaMA weights on disk -> backbone params. ``.npz``/``.pkl``/``.msgpack`` (a flax
    ``to_bytes`` of the tree) go through :func:`load_param_tree`; anything else (e.g. LWM's
    ``params`` streaming files) is read with :func:`read_easylm_streaming`."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    tree = load_param_tree(path) if suffix in (".npz", ".pkl", ".pickle", ".msgpack") else read_easylm_streaming(path)
    return lwm_llama_to_params(tree, config)
