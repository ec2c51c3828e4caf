"""Hugging Face ``LlamaForCausalLM`` checkpoints <-> ``jaxvla.models.llama.Llama`` parameters.

* :func:`read_hf_state_dict` reads a checkpoint directory (``model.safetensors``, sharded
  ``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``, or
  ``pytorch_model.bin`` / sharded ``pytorch_model-*.bin``) or one ``.safetensors`` / ``.bin`` /
  ``.pt`` file into ``{name: float32 numpy array}``. safetensors files are read with the
  ``safetensors`` numpy API (bfloat16 tensors, which numpy cannot name, are read from the file's
  header directly with ``ml_dtypes``); torch files only with ``torch.load(..., weights_only=True)``,
  the loader that refuses to run code (plain unpickling is never used).
* :func:`hf_config_to_llama` turns a ``config.json`` dict into a :class:`LlamaConfig` (text only).
* :func:`hf_to_params` / :func:`params_to_hf` convert the weights, for ``scan_layers`` True or False.

Mapping (D model dim, H heads, KV key/value heads, Dh head dim)::

    model.embed_tokens.weight [V, D]                 -> embed_text/embedding
    lm_head.weight [V, D] (.T)                       -> head_text/kernel  (tied: embed_tokens)
    model.norm.weight                                -> final_norm/scale
    model.layers.i.self_attn.q_proj.weight [H*Dh, D] -> .T.reshape(D, H, Dh)   attention/q_proj/kernel
    model.layers.i.self_attn.{k,v}_proj.weight       -> .T.reshape(D, KV, Dh)  attention/{k,v}_proj/kernel
    model.layers.i.self_attn.o_proj.weight [D, H*Dh] -> .T.reshape(H, Dh, D)   attention/o_proj/kernel
    model.layers.i.mlp.{gate,up,down}_proj.weight    -> .T                     mlp/*/kernel
    model.layers.i.{input,post_attention}_layernorm  -> {input,post_attention}_norm/scale

HF's RoPE uses the same rotate-half layout as the backbone: no permutation of q/k.

Only the text table and head exist in a HF checkpoint. The converter returns exactly those
parameters; the other modality tables/heads (``embed_image``, ``head_latent``, ...) are left out,
and the trainer's ``init_from`` surgery initialises them fresh (``hf_to_params`` therefore takes a
config whose non-text vocabularies are ignored). Validation (``jaxvla.io.tensor_check``): every
expected tensor must be present with its exact shape and a floating dtype, else one ValueError lists every problem, each naming the tensor with
the expected and found shapes. Extra tensors: rotary ``inv_freq`` buffers (and ``lm_head.weight``
of a tied model when it equals ``embed_tokens``) are ignored silently; any other extra tensor
raises ValueError too (``strict=False`` turns that into a warning), since an unknown tensor
usually means the checkpoint is not a plain LLaMA (biases, another architecture).
Everything here is numpy only; no device is touched.
"""

from __future__ import annotations

import glob
import json
import os
import re
import warnings
from typing import Any, Mapping

import numpy as np

from jaxvla.io.tensor_check import checked_tensor, is_floating, raise_problems
from jaxvla.io.weights import flatten_dict, unflatten_dict
from jaxvla.models.llama import LlamaConfig

_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|\.inv_freq$")


# ----------------------------------------------------------------------------------------------
# Reading checkpoint files


def _float32(value: Any, name: str, source: str) -> np.ndarray:
    array = np.asarray(value)
    if not is_floating(array.dtype):
        raise ValueError(f"{source}: tensor '{name}' has dtype {array.dtype}; expected floating point")
    return array.astype(np.float32)


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    special: list[str] = []
    with safe_open(path, framework="np") as f:
        for name in f.keys():
            if f.get_slice(name).get_dtype() in ("BF16", "F8_E4M3", "F8_E5M2"):
                special.append(name)  # numpy cannot name these dtypes: read below
            else:
                out[name] = _float32(f.get_tensor(name), name, path)
    if special:
        import ml_dtypes

        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        base = 8 + header_len
        data = np.memmap(path, dtype=np.uint8, mode="r")
        for name in special:
            entry = header[name]
            start, end = entry["data_offsets"]
            dtype = np.dtype(getattr(ml_dtypes, _ST_DTYPES[entry["dtype"]]))
            array = np.frombuffer(data[base + start : base + end].tobytes(), dtype=dtype).reshape(entry["shape"])
            out[name] = array.astype(np.float32)
        del data
    return out


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as error:  # pragma: no cover - torch is a test dependency here
        raise ValueError(f"{path}: reading a torch checkpoint needs the 'torch' package") from error
    try:
        # weights_only=True: tensors and containers only, never arbitrary code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: cannot read as a torch state dict with weights_only=True: {error}") from error
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), found {type(state).__name__}")
    out = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry '{name}' is a {type(value).__name__}, not a tensor")
        out[str(name)] = _float32(value.detach().to(torch.float32).numpy(), name, path)
    return out


