"""VQGAN image tokenizer whose math matches LWM's, with readable parameter names.

An image ``[B, H, W, 3]`` in ``[-1, 1]`` becomes ``[B, h, w]`` integer tokens, where
``h = H / 2**(len(channel_mult) - 1)``. For the ``"lwm"`` variant that is 256x256 -> 16x16 tokens
from an 8192-entry codebook, so LWM's published weights load exactly (see ``jaxvla.io.lwm``).

Parameter layout (``params[...]``), one level of ``channel_mult`` per ``down_i`` / ``up_i``, where
``i`` is the resolution level (0 = full resolution) in both the encoder and the decoder:

    encoder/stem                        3x3 conv, 3 -> hidden
    encoder/down_{i}/res_{j}            ResnetBlock (norm_0, conv_0, norm_1, conv_1[, shortcut])
    encoder/down_{i}/downsample/conv    3x3 stride-2 conv (every level but the last)
    encoder/mid/res_{0,1}
    encoder/norm_out, encoder/conv_out  GroupNorm, 3x3 conv -> z_channels
    quant_conv                          1x1 conv, z_channels -> embed_dim
    quantizer/codebook                  [codebook_size, embed_dim]
    post_quant_conv                     1x1 conv, embed_dim -> z_channels
    decoder/stem                        3x3 conv, z_channels -> hidden * channel_mult[-1]
    decoder/mid/res_{0,1}
    decoder/up_{i}/res_{j}              num_res_blocks + 1 ResnetBlocks
    decoder/up_{i}/upsample/conv        nearest x2 then 3x3 conv (every level but 0)
    decoder/norm_out, decoder/conv_out  GroupNorm, 3x3 conv -> 3

Every parameter is float32 and carries logical axis names (``nn.with_logical_partitioning``), so
``model.init`` returns ``nn.LogicallyPartitioned`` boxes; ``flax.linen.meta.unbox`` strips them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxvla.input_checks import check_float_frames

# Logical axis names; the trainer's sharding rules map them onto mesh axes.
CONV_KERNEL_AXES = (None, None, "conv_in", "conv_out")
CONV_BIAS_AXES = ("conv_out",)
NORM_AXES = ("norm",)
CODEBOOK_AXES = ("codebook", "codebook_dim")
ACTIVATION_AXES = ("batch", None, None, None)

Dtype = Any

_VARIANTS = {
    # LWM's published tokenizer: 256x256x3 -> 16x16 tokens, 8192 codes of dimension 64.
    "lwm": dict(
        resolution=256,
        in_channels=3,
        hidden_channels=128,
        channel_mult=(1, 2, 2, 4, 6),
        num_res_blocks=2,
        z_channels=64,
        codebook_size=8192,
        embed_dim=64,
        norm_groups=32,
    ),
    # Same architecture at toy scale for CPU tests and smoke runs: 64x64x3 -> 8x8 tokens, widths
    # 16/16/32/64. The 64x64 and 32x32 convs dominate the cost, so those levels stay narrow: a
    # train step at batch 8 is ~7 GFLOP (hidden 32 with (1, 2, 2, 4) would be ~43). 4 GroupNorm
    # groups give 4 channels per group at width 16, as LWM has at its width 128; with one
    # channel per group, GroupNorm would cancel the preceding conv's bias (a parameter with a
    # pure-rounding-noise gradient, which Adam turns into full-size random steps).
    "small": dict(
        resolution=64,
        in_channels=3,
        hidden_channels=16,
        channel_mult=(1, 1, 2, 4),
        num_res_blocks=1,
        z_channels=32,
        codebook_size=512,
        embed_dim=32,
        norm_groups=4,
    ),
}


def vqgan_variant(name: str) -> dict:
    """Constructor kwargs for a named VQGAN size: ``VQGAN(**vqgan_variant("lwm"))``."""
    try:
        return dict(_VARIANTS[name])
    except KeyError:
        raise ValueError(
            f"unknown VQGAN variant {name!r}; valid names: {sorted(_VARIANTS)}"
        ) from None


def _conv(
    features: int,
    kernel_size: int,
    *,
    dtype: Dtype,
    name: str | None = None,
    strides: int = 1,
    padding: str = "SAME",
) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_KERNEL_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), CONV_BIAS_AXES),
        name=name,
    )


def _group_norm(num_groups: int, *, dtype: Dtype, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=1e-6,
        dtype=dtype,
        param_dtype=jnp.float32,
        # Two-pass variance: E[x^2] - E[x]^2 loses precision when |mean| >> std, which happens
        # after long stacks of residual blocks; the cost is one extra reduction.
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), NORM_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), NORM_AXES),
        name=name,
    )


def _constrain(x: jax.Array) -> jax.Array:
    """Pins a [B, H, W, C] activation to batch sharding (a no-op outside a mesh/rules context)."""
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus a (1x1-projected when widths differ) skip.

    ``[B, H, W, C_in] -> [B, H, W, out_channels]``.
    """

    out_channels: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _group_norm(self.norm_groups, dtype=self.dtype, name="norm_0")(x)
        h = _conv(self.out_channels, 3, dtype=self.dtype, name="conv_0")(nn.silu(h))
        h = _group_norm(self.norm_groups, dtype=self.dtype, name="norm_1")(h)
        # LWM has a dropout here that is always deterministic at inference; omitted.
        h = _conv(self.out_channels, 3, dtype=self.dtype, name="conv_1")(nn.silu(h))
        residual = x
        if x.shape[-1] != self.out_channels:
            residual = _conv(self.out_channels, 1, dtype=self.dtype, name="shortcut")(x)
        return h + residual


