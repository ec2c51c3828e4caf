"""The latent action quantizer (stage 1): LAPA's pair model and ViPRA's clip model.

Both read ``T`` frames ``[B, T, S, S, 3]`` in [-1, 1] and explain each of the ``T - 1``
transitions with ``M = code_grid**2`` discrete tokens from a codebook of ``codebook_size``
(NSVQ, :mod:`jaxvla.models.nsvq`); a decoder must predict the next frame from them.

``variant="lapa"`` (T = 2: x_t, x_{t+H}), the structure of LAPA's ``LatentActionQuantization``:
  patch embedding ``p`` (LayerNorm, Linear, LayerNorm) -> spatial transformer per frame -> causal
  temporal transformer per patch position -> encoder tokens ``e_t, e_{t+H}`` [B, N, D] -> each
  frame projected on its own, ``P(e) = reduce(Linear_Q(e))`` with ``reduce`` = conv 3x3 stride 2
  -> ReLU -> conv down to the ``code_grid x code_grid`` grid (LAPA's ``cnn_encoder``) -> the
  difference ``d = P(e_{t+H}) - P(e_t)`` [B, M, Q] -> NSVQ. (Projecting before subtracting
  matters: ``P`` is not linear.) Decoder: a spatial transformer over the *detached patch
  embeddings* ``stop_gradient(p(x_t))`` (not the encoder output: no decoder gradient reaches the
  patch embedding, which only the encoder path trains) that cross-attends to the quantised action
  tokens, then a linear pixel head.

``variant="vipra"`` (T = L + 1 clip frames o_0..o_L):
  patch embedding -> non-causal space-time encoder (factorised: spatial then temporal attention
  per layer) -> for transition k the tokens of frame k+1 (ViPRA's ``encode_deltas=False``; the
  encoder has seen the whole clip) -> Linear + strided conv -> NSVQ. With ``encode_deltas=True``
  (the reference's flag) the latent of transition k is the difference of the projections
  ``P(e_{k+1}) - P(e_k)``, as lapa's. Causal decoder: per step k the
  patch tokens of o_k and the action tokens z_k side by side, factorised attention causal in
  time, so the output at k predicts o_{k+1} from o_{<=k} and z_{<=k} only.

With ``residual=True`` (the default here) the pixel head predicts the change from the context
frame (x_t, or o_k) and is zero-initialised, so an untrained model starts at the copy-frame
baseline; ``residual=False`` predicts pixels directly as the reference code does.

Shapes: S image size, p patch, g = S / p, N = g*g patches, D ``dim``, M code tokens, Q
``quant_dim``. Methods (all ``model.apply(variables, ..., method=...)``):

* ``__call__(frames, train, rng)`` -> dict(recon [B, T-1, S, S, 3], indices [B, T-1, M] int32,
  quantized [B, T-1, M, Q], latents [B, T-1, M, Q] (pre-quantisation), perplexity,
  used_fraction, counts [K]);
* ``encode(frames)`` -> dict(indices, latents, quantized) with hard codes (the labeller);
* ``decode(frames, quantized)``: frames [B, T-1, S, S, 3] are the context frames (x_t; o_0..o_{L-1})
  -> predictions [B, T-1, S, S, 3];
* ``decode_codes(frames, indices)``: the same from code indices;
* ``rollout(first_frame [B, S, S, 3], indices [B, T-1, M])`` -> [B, T-1, S, S, 3]: decoding
  autoregressively from its own predictions (the "latent action semantics" figure).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvla.input_checks import check_float_frames
from jaxvla.models.nsvq import NSVQ
from jaxvla.models.transformer import FactorisedStack, TransformerStack, dense, layer_norm

Dtype = Any

VARIANTS = ("lapa", "vipra")

# Paper sizes from REFERENCE.md and CPU-sized variants that train on 64 px frames in minutes.
_SIZES: dict[str, dict[str, Any]] = {
    "lapa": dict(variant="lapa", image_size=256, patch_size=32, dim=1024, num_heads=16, head_dim=64,
                 encoder_depth=8, temporal_depth=8, decoder_depth=8, quant_dim=32, code_grid=2,
                 codebook_size=8, num_frames=2),
    "vipra": dict(variant="vipra", image_size=224, patch_size=14, dim=768, num_heads=16, head_dim=48,
                  encoder_depth=6, temporal_depth=0, decoder_depth=8, quant_dim=32, code_grid=4,
                  codebook_size=8, num_frames=8),
    "lapa_small": dict(variant="lapa", image_size=64, patch_size=8, dim=128, num_heads=4, head_dim=32,
                       encoder_depth=2, temporal_depth=2, decoder_depth=2, quant_dim=32, code_grid=2,
                       codebook_size=8, num_frames=2),
    "vipra_small": dict(variant="vipra", image_size=64, patch_size=8, dim=128, num_heads=4, head_dim=32,
                        encoder_depth=2, temporal_depth=0, decoder_depth=2, quant_dim=32, code_grid=4,
                        codebook_size=8, num_frames=4),
}


def laq_size(name: str) -> dict[str, Any]:
    """The keyword arguments of ``LAQ`` for a named size (lapa, vipra, lapa_small, vipra_small)."""
    if name not in _SIZES:
        raise ValueError(f"unknown LAQ size {name!r}; expected one of {sorted(_SIZES)}")
    return dict(_SIZES[name])


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """``[..., S, S, C] -> [..., (S/p)^2, p*p*C]`` (row-major patches)."""
    *lead, height, width, channels = images.shape
    grid_h, grid_w = height // patch, width // patch
    x = images.reshape(*lead, grid_h, patch, grid_w, patch, channels)
    x = jnp.moveaxis(x, -4, -3)  # [..., gh, gw, p, p, C]
    return x.reshape(*lead, grid_h * grid_w, patch * patch * channels)


def unpatchify(tokens: jax.Array, patch: int, channels: int = 3) -> jax.Array:
    """Inverse of :func:`patchify`: ``[..., g*g, p*p*C] -> [..., g*p, g*p, C]``."""
    *lead, num, _ = tokens.shape
    grid = math.isqrt(num)
    x = tokens.reshape(*lead, grid, grid, patch, patch, channels)
    x = jnp.moveaxis(x, -3, -4)  # [..., g, p, g, p, C]
    return x.reshape(*lead, grid * patch, grid * patch, channels)


def _embedding(name: str, module: nn.Module, shape: tuple[int, ...]) -> jax.Array:
    return module.param(
        name, nn.with_logical_partitioning(nn.initializers.normal(0.02), (None,) * (len(shape) - 1) + ("embed",)), shape
    )


def _conv(features: int, kernel: tuple[int, int], strides: tuple[int, int], padding, dtype: Dtype,
          name: str) -> nn.Conv:
    return nn.Conv(
        features, kernel, strides=strides, padding=padding, dtype=dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
    )


def reducer_layout(grid: int, code_grid: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(kernel, stride, padding) of the two convs of :class:`GridReducer`: a ``grid`` x ``grid``
    patch grid -> ``code_grid`` x ``code_grid``. The first is LAPA's 3x3 stride 2 padding 1 (grid ->
    h = ceil(grid / 2)); the second a VALID (h - code_grid + 1)-kernel when that kernel is at most
    4 (LAPA: 8 -> 4 -> 2 with kernel 3, 8 -> 4 -> 1 with kernel 4), else 3x3 stride 2 padding 1 when
    h = 2 code_grid (LAPA: 16 -> 8 -> 4), else the VALID kernel."""
    half = (grid + 1) // 2
    if half < code_grid:
        raise ValueError(f"the {grid}x{grid} patch grid is too small for a {code_grid}x{code_grid} code grid "
                         "after the reducer's stride-2 conv")
    kernel = half - code_grid + 1
    if kernel > 4 and half == 2 * code_grid:
        return (3, 2, 1), (3, 2, 1)
    return (3, 2, 1), (kernel, 1, 0)


