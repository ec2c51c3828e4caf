"""Pre-LayerNorm transformer blocks (ViT style) for the latent action quantizer.

``TransformerStack(depth, ...)`` runs ``depth`` blocks through ``nn.scan`` (parameters stacked on a
leading ``layers`` axis) with an optional ``nn.remat`` policy. ``unroll`` is the scan's: 1 compiles
one block body run in a loop, n places n blocks in each loop iteration, 0 (or >= depth) unrolls the
stack completely (no loop: XLA schedules and fuses across blocks and slices each block's weights
once, at the price of a compile time growing with depth). The parameter tree is the same for every
``unroll``, so checkpoints load whatever it is. A block is
self-attention (optionally causal or masked), optional cross-attention to a context, and a GELU MLP.
Attention goes through ``jax.nn.dot_product_attention`` so GPUs get the cuDNN kernel.

Every parameter carries logical axes (``embed``, ``heads``, ``kv``, ``mlp``, ``norm``,
``layers``) and activations are constrained to ``("batch", "length", "embed")``, so the sharding
rules of :mod:`jaxvla.sharding` place the large variants on a mesh.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable")


def remat_policy(name: str):
    """``config.remat_policy`` -> (use remat, jax checkpoint policy). ``none`` keeps activations."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"config.remat_policy={name!r} is unknown; expected one of {REMAT_POLICIES}")
    if name == "none":
        return False, None
    if name == "dots_saveable":
        return True, jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return True, jax.checkpoint_policies.nothing_saveable


def scan_unroll(unroll: int, depth: int) -> int:
    """The ``unroll`` of a ``depth``-layer scan: ``unroll`` blocks per loop iteration, 0 or anything
    >= ``depth`` the whole stack (no loop). Raises on a negative value."""
    unroll = int(unroll)
    if unroll < 0:
        raise ValueError(f"scan unroll must be >= 0 (0: fully unrolled), got {unroll}")
    return max(depth, 1) if unroll == 0 or unroll >= depth else unroll


def scanned_layers(block: type[nn.Module], depth: int, remat: str, unroll: int = 1):
    """``block`` (scan-compatible: ``(x, context) -> (x, None)``) repeated ``depth`` times by
    ``nn.scan``, its parameters stacked on a leading ``layers`` axis, wrapped in ``nn.remat`` with
    the ``remat`` policy unless it is "none"; ``unroll`` blocks per loop iteration
    (:func:`scan_unroll`: 0 = all of them, no loop)."""
    use_remat, policy = remat_policy(remat)
    if use_remat:
        block = nn.remat(block, policy=policy, prevent_cse=False)
    return nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=nn.broadcast,
        length=depth,
        unroll=scan_unroll(unroll, depth),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def _dense_init():
    return nn.initializers.xavier_uniform()


def layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        dtype=dtype,
        name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
    )