class MidBlock(nn.Module):
    """Two width-preserving ResnetBlocks at the lowest resolution (no attention, as in LWM)."""

    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        for index in range(2):
            x = ResnetBlock(width, self.norm_groups, self.dtype, name=f"res_{index}")(x)
        return x


class Downsample(nn.Module):
    """Halves H and W: pad bottom/right by one, then a 3x3 stride-2 VALID conv.

    ``[B, H, W, C] -> [B, H/2, W/2, C]``. The asymmetric pad is LWM's (and taming's) convention;
    SAME padding would pad top/left too and shift the sampling grid.
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], 3, strides=2, padding="VALID", dtype=self.dtype, name="conv")(x)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """``[B, H, W, C] -> [B, 2H, 2W, C]``, each pixel copied into a 2x2 patch.

    Bit-identical to LWM's ``jax.image.resize(x, ..., method="nearest")`` at an exact 2x scale,
    but a broadcast+reshape: its gradient is a reshape+sum, where resize's gather has a
    scatter-add gradient that is ~40x slower on CPU and slow on TPU too.
    """
    batch, height, width, channels = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
    return x.reshape(batch, 2 * height, 2 * width, channels)


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour 2x, then a 3x3 conv. ``[B,H,W,C] -> [B,2H,2W,C]``."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = upsample_nearest_2x(x)
        return _conv(x.shape[-1], 3, dtype=self.dtype, name="conv")(x)


class ResolutionLevel(nn.Module):
    """``num_res_blocks`` ResnetBlocks to ``out_channels``, then an optional 2x resample
    (``"down"`` in the encoder, ``"up"`` in the decoder)."""

    out_channels: int
    num_res_blocks: int
    resample: str | None = None
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for index in range(self.num_res_blocks):
            x = ResnetBlock(self.out_channels, self.norm_groups, self.dtype, name=f"res_{index}")(x)
        if self.resample == "down":
            x = Downsample(self.dtype, name="downsample")(x)
        elif self.resample == "up":
            x = Upsample(self.dtype, name="upsample")(x)
        return x


class Encoder(nn.Module):
    """``[B, H, W, C_img] -> [B, H/f, W/f, z_channels]`` with ``f = 2**(len(channel_mult)-1)``."""

    hidden_channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    z_channels: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        last_level = len(self.channel_mult) - 1
        h = _constrain(_conv(self.hidden_channels, 3, dtype=self.dtype, name="stem")(x))
        for level, mult in enumerate(self.channel_mult):
            h = ResolutionLevel(
                self.hidden_channels * mult,
                self.num_res_blocks,
                resample="down" if level != last_level else None,
                norm_groups=self.norm_groups,
                dtype=self.dtype,
                name=f"down_{level}",
            )(h)
            h = _constrain(h)
        h = _constrain(MidBlock(self.norm_groups, self.dtype, name="mid")(h))
        h = nn.silu(_group_norm(self.norm_groups, dtype=self.dtype, name="norm_out")(h))
        return _constrain(_conv(self.z_channels, 3, dtype=self.dtype, name="conv_out")(h))


class Decoder(nn.Module):
    """``[B, h, w, z_channels] -> [B, h*f, w*f, out_channels]`` (unclipped)."""

    hidden_channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    out_channels: int = 3
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        top_width = self.hidden_channels * self.channel_mult[-1]
        h = _constrain(_conv(top_width, 3, dtype=self.dtype, name="stem")(z))
        h = _constrain(MidBlock(self.norm_groups, self.dtype, name="mid")(h))
        # Lowest resolution first; each level is named by its resolution index, like the encoder.
        for level in reversed(range(len(self.channel_mult))):
            h = ResolutionLevel(
                self.hidden_channels * self.channel_mult[level],
                # One more block than the encoder level, as in LWM/taming.
                self.num_res_blocks + 1,
                resample="up" if level != 0 else None,
                norm_groups=self.norm_groups,
                dtype=self.dtype,
                name=f"up_{level}",
            )(h)
            h = _constrain(h)
        h = nn.silu(_group_norm(self.norm_groups, dtype=self.dtype, name="norm_out")(h))
        return _constrain(_conv(self.out_channels, 3, dtype=self.dtype, name="conv_out")(h))


def _uniform_symmetric(limit: float) -> Callable:
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, minval=-limit, maxval=limit)

    return init


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup into ``codebook [codebook_size, embed_dim]``.

    The codebook starts uniform in ``[-1/K, 1/K]`` as in LWM/taming. That places every code near
    the origin, so early on few codes win; the tokenizer stage's dead-code restarts reseed unused
    rows from encoder outputs, which is what actually spreads the codebook.
    """

    codebook_size: int
    embed_dim: int

    def setup(self):
        self.codebook = self.param(
            "codebook",
            nn.with_logical_partitioning(
                _uniform_symmetric(1.0 / self.codebook_size), CODEBOOK_AXES
            ),
            (self.codebook_size, self.embed_dim),
            jnp.float32,
        )

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``z [..., D] -> (z_q [..., D] float32 codebook rows, indices [...] int32)``.

        Nearest code in squared euclidean distance, ``argmin_k |z|^2 - 2 z.e_k + |e_k|^2``. The
        ``|z|^2`` term is the same for every code and is dropped: adding it in float32 would round
        away the small code-to-code differences (codes start within 1/K of the origin while
        ``|z|`` is O(1)), making the argmin depend on rounding, e.g. on how a sharded matmul
        orders its sums. The matmul runs at HIGHEST precision for the same reason (TF32/bf16
        passes on accelerators).
        """
        # argmin has no gradient; stop_gradient just keeps autodiff away from the K-wide matmul.
        codebook = jax.lax.stop_gradient(self.codebook)
        flat = jax.lax.stop_gradient(z.reshape(-1, z.shape[-1]).astype(jnp.float32))
        cross = jnp.matmul(flat, codebook.T, precision=jax.lax.Precision.HIGHEST)  # [N, K]
        scores = jnp.sum(codebook * codebook, axis=-1)[None, :] - 2.0 * cross
        indices = jnp.argmin(scores, axis=-1).astype(jnp.int32).reshape(z.shape[:-1])
        return self.lookup(indices), indices

    def lookup(self, indices: jax.Array) -> jax.Array:
        """``indices [...] int -> [..., D]`` float32 codebook rows.

        Ids ``>= codebook_size`` give NaN rows (``jnp.take``'s fill mode), so a bad token id
        shows up in the decoded image rather than silently aliasing another code; negative ids
        count from the end, as in numpy.
        """
        return jnp.take(self.codebook, indices, axis=0)


class VQGAN(nn.Module):
    """LWM-compatible VQGAN. Build with ``VQGAN(**vqgan_variant("lwm"), dtype=...)``.

    Attributes:
      resolution: input height and width (square images only).
      in_channels: image channels (3).
      hidden_channels: width of level 0; level i has ``hidden_channels * channel_mult[i]``.
      channel_mult: per-level width multipliers; ``len - 1`` 2x downsamplings.
      num_res_blocks: ResnetBlocks per encoder level (decoder levels have one more).
      z_channels: encoder output / decoder input width.
      codebook_size: number of codes K.
      embed_dim: code dimension D.
      norm_groups: GroupNorm groups; every level width must be divisible by it.
      dtype: compute dtype of convs and norms. Parameters are always float32, and the quantizer,
        ``z_e``, ``z_q`` and ``recon`` are float32 whatever ``dtype`` is.

    Every method accepts an optional time axis: ``[B, T, ...]`` in gives ``[B, T, ...]`` out.
    """

    resolution: int = 256
    in_channels: int = 3
    hidden_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 2, 4, 6)
    num_res_blocks: int = 2
    z_channels: int = 64
    codebook_size: int = 8192
    embed_dim: int = 64
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def token_grid(self) -> int:
        """Tokens per side: ``resolution // downsample_factor``."""
        return self.resolution // self.downsample_factor

    def setup(self):
        self._check_config()
        self.encoder = Encoder(
            self.hidden_channels,
            tuple(self.channel_mult),
            self.num_res_blocks,
            self.z_channels,
            self.norm_groups,
            self.dtype,
        )
        self.quant_conv = _conv(self.embed_dim, 1, dtype=self.dtype)
        self.quantizer = VectorQuantizer(self.codebook_size, self.embed_dim)
        self.post_quant_conv = _conv(self.z_channels, 1, dtype=self.dtype)
        self.decoder = Decoder(
            self.hidden_channels,
            tuple(self.channel_mult),
            self.num_res_blocks,
            self.in_channels,
            self.norm_groups,
            self.dtype,
        )

    def _check_config(self) -> None:
        if not self.channel_mult:
            raise ValueError("VQGAN channel_mult must name at least one level")
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"VQGAN resolution {self.resolution} is not divisible by the downsample factor "
                f"{self.downsample_factor} of channel_mult {tuple(self.channel_mult)}"
            )
        for mult in self.channel_mult:
            width = self.hidden_channels * mult
            if width % self.norm_groups:
                raise ValueError(
                    f"VQGAN level width {width} (hidden_channels {self.hidden_channels} x {mult}) "
                    f"is not divisible by norm_groups {self.norm_groups}"
                )

    # --- shape plumbing -------------------------------------------------------------------------

    def _fold_time(self, x: jax.Array, item_ndim: int, what: str, expected: str):
        """``[B, (T,) *item] -> ([N, *item], unfold)`` where ``unfold`` restores the leading axes."""
        if x.ndim not in (item_ndim + 1, item_ndim + 2):
            raise ValueError(f"VQGAN {what}: expected {expected}; got shape {tuple(x.shape)}")
        lead = x.shape[: x.ndim - item_ndim]
        folded = x.reshape((-1,) + x.shape[x.ndim - item_ndim :])

        def unfold(y: jax.Array) -> jax.Array:
            return y.reshape(lead + y.shape[1:])

        return folded, unfold

    def _fold_images(self, images: jax.Array, method: str = "__call__"):
        res, ch = self.resolution, self.in_channels
        expected = (
            f"[B, {res}, {res}, {ch}] or [B, T, {res}, {res}, {ch}] images "
            f"(resolution={res})"
        )
        # float in [-1, 1]: the dtype at trace time, the range on concrete arrays (jaxvla.input_checks).
        check_float_frames(images, where=f"VQGAN.{method}", key="images", shape=None, note=expected)
        folded, unfold = self._fold_time(images, 3, "images", expected)
        if folded.shape[1:] != (res, res, ch):
            raise ValueError(f"VQGAN images: expected {expected}; got shape {tuple(images.shape)}")
        return folded, unfold

    def _fold_grid(self, x: jax.Array, channels: int | None, what: str):
        g = self.token_grid
        item = (g, g) if channels is None else (g, g, channels)
        item_str = ", ".join(str(d) for d in item)
        expected = (
            f"[B, {item_str}] or [B, T, {item_str}] {what} (resolution={self.resolution}, "
            f"{g}x{g} tokens)"
        )
        folded, unfold = self._fold_time(x, len(item), what, expected)
        if folded.shape[1:] != item:
            raise ValueError(f"VQGAN {what}: expected {expected}; got shape {tuple(x.shape)}")
        return folded, unfold

    # --- public methods -------------------------------------------------------------------------

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """Autoencodes ``images [B, H, W, 3]`` (or ``[B, T, H, W, 3]``) in ``[-1, 1]``.

        Returns a dict (leading axes as the input):
          recon   [B, H, W, 3] float32, UNclipped decoder output;
          z_e     [B, h, w, D] float32 encoder output after quant_conv (before quantisation);
          z_q     [B, h, w, D] float32 selected codebook rows (no straight-through: gradients
                  reach the codebook through it);
          indices [B, h, w]    int32 token ids.
        The decoder sees ``z_e + stop_gradient(z_q - z_e)`` so reconstruction gradients pass
        straight through the quantiser to the encoder.
        """
        folded, unfold = self._fold_images(images)
        z_e = self._encode_folded(folded)
        z_q, indices = self.quantizer(z_e)
        straight_through = z_e + jax.lax.stop_gradient(z_q - z_e)
        recon = self._decode_folded(straight_through)
        return dict(recon=unfold(recon), z_e=unfold(z_e), z_q=unfold(z_q), indices=unfold(indices))

    def encode(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, 3] -> [B, h, w]`` (or ``[B, T, H, W, 3] -> [B, T, h, w]``) int32 tokens; images
        float in [-1, 1] (uint8 or another dtype: an InputError; values outside [-1, 1]: an
        InputError when the images are concrete, unchecked under jit)."""
        folded, unfold = self._fold_images(images, "encode")
        _, indices = self.quantizer(self._encode_folded(folded))
        return unfold(indices)

    def encode_latents(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, 3] -> z_e [B, h, w, D]`` float32, before quantisation."""
        folded, unfold = self._fold_images(images, "encode_latents")
        return unfold(self._encode_folded(folded))

    def quantize(self, z_e: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``z_e [..., D] -> (z_q [..., D] float32, indices [...] int32)``, nearest code."""
        if z_e.shape[-1] != self.embed_dim:
            raise ValueError(
                f"VQGAN quantize: expected last axis embed_dim={self.embed_dim}; "
                f"got shape {tuple(z_e.shape)}"
            )
        return self.quantizer(z_e)

    def decode(self, indices: jax.Array) -> jax.Array:
        """``[B, h, w]`` (or ``[B, T, h, w]``) token ids -> images ``[..., H, W, 3]`` in [-1, 1]."""
        folded, unfold = self._fold_grid(indices, None, "token indices")
        z_q = self.quantizer.lookup(folded)
        return unfold(jnp.clip(self._decode_folded(z_q), -1.0, 1.0))

    def decode_latents(self, z: jax.Array) -> jax.Array:
        """``z [B, h, w, D]`` (or ``[B, T, h, w, D]``) quantised latents -> UNclipped images."""
        folded, unfold = self._fold_grid(z, self.embed_dim, "latents")
        return unfold(self._decode_folded(folded))

    def _encode_folded(self, images: jax.Array) -> jax.Array:
        h = self.encoder(images.astype(self.dtype))
        return self.quant_conv(h).astype(jnp.float32)

    def _decode_folded(self, z: jax.Array) -> jax.Array:
        h = _constrain(self.post_quant_conv(z.astype(self.dtype)))
        return self.decoder(h).astype(jnp.float32)


def make_vqgan(variant: str = "lwm", **overrides) -> VQGAN:
    """``VQGAN`` of a named size, with field overrides (e.g. ``dtype=jnp.bfloat16``)."""
    return VQGAN(**{**vqgan_variant(variant), **overrides})