class GridReducer(nn.Module):
    """LAPA's ``cnn_encoder``: conv -> ReLU -> conv from the patch grid ``[B, g, g, Q]`` down to the
    code grid ``[B, c, c, Q]`` (layout: :func:`reducer_layout`)."""

    grid: int
    code_grid: int
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layers = reducer_layout(self.grid, self.code_grid)
        for index, (kernel, stride, pad) in enumerate(layers):
            if index:
                x = nn.relu(x)
            x = _conv(self.features, (kernel, kernel), (stride, stride), ((pad, pad), (pad, pad)), self.dtype,
                      f"conv_{index}")(x)
        return x


class LAQ(nn.Module):
    """Latent action quantizer; see the module docstring."""

    variant: str = "lapa"
    image_size: int = 64
    patch_size: int = 8
    dim: int = 128
    num_heads: int = 4
    head_dim: int = 32
    encoder_depth: int = 2  # lapa: spatial transformer depth; vipra: space-time layers
    temporal_depth: int = 2  # lapa only: causal temporal transformer depth
    decoder_depth: int = 2
    quant_dim: int = 32
    code_grid: int = 2
    codebook_size: int = 8
    num_frames: int = 2
    mlp_ratio: float = 4.0
    residual: bool = True
    # vipra only: the latent of transition k is P(e_{k+1}) - P(e_k) instead of P(e_{k+1}).
    encode_deltas: bool = False
    remat: str = "none"
    # Transformer blocks per scan iteration of every stack (jaxvla.models.transformer.scan_unroll):
    # 1 a loop over one compiled block, 0 fully unrolled. Same parameters either way.
    scan_unroll: int = 1
    dtype: Dtype = jnp.float32

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def code_tokens(self) -> int:
        return self.code_grid * self.code_grid

    @property
    def num_transitions(self) -> int:
        return self.num_frames - 1

    def _check(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"LAQ variant {self.variant!r} is unknown; expected one of {VARIANTS}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.grid % self.code_grid:
            raise ValueError(f"the {self.grid}x{self.grid} patch grid does not reduce to a {self.code_grid}x{self.code_grid} code grid")
        if self.variant == "lapa" and self.num_frames != 2:
            raise ValueError(f"the lapa LAQ reads frame pairs (num_frames=2), got num_frames={self.num_frames}")
        if self.num_frames < 2:
            raise ValueError(f"num_frames must be >= 2, got {self.num_frames}")

    def setup(self):
        self._check()
        stack = dict(num_heads=self.num_heads, head_dim=self.head_dim, mlp_ratio=self.mlp_ratio,
                     remat=self.remat, unroll=self.scan_unroll, dtype=self.dtype)
        self.patch_norm_in = layer_norm("patch_norm_in", self.dtype)
        self.patch_embed = dense(self.dim, (None, "embed"), "patch_embed", self.dtype)
        self.patch_norm_out = layer_norm("patch_norm_out", self.dtype)
        self.spatial_pos = _embedding("spatial_pos", self, (self.num_patches, self.dim))
        self.temporal_pos = _embedding("temporal_pos", self, (self.num_frames, self.dim))
        if self.variant == "lapa":
            self.spatial_encoder = TransformerStack(self.encoder_depth, **stack, name="spatial_encoder")
            self.temporal_encoder = TransformerStack(self.temporal_depth, causal=True, **stack, name="temporal_encoder")
            self.decoder = TransformerStack(self.decoder_depth, cross_attention=True, **stack, name="decoder")
        else:
            self.encoder = FactorisedStack(self.encoder_depth, temporal_causal=False, **stack, name="encoder")
            self.decoder_patch_embed = dense(self.dim, (None, "embed"), "decoder_patch_embed", self.dtype)
            self.decoder = FactorisedStack(self.decoder_depth, temporal_causal=True, **stack, name="decoder")
        self.decoder_pos = _embedding("decoder_pos", self, (self.num_patches, self.dim))
        self.action_pos = _embedding("action_pos", self, (self.code_tokens, self.dim))
        self.to_quant = dense(self.quant_dim, ("embed", None), "to_quant", self.dtype)
        if self.variant == "lapa":
            self.reduce = GridReducer(self.grid, self.code_grid, self.quant_dim, dtype=self.dtype, name="reduce")
        else:
            stride = self.grid // self.code_grid
            self.reduce = _conv(self.quant_dim, (stride, stride), (stride, stride), "VALID", self.dtype, "reduce")
        self.quantizer = NSVQ(self.codebook_size, self.quant_dim, name="quantizer")
        self.from_quant = dense(self.dim, (None, "embed"), "from_quant", self.dtype)
        head_init = nn.initializers.zeros if self.residual else nn.initializers.xavier_uniform()
        self.pixel_norm = layer_norm("pixel_norm", self.dtype)
        self.pixel_head = nn.Dense(
            self.patch_size * self.patch_size * 3, dtype=self.dtype, name="pixel_head",
            kernel_init=nn.with_logical_partitioning(head_init, ("embed", None)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
        )

    # -- pieces -----------------------------------------------------------------------------

    def _check_frames(self, frames: jax.Array, steps: int, what: str) -> None:
        expected = (steps, self.image_size, self.image_size, 3)
        if frames.ndim != 5 or tuple(frames.shape[1:]) != expected:
            raise ValueError(f"LAQ.{what}: expected frames [B, {', '.join(map(str, expected))}], got {frames.shape}")
        if what in ("__call__", "encode"):
            # Real frames: float in [-1, 1], the dtype at trace time, the range on concrete arrays
            # (jaxvla.input_checks). decode's context frames may be unclipped predictions: dtype only.
            check_float_frames(frames, where=f"LAQ.{what}", key="frames", shape=("B",) + expected)
        elif frames.dtype == jnp.uint8:
            raise ValueError(f"LAQ.{what}: context frames must be float in [-1, 1] (images_to_float); got uint8")

    def _patch_tokens(self, frames: jax.Array) -> jax.Array:
        """``[B, T, S, S, 3] -> [B, T, N, D]``: the patch embedding (LayerNorm, Linear, LayerNorm)."""
        x = patchify(frames.astype(self.dtype), self.patch_size)
        return self.patch_norm_out(self.patch_embed(self.patch_norm_in(x)))

    def _embed(self, frames: jax.Array) -> jax.Array:
        """``[B, T, S, S, 3] -> [B, T, N, D]`` patch tokens with spatial and temporal positions."""
        steps = frames.shape[1]
        x = self._patch_tokens(frames)
        return x + self.spatial_pos.astype(self.dtype) + self.temporal_pos[:steps, None].astype(self.dtype)

    def _lapa_tokens(self, frames: jax.Array) -> jax.Array:
        """Encoder tokens ``[B, T, N, D]`` (spatial, then causal temporal attention)."""
        x = self._embed(frames)
        batch, steps, tokens, features = x.shape
        x = self.spatial_encoder(x.reshape(batch * steps, tokens, features))
        x = x.reshape(batch, steps, tokens, features).transpose(0, 2, 1, 3).reshape(batch * tokens, steps, features)
        x = self.temporal_encoder(x)
        return x.reshape(batch, tokens, steps, features).transpose(0, 2, 1, 3)

    def _project(self, features: jax.Array) -> jax.Array:
        """Per-frame (or per-transition) tokens ``[B, K, N, D]`` -> ``[B, K, M, Q]``: Linear to
        ``quant_dim`` per patch, then ``reduce`` over the patch grid, each of the K on its own."""
        batch, steps = features.shape[:2]
        x = self.to_quant(features).reshape(batch * steps, self.grid, self.grid, self.quant_dim)
        x = self.reduce(x)  # [B*K, code_grid, code_grid, Q]
        return x.reshape(batch, steps, self.code_tokens, self.quant_dim).astype(jnp.float32)

    def _latents(self, frames: jax.Array) -> jax.Array:
        """Pre-quantisation latents ``[B, T-1, M, Q]``. lapa: ``P(e_{t+H}) - P(e_t)``, each frame
        projected first (LAPA's NSVQ ``encode`` of the first and the last tokens, then the
        difference); vipra: the projected encoder tokens of frames 1..L (``encode_deltas``: minus
        those of frames 0..L-1)."""
        if self.variant == "lapa":
            projected = self._project(self._lapa_tokens(frames))  # [B, 2, M, Q]
            return projected[:, 1:] - projected[:, :1]
        tokens = self.encoder(self._embed(frames))
        if self.encode_deltas:
            projected = self._project(tokens)  # [B, L+1, M, Q]
            return projected[:, 1:] - projected[:, :-1]
        return self._project(tokens[:, 1:])

    def _pixels(self, x: jax.Array, context_frames: jax.Array) -> jax.Array:
        """Decoder patch tokens ``[B, K, N, D]`` -> frames ``[B, K, S, S, 3]`` (float32)."""
        out = unpatchify(self.pixel_head(self.pixel_norm(x)), self.patch_size).astype(jnp.float32)
        if self.residual:
            out = out + context_frames.astype(jnp.float32)
        return out

    def _decode(self, context_frames: jax.Array, quantized: jax.Array) -> jax.Array:
        """context frames ``[B, K, S, S, 3]``, quantised ``[B, K, M, Q]`` -> ``[B, K, S, S, 3]``."""
        actions = self.from_quant(quantized.astype(self.dtype)) + self.action_pos.astype(self.dtype)  # [B, K, M, D]
        batch, steps = actions.shape[:2]
        if self.variant == "lapa":
            # LAPA: the decoder reads the detached patch embeddings of x_t (first_frame_tokens.detach()).
            context = jax.lax.stop_gradient(self._patch_tokens(context_frames))
            x = context + self.decoder_pos.astype(self.dtype)
            x = x.reshape(batch * steps, self.num_patches, self.dim)
            x = self.decoder(x, actions.reshape(batch * steps, self.code_tokens, self.dim))
            x = x.reshape(batch, steps, self.num_patches, self.dim)
        else:
            frames = patchify(context_frames.astype(self.dtype), self.patch_size)
            x = self.decoder_patch_embed(self.patch_norm_in(frames))
            x = x + self.decoder_pos.astype(self.dtype) + self.temporal_pos[:steps, None].astype(self.dtype)
            x = self.decoder(jnp.concatenate([x, actions], axis=2))[:, :, : self.num_patches]
        return self._pixels(x, context_frames)

    # -- public methods ---------------------------------------------------------------------

    def __call__(self, frames: jax.Array, *, train: bool = False, rng: jax.Array | None = None) -> dict:
        self._check_frames(frames, self.num_frames, "__call__")
        latents = self._latents(frames)
        q = self.quantizer(latents, train=train, rng=rng)
        recon = self._decode(frames[:, :-1], q["quantized"])
        return {
            "recon": recon,
            "indices": q["indices"],
            "quantized": q["quantized"],
            "latents": latents,
            "perplexity": q["perplexity"],
            "used_fraction": q["used_fraction"],
            "counts": q["counts"],
        }

    def encode(self, frames: jax.Array) -> dict:
        """Hard codes of every transition: dict(indices [B, T-1, M], latents, quantized). ``frames``
        float ``[B, T, S, S, 3]`` in [-1, 1] (uint8 or another dtype: an InputError; values outside
        [-1, 1]: an InputError when the frames are concrete, unchecked under jit)."""
        self._check_frames(frames, self.num_frames, "encode")
        latents = self._latents(frames)
        q = self.quantizer(latents, train=False)
        return {"indices": q["indices"], "latents": latents, "quantized": q["quantized"]}

    def decode(self, context_frames: jax.Array, quantized: jax.Array) -> jax.Array:
        """Predict each next frame: context ``[B, K, S, S, 3]``, quantised ``[B, K, M, Q]``."""
        self._check_frames(context_frames, self.num_transitions, "decode")
        return self._decode(context_frames, quantized)

    def decode_codes(self, context_frames: jax.Array, indices: jax.Array) -> jax.Array:
        """:meth:`decode` from code indices ``[B, K, M]``."""
        self._check_frames(context_frames, self.num_transitions, "decode_codes")
        return self._decode(context_frames, self._lookup(indices))

    def _lookup(self, indices: jax.Array) -> jax.Array:
        """Code indices ``[...]`` -> code vectors ``[..., Q]`` (float32)."""
        codebook = self.quantizer.variables["params"]["codebook"]
        if isinstance(codebook, nn.meta.AxisMetadata):  # variables straight from init are boxed
            codebook = codebook.unbox()
        return jnp.take(codebook.astype(jnp.float32), indices, axis=0)

    def rollout(self, first_frame: jax.Array, indices: jax.Array) -> jax.Array:
        """Decode the code sequence ``[B, K, M]`` from ``first_frame [B, S, S, 3]``, feeding back
        its own predictions: ``[B, K, S, S, 3]``."""
        quantized = self._lookup(indices)
        steps = self.num_transitions
        context = jnp.repeat(first_frame[:, None], steps, axis=1)
        predictions = []
        for k in range(steps):
            out = self._decode(context, quantized)  # causal: output k depends on context[:k+1]
            predictions.append(out[:, k])
            if k + 1 < steps:
                context = context.at[:, k + 1].set(jnp.clip(out[:, k], -1.0, 1.0).astype(context.dtype))
        return jnp.stack(predictions, axis=1)


def make_laq(size: str = "lapa_small", **overrides) -> LAQ:
    """An ``LAQ`` of a named size with keyword overrides."""
    kwargs = laq_size(size)
    kwargs.update(overrides)
    return LAQ(**kwargs)