def dense(features: int, axes: tuple[str, str], name: str, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
    """A Dense layer whose kernel carries logical ``axes`` (bias: the output axis)."""
    return nn.Dense(
        features,
        dtype=dtype,
        use_bias=use_bias,
        name=name,
        kernel_init=nn.with_logical_partitioning(_dense_init(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[-1],)),
    )


def constrain(x: jax.Array) -> jax.Array:
    """``[B, N, D]`` activations: batch over the data axes, embed replicated (sequence-local)."""
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class HeadProjection(nn.Module):
    """``[B, N, D] -> [B, N, heads, head_dim]`` with kernel axes ``("embed", "heads", "kv")``."""

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2)),
                ("embed", "heads", "kv"),
            ),
            (x.shape[-1], self.num_heads, self.head_dim),
        )
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")),
                          (self.num_heads, self.head_dim))
        return jnp.einsum("bnd,dhk->bnhk", x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class Attention(nn.Module):
    """Multi-head attention ``[B, N, D] x [B, M, D] -> [B, N, D]``."""

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, causal: bool = False,
                 mask: jax.Array | None = None) -> jax.Array:
        """``mask``: bool broadcastable to ``[B, heads, N, M]``, True where attention is allowed."""
        context = x if context is None else context
        features = x.shape[-1]

        def projection(name):
            return HeadProjection(self.num_heads, self.head_dim, self.dtype, name=name)

        query = projection("query")(x)  # [B, N, H, Dh]
        key = projection("key")(context)  # [B, M, H, Dh]
        value = projection("value")(context)
        out = jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=causal)  # [B, N, H, Dh]
        kernel = self.param(
            "out_kernel",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2),
                ("heads", "kv", "embed"),
            ),
            (self.num_heads, self.head_dim, features),
        )
        bias = self.param("out_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (features,))
        return jnp.einsum("bnhd,hde->bne", out, kernel.astype(self.dtype)) + bias.astype(self.dtype)


class TransformerBlock(nn.Module):
    """Pre-LN block: ``x + attn(LN x)`` [``+ cross(LN x, context)``] ``+ mlp(LN x)``.

    Call signature is scan-compatible: ``(x, context) -> (x, None)``; ``x`` is ``[B, N, D]``,
    ``context`` ``[B, M, Dc]`` or None.
    """

    num_heads: int
    head_dim: int
    mlp_ratio: float = 4.0
    causal: bool = False
    cross_attention: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None):
        features = x.shape[-1]
        x = constrain(x)
        h = layer_norm("attn_norm", self.dtype)(x)
        x = x + Attention(self.num_heads, self.head_dim, self.dtype, name="attn")(h, causal=self.causal)
        if self.cross_attention:
            if context is None:
                raise ValueError("TransformerBlock(cross_attention=True) needs a context")
            h = layer_norm("cross_norm", self.dtype)(x)
            c = layer_norm("context_norm", self.dtype)(context)
            x = x + Attention(self.num_heads, self.head_dim, self.dtype, name="cross")(h, c)
        h = layer_norm("mlp_norm", self.dtype)(x)
        h = dense(int(features * self.mlp_ratio), ("embed", "mlp"), "mlp_in", self.dtype)(h)
        h = nn.gelu(h)
        x = x + dense(features, ("mlp", "embed"), "mlp_out", self.dtype)(h)
        return constrain(x), None


class TransformerStack(nn.Module):
    """``depth`` scanned ``TransformerBlock`` s, then a final LayerNorm. ``[B, N, D] -> [B, N, D]``."""

    depth: int
    num_heads: int
    head_dim: int
    mlp_ratio: float = 4.0
    causal: bool = False
    cross_attention: bool = False
    remat: str = "none"
    unroll: int = 1  # scan_unroll: blocks per loop iteration, 0 = all (no loop)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        scanned = scanned_layers(TransformerBlock, self.depth, self.remat, self.unroll)
        x, _ = scanned(
            self.num_heads, self.head_dim, self.mlp_ratio, self.causal, self.cross_attention, self.dtype,
            name="layers",
        )(x, context)
        return layer_norm("final_norm", self.dtype)(x)


class FactorisedBlock(nn.Module):
    """Space-time block on ``[B, T, N, D]``: attention over the N tokens of each time step, then
    over the T steps of each token position (causal in time when ``temporal_causal``).

    Scan-compatible: ``(x, None) -> (x, None)``.
    """

    num_heads: int
    head_dim: int
    mlp_ratio: float = 4.0
    temporal_causal: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None):
        del context
        batch, steps, tokens, features = x.shape
        kwargs = dict(num_heads=self.num_heads, head_dim=self.head_dim, mlp_ratio=self.mlp_ratio, dtype=self.dtype)
        spatial = x.reshape(batch * steps, tokens, features)
        spatial, _ = TransformerBlock(**kwargs, name="spatial")(spatial)
        temporal = spatial.reshape(batch, steps, tokens, features).transpose(0, 2, 1, 3)
        temporal = temporal.reshape(batch * tokens, steps, features)
        temporal, _ = TransformerBlock(**kwargs, causal=self.temporal_causal, name="temporal")(temporal)
        x = temporal.reshape(batch, tokens, steps, features).transpose(0, 2, 1, 3)
        return x, None


class FactorisedStack(nn.Module):
    """``depth`` scanned ``FactorisedBlock`` s and a final LayerNorm: ``[B, T, N, D] -> same``."""

    depth: int
    num_heads: int
    head_dim: int
    mlp_ratio: float = 4.0
    temporal_causal: bool = False
    remat: str = "none"
    unroll: int = 1  # scan_unroll: blocks per loop iteration, 0 = all (no loop)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scanned = scanned_layers(FactorisedBlock, self.depth, self.remat, self.unroll)
        x, _ = scanned(
            self.num_heads, self.head_dim, self.mlp_ratio, self.temporal_causal, self.dtype, name="layers"
        )(x, None)
        return layer_norm("final_norm", self.dtype)(x)