def _read_file(path: str) -> dict[str, np.ndarray]:
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in (".bin", ".pt", ".pth"):
        return _read_torch(path)
    raise ValueError(f"{path}: unknown checkpoint suffix '{suffix}'; expected .safetensors, .bin, .pt or .pth")


def _merge(parts: list[tuple[str, dict]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for path, part in parts:
        for name, value in part.items():
            if name in out:
                raise ValueError(f"{path}: tensor '{name}' appears in more than one shard")
            out[name] = value
    return out


def _shards_from_index(directory: str, index_name: str) -> list[str]:
    index_path = os.path.join(directory, index_name)
    with open(index_path) as f:
        index = json.load(f)
    files = sorted(set(index.get("weight_map", {}).values()))
    if not files:
        raise ValueError(f"{index_path}: no 'weight_map' entries")
    missing = [name for name in files if not os.path.exists(os.path.join(directory, name))]
    if missing:
        raise FileNotFoundError(f"{index_path}: shard file(s) not found: {', '.join(missing)}")
    return [os.path.join(directory, name) for name in files]


def read_hf_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A HF checkpoint directory or file -> ``{tensor name: float32 numpy array}``.

    Directory lookup order: ``model.safetensors``; ``model.safetensors.index.json`` (its shards);
    ``model-*-of-*.safetensors``; ``pytorch_model.bin``; ``pytorch_model.bin.index.json``;
    ``pytorch_model-*-of-*.bin``. Raises FileNotFoundError naming the path when nothing is found.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isfile(path):
        return _read_file(path)
    candidates: list[str] = []
    if os.path.exists(os.path.join(path, "model.safetensors")):
        candidates = [os.path.join(path, "model.safetensors")]
    elif os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        candidates = _shards_from_index(path, "model.safetensors.index.json")
    elif glob.glob(os.path.join(path, "model-*-of-*.safetensors")):
        candidates = sorted(glob.glob(os.path.join(path, "model-*-of-*.safetensors")))
    elif os.path.exists(os.path.join(path, "pytorch_model.bin")):
        candidates = [os.path.join(path, "pytorch_model.bin")]
    elif os.path.exists(os.path.join(path, "pytorch_model.bin.index.json")):
        candidates = _shards_from_index(path, "pytorch_model.bin.index.json")
    elif glob.glob(os.path.join(path, "pytorch_model-*-of-*.bin")):
        candidates = sorted(glob.glob(os.path.join(path, "pytorch_model-*-of-*.bin")))
    if not candidates:
        raise FileNotFoundError(
            f"{path}: no checkpoint found (looked for model.safetensors, model.safetensors.index.json, "
            "model-*-of-*.safetensors, pytorch_model.bin, pytorch_model.bin.index.json, pytorch_model-*-of-*.bin)")
    return _merge([(c, _read_file(c)) for c in candidates])


def read_hf_config(path: str | os.PathLike) -> dict:
    """``config.json`` (a file, or a checkpoint directory holding one) -> dict."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"HF config not found: {path}")
    with open(path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


# ----------------------------------------------------------------------------------------------
# Config


def hf_config_to_llama(hf_config: Mapping[str, Any], **overrides) -> LlamaConfig:
    """A HF LLaMA ``config.json`` dict -> a text-only :class:`LlamaConfig` (other vocabs 0);
    ``overrides`` set any field (e.g. ``scan_layers=False``, ``image_vocab=8448``, ``dtype``)."""
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in required if k not in hf_config]
    if missing:
        raise ValueError(f"HF config lacks {missing}")
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        raise ValueError("HF config has attention_bias/mlp_bias; the backbone has no biases")
    rope_scaling = hf_config.get("rope_scaling")
    rope_theta = hf_config.get("rope_theta")
    if isinstance(hf_config.get("rope_parameters"), Mapping):  # transformers 5 spelling
        rope_scaling = rope_scaling or hf_config["rope_parameters"]
        rope_theta = rope_theta or hf_config["rope_parameters"].get("rope_theta")
    if isinstance(rope_scaling, Mapping) and rope_scaling.get("rope_type", rope_scaling.get("type", "default")) != "default":
        raise ValueError(f"HF config uses RoPE scaling {dict(rope_scaling)}; only plain RoPE is supported")
    fields = dict(
        text_vocab=int(hf_config["vocab_size"]), image_vocab=0, latent_vocab=0, action_vocab=0,
        dim=int(hf_config["hidden_size"]), num_layers=int(hf_config["num_hidden_layers"]),
        num_heads=int(hf_config["num_attention_heads"]),
        num_kv_heads=int(hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"]),
        head_dim=int(hf_config.get("head_dim") or 0), mlp_dim=int(hf_config["intermediate_size"]),
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        max_len=int(hf_config.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


# ----------------------------------------------------------------------------------------------
# Weights


def _layer_table(config: LlamaConfig, i: int) -> list[tuple[str, str, tuple, tuple]]:
    """(hf name, our path inside the layer, hf shape, our shape) for layer ``i``."""
    d, h, kv, dh, f = config.dim, config.num_heads, config.num_kv_heads, config.head_dim, config.mlp_dim
    p = f"model.layers.{i}."
    return [
        (p + "self_attn.q_proj.weight", "attention/q_proj/kernel", (h * dh, d), (d, h, dh)),
        (p + "self_attn.k_proj.weight", "attention/k_proj/kernel", (kv * dh, d), (d, kv, dh)),
        (p + "self_attn.v_proj.weight", "attention/v_proj/kernel", (kv * dh, d), (d, kv, dh)),
        (p + "self_attn.o_proj.weight", "attention/o_proj/kernel", (d, h * dh), (h, dh, d)),
        (p + "mlp.gate_proj.weight", "mlp/gate_proj/kernel", (f, d), (d, f)),
        (p + "mlp.up_proj.weight", "mlp/up_proj/kernel", (f, d), (d, f)),
        (p + "mlp.down_proj.weight", "mlp/down_proj/kernel", (d, f), (f, d)),
        (p + "input_layernorm.weight", "input_norm/scale", (d,), (d,)),
        (p + "post_attention_layernorm.weight", "post_attention_norm/scale", (d,), (d,)),
    ]


def _raise(problems: list[str], what: str, config: LlamaConfig) -> None:
    raise_problems(
        problems, f"{what} does not match the expected LLaMA layout",
        f"config: dim={config.dim}, layers={config.num_layers}, heads={config.num_heads}, "
        f"kv_heads={config.num_kv_heads}, head_dim={config.head_dim}, mlp_dim={config.mlp_dim}, "
        f"vocab={config.text_vocab}, tie_embeddings={config.tie_embeddings}")


def hf_to_params(state_dict: Mapping[str, Any], config: LlamaConfig, *, strict: bool = True) -> dict:
    """HF LLaMA state dict -> the backbone's text-only ``params`` (nested dict, float32 numpy).

    Layout follows ``config.scan_layers``. ``head_text`` is omitted when ``config.tie_embeddings``;
    otherwise ``lm_head.weight`` is used, or ``embed_tokens`` when ``lm_head`` is absent (a tied HF
    checkpoint loaded into an untied model). Raises ValueError listing every missing or misshapen
    tensor (name, expected and found shape) and, with ``strict``, every unexpected one (else warns).
    """
    sd = {str(k): v for k, v in state_dict.items()}
    d, v = config.dim, config.text_vocab
    problems: list[str] = []
    used: set[str] = set()

    def get(name: str, shape: tuple) -> np.ndarray | None:
        used.add(name)
        return checked_tensor(sd, name, shape, problems)

    params: dict[str, Any] = {}
    embed = get("model.embed_tokens.weight", (v, d))
    params["embed_text/embedding"] = embed
    params["final_norm/scale"] = get("model.norm.weight", (d,))
    if not config.tie_embeddings:
        if "lm_head.weight" in sd or embed is None:
            head = get("lm_head.weight", (v, d))
        else:
            head = embed
        params["head_text/kernel"] = None if head is None else head.T
    elif "lm_head.weight" in sd:
        used.add("lm_head.weight")
        if embed is not None and not np.array_equal(np.asarray(sd["lm_head.weight"], np.float32), embed):
            problems.append("tensor 'lm_head.weight' differs from 'model.embed_tokens.weight' but the config "
                            "ties embeddings (use tie_embeddings=False)")
    layers = []
    for i in range(config.num_layers):
        layer = {}
        for hf_name, ours, hf_shape, our_shape in _layer_table(config, i):
            value = get(hf_name, hf_shape)
            layer[ours] = None if value is None else np.ascontiguousarray(value.T.reshape(our_shape) if value.ndim == 2 else value)
        layers.append(layer)
    extra = sorted(k for k in sd if k not in used and not _IGNORED.search(k))
    extra_lines = [f"unexpected tensor '{k}' (shape {np.shape(sd[k])})" for k in extra]
    if strict:
        problems += extra_lines
    _raise(problems, "HF state dict", config)
    if extra_lines:
        warnings.warn("hf_to_params ignored " + "; ".join(extra_lines))
    if config.scan_layers:
        for key in layers[0]:
            params[f"layers/{key}"] = np.stack([layer[key] for layer in layers])
    else:
        for i, layer in enumerate(layers):
            for key, value in layer.items():
                params[f"layers_{i}/{key}"] = value
    return unflatten_dict(params)


def params_to_hf(params: Mapping[str, Any], config: LlamaConfig) -> dict[str, np.ndarray]:
    """The backbone's params (scanned or not, per ``config.scan_layers``) -> a HF LLaMA state
    dict (float32 numpy). Only text parameters are exported; other modalities are ignored.
    ``lm_head.weight`` is written for untied configs only (as HF omits it when tied)."""
    from flax.linen import meta

    flat = flatten_dict(meta.unbox(params))
    if set(flat) and all(k.startswith("params/") for k in flat):
        flat = {k[len("params/"):]: val for k, val in flat.items()}
    problems: list[str] = []

    def get(path: str, shape: tuple) -> np.ndarray | None:
        return checked_tensor(flat, path, shape, problems, kind="parameter")

    d, v, n = config.dim, config.text_vocab, config.num_layers
    sd: dict[str, np.ndarray | None] = {
        "model.embed_tokens.weight": get("embed_text/embedding", (v, d)),
        "model.norm.weight": get("final_norm/scale", (d,)),
    }
    if not config.tie_embeddings:
        head = get("head_text/kernel", (d, v))
        sd["lm_head.weight"] = None if head is None else np.ascontiguousarray(head.T)
    for i in range(n):
        for hf_name, ours, hf_shape, our_shape in _layer_table(config, i):
            if config.scan_layers:
                stacked = get(f"layers/{ours}", (n,) + our_shape)
                value = None if stacked is None else stacked[i]
            else:
                value = get(f"layers_{i}/{ours}", our_shape)
            if value is not None and len(our_shape) > 1:
                value = np.ascontiguousarray(value.reshape(-1, our_shape[-1]).T if ours.endswith("o_proj/kernel")
                                             else value.reshape(our_shape[0], -1).T)
            sd[hf_name] = value
    _raise(sorted(set(problems)), "jaxvla params", config)
    return sd  # type: ignore[return-value]


def load_hf_llama(path: str | os.PathLike, config: LlamaConfig | None = None, *, strict: bool = True,
                  **overrides) -> tuple[dict, LlamaConfig]:
    """Reads a HF checkpoint (directory with ``config.json``, or a file plus ``config``) ->
    ``(params, config)``. ``overrides`` apply to the config read from ``config.json``."""
    if config is None:
        config = hf_config_to_llama(read_hf_config(path if os.path.isdir(path) else os.path.dirname(os.fspath(path)) or "."),
                                    **overrides)
    return hf_to_params(read_hf_state_dict(path), config, strict=strict), config
