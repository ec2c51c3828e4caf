"""The LLaMA backbone as LWM / LAPA use it, with one embedding table and output head per modality.

Architecture: RMSNorm (pre-norm), rotary position embeddings (RoPE, HF "rotate half" layout, so
Hugging Face ``LlamaForCausalLM`` weights load without permuting q/k), SwiGLU MLP, optional
grouped-query attention (``num_kv_heads < num_heads``), no biases.

Inputs, all ``[B, L]`` int32:

* ``tokens``            token ids, each in its modality's vocabulary;
* ``modality``          0 text, 1 image, 2 latent, 3 action (``MODALITIES``);
* ``positions``         RoPE positions, also the causal order;
* ``segment_ids``       0 = padding (never attended); tokens attend only within their segment;
* ``bidirectional_ids`` 0 = ordinary causal token; tokens sharing a positive id see each other.

Token ``i`` attends token ``j`` iff ``seg[i] == seg[j] != 0`` and
(``pos[j] <= pos[i]`` or ``bid[i] == bid[j] > 0``). Prefix-LM: give the prefix id 1. An action
chunk with its own id attends to itself bidirectionally and to all of the earlier prefix.

Output: ``{"hidden": [B, L, D] (final-normed), "logits": {name: [B, L, V_name] float32}}`` and,
when a cache is passed, ``"cache"`` (the updated cache, see :func:`init_cache`).

Parameter layout (``params[...]``, float32; ``scan_layers=True`` stacks layers on axis 0, with
``scan_layers=False`` the layers are ``layers_0 .. layers_{n-1}`` without the leading axis)::

    embed_{m}/embedding                      [V_m, D]              ("vocab", "embed")
    layers/attention/q_proj/kernel           [n, D, H, Dh]         ("layers", "embed", "heads", "kv")
    layers/attention/{k,v}_proj/kernel       [n, D, KV, Dh]        ("layers", "embed", "kv_heads", "kv")
    layers/attention/o_proj/kernel           [n, H, Dh, D]         ("layers", "heads", "kv", "embed")
    layers/mlp/{gate,up}_proj/kernel         [n, D, F]             ("layers", "embed", "mlp")
    layers/mlp/down_proj/kernel              [n, F, D]             ("layers", "mlp", "embed")
    layers/{input,post_attention}_norm/scale [n, D]                ("layers", "norm")
    final_norm/scale                         [D]                   ("norm",)
    head_{m}/kernel                          [D, V_m]              ("embed", "vocab")  (absent if tied)

for each modality ``m`` whose vocab size is > 0. HF ``q_proj.weight [H*Dh, D]`` maps to
``q_proj/kernel`` as ``weight.T.reshape(D, H, Dh)``; ``o_proj.weight [D, H*Dh]`` as
``weight.T.reshape(H, Dh, D)``; ``*_layernorm.weight`` to ``*_norm/scale``; ``lm_head.weight.T`` to
``head_text/kernel``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvla.models.transformer import constrain, remat_policy, scan_unroll

MODALITIES = ("text", "image", "latent", "action")
ATTENTION_KERNELS = ("", "einsum", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    text_vocab: int = 32000
    image_vocab: int = 0
    latent_vocab: int = 0
    action_vocab: int = 0
    dim: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 0  # 0: = num_heads (plain multi-head attention)
    head_dim: int = 0  # 0: dim // num_heads
    mlp_dim: int = 11008
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_len: int = 4096  # default cache length (init_cache); RoPE itself has no limit
    dtype: str = "float32"  # compute dtype; params are always float32
    remat: str = "none"  # none | full | dots_saveable | nothing_saveable
    # Attention kernel: "einsum" (two einsums around a float32 softmax: fastest on CPU, 2x
    # jax.nn.dot_product_attention's portable path there), "xla" / "cudnn" (jax.nn.dot_product_attention;
    # cudnn: the fused GPU kernel, bf16/fp16, never materialises the [B, H, L, L] scores), or ""
    # (einsum on CPU, JAX's choice elsewhere).
    attention: str = ""
    scan_layers: bool = True
    # With scan_layers: layers per scan iteration (jaxvla.models.transformer.scan_unroll), 1 a loop
    # over one compiled layer, 0 fully unrolled (no loop); the stacked parameter layout is the same.
    scan_unroll: int = 1
    tie_embeddings: bool = False  # head_m = embed_m transposed

    def __post_init__(self):
        if not self.num_kv_heads:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.dim // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        remat_policy(self.remat)  # validates the name
        scan_unroll(self.scan_unroll, self.num_layers)  # validates the value
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention={self.attention!r}; expected one of {ATTENTION_KERNELS}")

    def vocab(self, modality: str) -> int:
        return getattr(self, f"{modality}_vocab")

    @property
    def present(self) -> tuple[str, ...]:
        """Modalities with a vocabulary (an embedding table and a head)."""
        return tuple(m for m in MODALITIES if self.vocab(m) > 0)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


_SIZES: dict[str, dict[str, Any]] = {
    # Unit tests: ~0.1M parameters, GQA with 2 kv heads for 4 query heads.
    "tiny": dict(text_vocab=128, image_vocab=64, latent_vocab=9, action_vocab=32, dim=64, num_layers=2,
                 num_heads=4, num_kv_heads=2, mlp_dim=128, max_len=128),
    # CPU smoke runs (minutes): LLaMA tokenizer's 32000 text ids, the small VQGAN's 512 codes + 2
    # (end-of-frame, end-of-vision), 8 latent actions + 1 special id, 256 action bins. ~20M params
    # (3.2M in the body).
    "small": dict(text_vocab=32000, image_vocab=512 + 2, latent_vocab=8 + 1, action_vocab=256, dim=256,
                  num_layers=4, num_heads=8, num_kv_heads=8, mlp_dim=704, max_len=1024),
    # LWM-7B = LLaMA-2-7B shape with RoPE theta 5e7: 6.48e9 body + 2 x 32000 x 4096 text embed/head.
    # Image: LWM VQGAN's 8192 codes + 256 extra ids; latent: LAPA's 8 codes + 1 special id.
    "lwm7b": dict(text_vocab=32000, image_vocab=8192 + 256, latent_vocab=8 + 1, action_vocab=256, dim=4096,
                  num_layers=32, num_heads=32, num_kv_heads=32, mlp_dim=11008, rope_theta=5e7,
                  max_len=8192, dtype="bfloat16", remat="dots_saveable"),
}


def llama_config(name: str, **overrides) -> LlamaConfig:
    """A named size (``tiny``, ``small``, ``lwm7b``) with any field overridden."""
    if name not in _SIZES:
        raise ValueError(f"unknown LLaMA size {name!r}; expected one of {sorted(_SIZES)}")
    return LlamaConfig(**{**_SIZES[name], **overrides})


# ----------------------------------------------------------------------------------------------
# Pieces


class RMSNorm(nn.Module):
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * scale).astype(self.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """``[B, L]`` positions -> (cos, sin) ``[B, L, 1, head_dim]`` float32 (HF rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    cos, sin = rope
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def attention_mask(q_seg, q_bid, q_pos, k_seg, k_bid, k_pos, offset=0) -> jax.Array:
    """Boolean ``[B, 1, Lq, Lk]``: the attention rule of the module docstring. Query ``i`` sits in
    key slot ``offset + i``; a padding query attends only its own slot, so no row is empty (its
    output is junk that nothing reads, and no fully masked row reaches the attention kernel)."""
    same_segment = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    causal = k_pos[:, None, :] <= q_pos[:, :, None]
    block = (q_bid[:, :, None] == k_bid[:, None, :]) & (q_bid[:, :, None] > 0)
    own_slot = (offset + jnp.arange(q_seg.shape[1]))[:, None] == jnp.arange(k_seg.shape[1])[None, :]
    padding_self = (q_seg == 0)[:, :, None] & own_slot[None]
    return (same_segment & (causal | block) | padding_self)[:, None]


def attend(q, k, v, mask, kernel: str = "") -> jax.Array:
    """Softmax attention, grouped-query natively. ``q [B, Lq, H, Dh]``, ``k``/``v`` ``[B, Lk, KV, Dh]``
    (``H`` a multiple of ``KV``), ``mask`` bool ``[B, 1, Lq, Lk]`` (every row has a True) ->
    ``[B, Lq, H, Dh]`` in ``q``'s dtype. ``kernel``: see ``LlamaConfig.attention``."""
    if kernel == "" and jax.default_backend() == "cpu":
        kernel = "einsum"
    if kernel != "einsum":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=kernel or None)
    b, lq, h, dh = q.shape
    kv = k.shape[2]
    q = q.reshape(b, lq, kv, h // kv, dh)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(dh))
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, lq, h, dh)


class Projection(nn.Module):
    """``[B, L, D] -> [B, L, heads, head_dim]`` or (``out``) ``[B, L, H, Dh] -> [B, L, D]``; no bias."""

    shape: tuple[int, ...]  # kernel shape
    axes: tuple[str, ...]
    dtype: Any
    out: bool = False

    @nn.compact
    def __call__(self, x):
        in_axis, out_axis = ((0, 1), 2) if self.out else (0, (1, 2))
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), self.shape)
        equation = "blhk,hkd->bld" if self.out else "bld,dhk->blhk"
        return jnp.einsum(equation, x.astype(self.dtype), kernel.astype(self.dtype))


def _dense(features: int, axes: tuple[str, str], name: str, dtype) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes))


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, rope, mask, layer_cache, index):
        c, dtype = self.config, self.config.compute_dtype
        d, h, kv, dh = c.dim, c.num_heads, c.num_kv_heads, c.head_dim
        q = apply_rope(Projection((d, h, dh), ("embed", "heads", "kv"), dtype, name="q_proj")(x), rope)
        k = apply_rope(Projection((d, kv, dh), ("embed", "kv_heads", "kv"), dtype, name="k_proj")(x), rope)
        v = Projection((d, kv, dh), ("embed", "kv_heads", "kv"), dtype, name="v_proj")(x)
        new_cache = None
        if layer_cache is not None:
            cache_k, cache_v = layer_cache
            start = (0, index, 0, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
            new_cache = (cache_k, cache_v)
            k, v = cache_k.astype(dtype), cache_v.astype(dtype)
        # GQA natively: [B, Lk, KV, Dh] keys/values with H query heads.
        out = attend(q, k, v, mask, c.attention)  # [B, L, H, Dh]
        out = Projection((h, dh, d), ("heads", "kv", "embed"), dtype, out=True, name="o_proj")(out)
        return out, new_cache


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c, dtype = self.config, self.config.compute_dtype
        gate = _dense(c.mlp_dim, ("embed", "mlp"), "gate_proj", dtype)(x)
        up = _dense(c.mlp_dim, ("embed", "mlp"), "up_proj", dtype)(x)
        return _dense(c.dim, ("mlp", "embed"), "down_proj", dtype)(nn.silu(gate) * up)


class Block(nn.Module):
    """One decoder layer. Scan-compatible: ``(x, layer_cache, mask, rope, index) -> (x, layer_cache)``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, layer_cache, mask, rope, index):
        c = self.config
        x = constrain(x)
        h = RMSNorm(c.norm_eps, c.compute_dtype, name="input_norm")(x)
        attn, new_cache = Attention(c, name="attention")(h, rope, mask, layer_cache, index)
        x = x + attn
        h = RMSNorm(c.norm_eps, c.compute_dtype, name="post_attention_norm")(x)
        x = x + MLP(c, name="mlp")(h)
        return constrain(x), new_cache


# ----------------------------------------------------------------------------------------------
# The model


class Llama(nn.Module):
    config: LlamaConfig

    def _layers(self, x, cache, mask, rope, index):
        """Runs every layer; returns x and the new stacked (k, v) (or None without a cache)."""
        c = self.config
        use_remat, policy = remat_policy(c.remat)
        layer_cache = None if cache is None else (cache["k"], cache["v"])
        if c.scan_layers:
            block = nn.remat(Block, policy=policy, prevent_cse=False) if use_remat else Block
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_layers,
                unroll=scan_unroll(c.scan_unroll, c.num_layers),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            return scanned(c, name="layers")(x, layer_cache, mask, rope, index)
        block = nn.remat(Block, policy=policy) if use_remat else Block
        new_k, new_v = [], []
        for i in range(c.num_layers):
            lc = None if layer_cache is None else (layer_cache[0][i], layer_cache[1][i])
            x, lc = block(c, name=f"layers_{i}")(x, lc, mask, rope, index)
            if lc is not None:
                new_k.append(lc[0])
                new_v.append(lc[1])
        return x, ((jnp.stack(new_k), jnp.stack(new_v)) if new_k else None)

    @nn.compact
    def __call__(self, tokens, modality, positions, segment_ids, bidirectional_ids, *,
                 input_embeddings=None, embedding_mask=None, cache=None, heads=None):
        c, dtype = self.config, self.config.compute_dtype
        heads = c.present if heads is None else tuple(heads)
        unknown = [m for m in heads if m not in c.present]
        if unknown:
            raise ValueError(f"heads {unknown} are not present in this config (present: {c.present})")

        # Per-modality embeddings, selected by modality id.
        embeds = {}
        x = jnp.zeros(tokens.shape + (c.dim,), dtype)
        for m in c.present:
            embeds[m] = nn.Embed(
                c.vocab(m), c.dim, dtype=dtype, param_dtype=jnp.float32, name=f"embed_{m}",
                embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
            table_tokens = jnp.clip(tokens, 0, c.vocab(m) - 1)
            x = jnp.where((modality == MODALITIES.index(m))[..., None], embeds[m](table_tokens), x)
        if input_embeddings is not None:
            if embedding_mask is None:
                raise ValueError("input_embeddings needs embedding_mask")
            x = jnp.where(embedding_mask[..., None], input_embeddings.astype(dtype), x)
        x = constrain(x)

        # Mask over keys: the new tokens alone, or the whole cache with the new tokens written in.
        index = None
        k_seg, k_bid, k_pos = segment_ids, bidirectional_ids, positions
        if cache is not None:
            index = cache["index"]
            write = lambda buf, new: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, index))
            k_seg = write(cache["segment_ids"], segment_ids)
            k_bid = write(cache["bidirectional_ids"], bidirectional_ids)
            k_pos = write(cache["positions"], positions)
        mask = attention_mask(segment_ids, bidirectional_ids, positions, k_seg, k_bid, k_pos,
                              0 if index is None else index)
        rope = rope_tables(positions, c.head_dim, c.rope_theta)

        x, new_kv = self._layers(x, cache, mask, rope, index)
        hidden = constrain(RMSNorm(c.norm_eps, dtype, name="final_norm")(x))

        logits = {}
        for m in heads:
            if c.tie_embeddings:
                out = embeds[m].attend(hidden)
            else:
                out = _dense(c.vocab(m), ("embed", "vocab"), f"head_{m}", dtype)(hidden)
            logits[m] = out.astype(jnp.float32)
        # Heads that are not requested still get parameters (init with heads=None creates all).
        result = {"hidden": hidden, "logits": logits}
        if cache is not None:
            result["cache"] = {
                "k": new_kv[0], "v": new_kv[1], "index": index + tokens.shape[1],
                "segment_ids": k_seg, "bidirectional_ids": k_bid, "positions": k_pos,
            }
        return result


# ----------------------------------------------------------------------------------------------
# Cache and helpers


def init_cache(config: LlamaConfig, batch: int, max_len: int | None = None, dtype=jnp.float32) -> dict:
    """An empty KV cache: ``k``/``v`` ``[layers, B, max_len, kv_heads, head_dim]`` (``dtype``),
    ``index`` int32 scalar (filled positions; the next call writes at ``[index, index + L)``) and
    the keys' ``segment_ids`` / ``bidirectional_ids`` / ``positions`` ``[B, max_len]`` int32
    (unfilled slots have segment 0, so they are never attended). Same layout for both
    ``scan_layers`` settings. The caller keeps ``index + L <= max_len``."""
    max_len = config.max_len if max_len is None else max_len
    kv_shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    ids = jnp.zeros((batch, max_len), jnp.int32)
    return {"k": jnp.zeros(kv_shape, dtype), "v": jnp.zeros(kv_shape, dtype), "index": jnp.zeros((), jnp.int32),
            "segment_ids": ids, "bidirectional_ids": ids, "positions": ids}


def abstract_params(config: LlamaConfig) -> Any:
    """``jax.eval_shape`` of ``Llama(config).init``: boxed ``ShapeDtypeStruct`` params, no allocation."""
    ids = jnp.zeros((1, 1), jnp.int32)
    model = Llama(config)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, ids, ids, ids + 1, ids))["params"]


def param_counts(config: LlamaConfig) -> dict[str, int]:
    """Parameter counts by top-level module (``embed_text``, ``layers``/``layers_i``, ``head_*``,
    ``final_norm``), plus ``"body"`` (everything but embeddings and heads) and ``"total"``."""
    params = jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
                          abstract_params(config), is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    counts = {name: sum(int(leaf.size) for leaf in jax.tree.leaves(sub)) for name, sub in params.items()}
    counts["total"] = sum(counts.values())
    counts["body"] = sum(n for k, n in counts.items()
                         if k != "total" and not k.startswith(("embed_", "head_")))
    return counts


def count_params(config: LlamaConfig) -> int:
    """The total parameter count, from shapes only (``jax.eval_shape``)."""
    return param_counts(config)["total"]
