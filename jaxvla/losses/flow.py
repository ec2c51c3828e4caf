"""Weight-free, differentiable optical flow in JAX and ViPRA's flow-consistency loss.

ViPRA regularises its latent-action reconstructions by asking that the optical flow between
consecutive *reconstructed* frames match the flow between the consecutive *real* frames. The
published recipe uses RAFT; no RAFT weights are available offline, so the default ``flow_fn`` is
a classical estimator written with differentiable JAX ops (any ``FlowFn``, e.g. a RAFT port, can
replace it).

Flow convention (used everywhere in this module)
------------------------------------------------
``flow[b, y, x] = (dx, dy)`` in pixels, x along width (axis 2), y along height (axis 1), such that

    frame_b[y + dy, x + dx] ~= frame_a[y, x]

i.e. the content at pixel (x, y) of ``frame_a`` has moved to (x + dx, y + dy) in ``frame_b``.
Consequently ``warp(frame_b, flow) ~= frame_a`` (backward warping). A scene translating right by
1.3 px and up by 0.7 px between a and b has flow (+1.3, -0.7) everywhere.

Estimator (``estimate_flow``)
-----------------------------
A classical coarse-to-fine estimator over an average-pooled image pyramid (3 levels at 64 px):
    1. coarsest level: a local correlation search. Frames are local-contrast normalised, so the
       per-pixel product averaged over a window approximates zero-mean normalised
       cross-correlation (invariant to brightness and contrast); a cost volume over integer
       displacements within ``search_radius`` is turned into a flow by a soft-argmax
       (softmax over displacements at ``temperature``) - differentiable, unlike an argmax.
       Its bias (it returns the centre of mass of a wide or lopsided correlation peak) is
       removed by subtracting the same soft-argmax on frame_a's autocorrelation, so identical
       frames give exactly zero flow;
    2. every level, coarse to fine: the flow is upsampled and refined variationally
       (Horn-Schunck with locally aggregated data term, "combined local-global"): frame_b is
       warped by the current flow (bilinear), brightness constancy is linearised there and the
       update minimising data term + smoothness is found by Jacobi iterations; a few warps per
       level. This gives sub-pixel precision and fills textureless regions by diffusion from
       textured ones (the correlation alone is biased to integer displacements and is blind in
       flat regions).
Every step is made of differentiable ops (gathers, windowed sums, a 2x2 solve per pixel,
softmax), so the flow is differentiable w.r.t. both frames, and loops are ``lax.fori_loop`` so
compile time does not grow with the iteration counts. Reverse-mode differentiates through all
iterations (exact gradient of the estimator, not an implicit-function approximation).

Weak spots (as for any brightness-constancy method): occlusions, motion boundaries (smoothed
over a few pixels), periodic textures with motion near half their period, and large motions
beyond ~``search_radius * 2**(levels-1)`` px (12 px at 64 px with the defaults).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxvla.input_checks import check_array

FlowFn = Callable[[jax.Array, jax.Array], jax.Array]
"""(frame_a [B,H,W,C], frame_b [B,H,W,C]) -> flow [B,H,W,2] in pixels, this module's convention."""

# Coarsest pyramid level is kept at least this many pixels on its short side: a correlation
# search with radius 3 on a smaller image is mostly border.
_MIN_PYRAMID_SIDE = 12
# Largest flow update (px at the level) of one linearised refinement step: brightness constancy
# linearised around the current flow is only trustworthy about a pixel or two away.
_MAX_REFINE_STEP = 2.0
# Absolute floors, in squared intensity units, for the contrast normalisation and the smoothness
# weight (both are otherwise relative to the frames' own contrast). They assume intensities of
# order 1 ([0,1] or [-1,1]) and only matter for (nearly) flat frames, e.g. an untrained
# decoder's output, where a purely relative floor would make the flow's gradient explode.
_VARIANCE_FLOOR = 1e-4
_GRADIENT_ENERGY_FLOOR = 1e-4


# --------------------------------------------------------------------------------------------
# Sampling and warping
# --------------------------------------------------------------------------------------------


def bilinear_sample(image: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """Samples ``image`` at real-valued pixel coordinates, edge-clamped.

    Args:
        image: [B,H,W,C].
        x, y: [B,h,w] coordinates in pixels (x along W, y along H; pixel centres at integers).
    Returns:
        [B,h,w,C]. Differentiable w.r.t. ``image`` and, inside the image, w.r.t. ``x`` and ``y``.
    """
    batch, height, width, channels = image.shape
    x = jnp.clip(x, 0.0, width - 1.0)
    y = jnp.clip(y, 0.0, height - 1.0)
    x0 = jnp.floor(jax.lax.stop_gradient(x))
    y0 = jnp.floor(jax.lax.stop_gradient(y))
    wx = (x - x0)[..., None]
    wy = (y - y0)[..., None]
    x0i = x0.astype(jnp.int32)
    y0i = y0.astype(jnp.int32)
    # At the last row/column the weight of the +1 neighbour is 0; clamping keeps the index valid.
    x1i = jnp.minimum(x0i + 1, width - 1)
    y1i = jnp.minimum(y0i + 1, height - 1)
    # One gather for the four neighbours (fewer ops to compile than four gathers).
    corners = jnp.stack([y0i * width + x0i, y0i * width + x1i, y1i * width + x0i,
                         y1i * width + x1i], axis=-1)
    values = jnp.take_along_axis(
        image.reshape(batch, height * width, channels), corners.reshape(batch, -1, 1), axis=1
    ).reshape(*x.shape, 4, channels)
    top = values[..., 0, :] * (1.0 - wx) + values[..., 1, :] * wx
    bottom = values[..., 2, :] * (1.0 - wx) + values[..., 3, :] * wx
    return top * (1.0 - wy) + bottom * wy


def warp(image: jax.Array, flow: jax.Array) -> jax.Array:
    """Backward warp: ``out[b, y, x] = image[b, y + dy, x + dx]`` (bilinear, edge-clamped).

    Args:
        image: [B,H,W,C] (frame_b).
        flow: [B,H,W,2] as (dx, dy) in pixels (flow from frame_a to frame_b).
    Returns:
        [B,H,W,C], approximately frame_a where the flow is right and nothing is occluded.
    """
    batch, height, width, _ = image.shape
    if flow.shape != (batch, height, width, 2):
        raise ValueError(f"flow must be [B,H,W,2] = {(batch, height, width, 2)}, got {flow.shape}")
    grid_y, grid_x = jnp.meshgrid(
        jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij"
    )
    return bilinear_sample(image, grid_x + flow[..., 0], grid_y + flow[..., 1])


# --------------------------------------------------------------------------------------------
# Building blocks of the estimator
# --------------------------------------------------------------------------------------------


def _downsample2x(images: jax.Array) -> jax.Array:
    """2x2 average pooling. [B,H,W,C] -> [B,H//2,W//2,C] (an odd last row/column is dropped)."""
    batch, height, width, channels = images.shape
    h2, w2 = height // 2, width // 2
    cropped = images[:, : 2 * h2, : 2 * w2]
    return cropped.reshape(batch, h2, 2, w2, 2, channels).mean(axis=(2, 4))


def _upsample_flow(flow: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize of a flow field to [B,height,width,2], rescaling the vectors to match.

    Half-pixel-centred resizing matches the 2x2 average pooling that built the pyramid.
    """
    batch, h, w, _ = flow.shape
    resized = jax.image.resize(flow, (batch, height, width, 2), method="bilinear")
    return resized * jnp.asarray([width / w, height / h], jnp.float32)


def _local_contrast_normalise(images: jax.Array, window: int) -> jax.Array:
    """Subtracts the local mean and divides by the local colour standard deviation.

    [B,H,W,C] -> [B,H,W,C]. Products of two such images, averaged over a window, approximate the
    zero-mean normalised cross-correlation (ZNCC) of the window's colour patches: a matching
    cost invariant to brightness and contrast. The variance floor (1% of the frame's mean local
    variance plus a small absolute floor) sends flat regions to ~0: "no preferred match".
    """
    mean = _box_mean(images, window)
    variance = jnp.sum(_box_mean(images * images, window) - mean * mean, axis=-1, keepdims=True)
    variance = jnp.maximum(variance, 0.0)
    floor = jax.lax.stop_gradient(
        1e-2 * jnp.mean(variance, axis=(1, 2, 3), keepdims=True) + _VARIANCE_FLOOR)
    return (images - mean) * jax.lax.rsqrt(variance + floor)


def _expected_displacement(normalised_a: jax.Array, normalised_b: jax.Array, radius: int,
                           temperature: float, window: int) -> jax.Array:
    """Soft-argmax over a local correlation cost volume (integer displacements).

    Args:
        normalised_a, normalised_b: [B,H,W,C] local-contrast-normalised frames.
        radius: displacements (dx, dy) in [-radius, radius]^2 are scored.
        temperature: softmax temperature on the (ZNCC-like, ~[-1,1]) correlation.
        window: side of the window the per-pixel correlation is averaged over.
    Returns:
        [B,H,W,2]: the expected displacement (dx, dy) under softmax(correlation / temperature).
    """
    _, height, width, _ = normalised_b.shape
    side = 2 * radius + 1
    # Zero padding: normalised frames are zero-mean, so outside the frame nothing matches (and a
    # constant pad differentiates more cheaply than an edge-replicating one).
    padded = jnp.pad(normalised_b, ((0, 0), (radius, radius), (radius, radius), (0, 0)))
    # Two stacks of `side` slices rather than side**2 slices: fewer ops for XLA to compile.
    columns = jnp.stack([padded[:, :, dx : dx + width] for dx in range(side)], axis=0)
    views = jnp.stack([columns[:, :, dy : dy + height] for dy in range(side)], axis=0)
    # views[j, i, b, y, x] = normalised_b[b, y + j - radius, x + i - radius]
    correlation = jnp.sum(views * normalised_a, axis=-1)  # [side(dy), side(dx), B, H, W]
    correlation = correlation.reshape(side * side, *correlation.shape[2:])
    correlation = jnp.moveaxis(_box_mean(jnp.moveaxis(correlation, 0, -1), window), -1, 0)
    probabilities = jax.nn.softmax(correlation / temperature, axis=0)  # [D,B,H,W]
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    grid_dy, grid_dx = jnp.meshgrid(offsets, offsets, indexing="ij")
    flow_x = jnp.tensordot(grid_dx.reshape(-1), probabilities, axes=1)
    flow_y = jnp.tensordot(grid_dy.reshape(-1), probabilities, axes=1)
    return jnp.stack([flow_x, flow_y], axis=-1)


def _correlation_search(frame_a: jax.Array, frame_b: jax.Array, radius: int, temperature: float,
                        window: int) -> jax.Array:
    """Bias-corrected soft-argmax flow [B,H,W,2] from frame_a to frame_b ([B,H,W,C] each).

    A soft-argmax is biased wherever the correlation peak is wide or lopsided (along edges, in
    smooth or flat regions): it returns the peak's centre of mass, not its location. That bias
    is a property of frame_a's own structure, so it is measured by the same soft-argmax on the
    autocorrelation (frame_a against itself, whose true displacement is 0) and subtracted.
    Identical frames therefore give exactly zero flow, and a frame pair and its reverse give
    near-opposite flows.
    """
    normalised_a = _local_contrast_normalise(frame_a, window)
    normalised_b = _local_contrast_normalise(frame_b, window)
    matched = _expected_displacement(normalised_a, normalised_b, radius, temperature, window)
    bias = _expected_displacement(normalised_a, normalised_a, radius, temperature, window)
    return matched - bias


def _window_counts(height: int, width: int, window: int) -> np.ndarray:
    """Number of in-image pixels in the window around each pixel. [H,W] float32 (numpy, static)."""
    radius = window // 2
    def counts_1d(length: int) -> np.ndarray:
        index = np.arange(length)
        return np.minimum(index + radius, length - 1) - np.maximum(index - radius, 0) + 1

    return np.outer(counts_1d(height), counts_1d(width)).astype(np.float32)


def _box_mean(values: jax.Array, window: int) -> jax.Array:
    """Mean over the in-image part of a window x window neighbourhood. [B,H,W,...] -> same.

    One ``reduce_window`` sum divided by a static count map: cheap to compile and to
    differentiate (a plain pad + slices formulation costs several times more compile time).
    """
    if window <= 1:
        return values
    height, width = values.shape[1:3]
    dims = (1, window, window) + (1,) * (values.ndim - 3)
    total = jax.lax.reduce_window(values, 0.0, jax.lax.add, dims, (1,) * values.ndim, "SAME")
    counts = _window_counts(height, width, window)
    counts = counts.reshape((1, height, width) + (1,) * (values.ndim - 3))
    return total / counts


def _image_gradients(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Central differences, one-sided at the border. [B,H,W,C] -> (d/dx, d/dy), each [B,H,W,C].

    Neighbours come from concatenated slices (edge replication) rather than ``jnp.pad(mode=
    "edge")``, whose gradient is several times more expensive to compile.
    """
    right = jnp.concatenate([images[:, :, 1:], images[:, :, -1:]], axis=2)
    left = jnp.concatenate([images[:, :, :1], images[:, :, :-1]], axis=2)
    below = jnp.concatenate([images[:, 1:], images[:, -1:]], axis=1)
    above = jnp.concatenate([images[:, :1], images[:, :-1]], axis=1)
    return 0.5 * (right - left), 0.5 * (below - above)


def _refine_at_level(frame_a: jax.Array, frame_b: jax.Array, flow: jax.Array, *, warps: int,
                     iterations: int, window: int, prior: jax.Array, max_step: float) -> jax.Array:
    """Variational (combined local-global Horn-Schunck) refinement of ``flow`` [B,H,W,2].

    Each of ``warps`` outer steps warps frame_b by the current flow and linearises brightness
    constancy there, frame_b(p + flow + delta) ~ warped_b(p) + grad . delta ~ frame_a(p), then
    minimises over the update field ``delta``
        sum_p  delta^T J delta + 2 delta^T e  +  prior * |grad_xy (flow + delta)|^2
    where J, e are the normal equations of the linearised brightness constancy, summed over
    colour channels and a ``window`` neighbourhood. Jacobi iterations solve it: with the
    discrete Laplacian mean_3x3(f) - f, each is a 2x2 solve per pixel,
        (J + prior I) delta = prior * (mean_3x3(flow + delta) - flow) - e.
    Where the frame is flat (J ~ 0) the flow relaxes to its neighbours' mean, so it diffuses
    from textured regions into textureless ones; where it is textured the data term dominates.
    The linearisation is fixed within an outer step, so the inner problem is convex and the
    iterations converge; the update is softly clamped (tanh) to ``max_step`` px because the
    linearisation is only valid that far. ``prior``: [B,1,1].
    """
    def linearise_and_solve(_, flow: jax.Array) -> jax.Array:
        warped_b = warp(frame_b, flow)
        # Both frames' mean gradient (symmetric linearisation): unbiased for pure translations.
        grad_x, grad_y = _image_gradients(0.5 * (warped_b + frame_a))
        temporal = warped_b - frame_a
        products = jnp.stack(
            [jnp.sum(grad_x * grad_x, -1), jnp.sum(grad_y * grad_y, -1),
             jnp.sum(grad_x * grad_y, -1), jnp.sum(grad_x * temporal, -1),
             jnp.sum(grad_y * temporal, -1)], axis=-1)
        jxx, jyy, jxy, ex, ey = jnp.moveaxis(_box_mean(products, window), -1, 0)
        mxx = jxx + prior
        myy = jyy + prior
        determinant = mxx * myy - jxy * jxy  # > 0: J is positive semi-definite and prior > 0

        def jacobi(_, delta: jax.Array) -> jax.Array:
            pull = prior[..., None] * (_box_mean(flow + delta, 3) - flow)
            rhs_x = pull[..., 0] - ex
            rhs_y = pull[..., 1] - ey
            return jnp.stack([(myy * rhs_x - jxy * rhs_y) / determinant,
                              (mxx * rhs_y - jxy * rhs_x) / determinant], axis=-1)

        delta = jax.lax.fori_loop(0, iterations, jacobi, jnp.zeros_like(flow))
        return flow + max_step * jnp.tanh(delta / max_step)

    # Loops, not unrolled: compile time stays flat in the number of warps and iterations.
    return jax.lax.fori_loop(0, warps, linearise_and_solve, flow)


def _prior_weight(frame_a: jax.Array, frame_b: jax.Array, smoothness: float) -> jax.Array:
    """Smoothness weight [B,1,1] in units of the pair's mean squared gradient.

    Relative units make the estimator largely independent of the frames' contrast and of the
    pyramid level. It is a constant (stop_gradient): it conditions the solve, it is no signal.
    """
    grad_x, grad_y = _image_gradients(0.5 * (frame_a + frame_b))
    gradient_energy = jnp.mean(jnp.sum(grad_x**2 + grad_y**2, -1), axis=(1, 2))
    return jax.lax.stop_gradient(
        smoothness * (gradient_energy + _GRADIENT_ENERGY_FLOOR))[:, None, None]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@functools.partial(
    jax.jit,
    static_argnames=("num_levels", "search_radius", "temperature", "match_window",
                     "refine_warps", "refine_iterations", "refine_window", "smoothness"),
)
def estimate_flow(frame_a: jax.Array, frame_b: jax.Array, *, num_levels: int = 3,
                  search_radius: int = 3, temperature: float = 0.05, match_window: int = 5,
                  refine_warps: int = 2, refine_iterations: int = 10, refine_window: int = 3,
                  smoothness: float = 0.1) -> jax.Array:
    """Optical flow from frame_a to frame_b: ``frame_b[y + dy, x + dx] ~= frame_a[y, x]``.

    Args:
        frame_a, frame_b: [B,H,W,C] (C = 3 for RGB), intensities of order 1 such as [-1,1] or
            [0,1] (the matching cost is normalised and the smoothness weight scales with image
            contrast; only the small absolute floors for flat frames assume that range).
        num_levels: pyramid levels (2x average pooling between them); reduced automatically so
            the coarsest level keeps >= 12 px. The search at the coarsest level reaches about
            ``search_radius * 2**(num_levels-1)`` px (12 px with the defaults).
        search_radius: correlation search radius in pixels at the coarsest level.
        temperature: softmax temperature of the soft-argmax over normalised correlations.
        match_window: side of the window for local contrast normalisation and correlation.
        refine_warps: re-linearisations (warps) of the variational refinement per level; the
            refinement gives sub-pixel precision and fills textureless regions.
        refine_iterations: Jacobi iterations per warp (each lets flow diffuse ~1 px further).
        refine_window: side of the window over which brightness constancy is aggregated.
        smoothness: weight of the flow smoothness prior, relative to the mean squared image
            gradient of the pair (larger = smoother flow, slower to follow fine motion).
    Returns:
        flow [B,H,W,2] float32 as (dx, dy) in pixels. Differentiable w.r.t. both frames; jitted
        (options are static).
    """
    if frame_a.shape != frame_b.shape or frame_a.ndim != 4:
        raise ValueError(f"frames must be two [B,H,W,C] arrays of equal shape, got "
                         f"{frame_a.shape} and {frame_b.shape}")
    # Intensities of order 1 (uint8 would be read as 0..255); the range is not checked (a
    # reconstruction may be unclipped; jaxvla.input_checks).
    for key, frame in (("frame_a", frame_a), ("frame_b", frame_b)):
        check_array(frame, where="estimate_flow", key=key, dtype="floating",
                    note="[B, H, W, C] intensities of order 1, e.g. [-1, 1]")
    frame_a = frame_a.astype(jnp.float32)
    frame_b = frame_b.astype(jnp.float32)
    height, width = frame_a.shape[1:3]

    levels = 1
    while levels < num_levels and min(height, width) >> levels >= _MIN_PYRAMID_SIDE:
        levels += 1
    pyramid_a, pyramid_b = [frame_a], [frame_b]
    for _ in range(levels - 1):
        pyramid_a.append(_downsample2x(pyramid_a[-1]))
        pyramid_b.append(_downsample2x(pyramid_b[-1]))

    # Large motions: a correlation search on the coarsest level, where a few pixels of radius
    # cover a large part of the frame and the cost volume is small.
    flow = _correlation_search(pyramid_a[-1], pyramid_b[-1], search_radius, temperature,
                               match_window)
    # Precision and dense fill-in: variational refinement from coarse to fine.
    for level_a, level_b in zip(reversed(pyramid_a), reversed(pyramid_b)):
        level_height, level_width = level_a.shape[1:3]
        if flow.shape[1:3] != (level_height, level_width):
            flow = _upsample_flow(flow, level_height, level_width)
        flow = _refine_at_level(
            level_a, level_b, flow, warps=refine_warps, iterations=refine_iterations,
            window=refine_window, prior=_prior_weight(level_a, level_b, smoothness),
            max_step=_MAX_REFINE_STEP)
    return flow


def flow_consistency_loss(recon_frames: jax.Array, real_frames: jax.Array,
                          flow_fn: FlowFn = estimate_flow) -> jax.Array:
    """ViPRA flow consistency: L1 between flows of reconstructed and of real consecutive frames.

    For every t in [0, T-2] the forward flow (frame t -> t+1) and the backward flow
    (frame t+1 -> t) are computed for both clips; the real clip's flows are targets
    (``stop_gradient``). All 2*B*(T-1) pairs go through ``flow_fn`` in a single batched call.

    Args:
        recon_frames: [B,T,H,W,3] reconstructed clip (gradients flow into it).
        real_frames: [B,T,H,W,3] ground-truth clip, same shape and value range.
        flow_fn: ``FlowFn``; (a [N,H,W,3], b [N,H,W,3]) -> flow [N,H,W,2].
    Returns:
        scalar float32: mean over pairs, directions, pixels and both components of
        |flow_recon - flow_real|, in pixels.
    """
    if recon_frames.shape != real_frames.shape or recon_frames.ndim != 5:
        raise ValueError(f"expected two [B,T,H,W,3] clips of equal shape, got "
                         f"{recon_frames.shape} and {real_frames.shape}")
    if recon_frames.shape[1] < 2:
        raise ValueError(f"flow consistency needs T >= 2 frames, got T={recon_frames.shape[1]}")
    for key, frames in (("recon_frames", recon_frames), ("real_frames", real_frames)):
        check_array(frames, where="flow_consistency_loss", key=key, dtype="floating",
                    note="[B, T, H, W, 3] on the [-1, 1] scale (not range-checked: reconstructions may be unclipped)")

    def consecutive_pairs(frames: jax.Array) -> tuple[jax.Array, jax.Array]:
        # [B,T,H,W,C] -> sources and targets [2*B*(T-1),H,W,C]: forward pairs then backward.
        current = frames[:, :-1].reshape(-1, *frames.shape[2:])
        following = frames[:, 1:].reshape(-1, *frames.shape[2:])
        return (jnp.concatenate([current, following], axis=0),
                jnp.concatenate([following, current], axis=0))

    recon_flow = flow_fn(*consecutive_pairs(recon_frames.astype(jnp.float32)))
    real_flow = jax.lax.stop_gradient(
        flow_fn(*consecutive_pairs(jax.lax.stop_gradient(real_frames.astype(jnp.float32))))
    )
    return jnp.mean(jnp.abs(recon_flow - real_flow))


__all__ = ("FlowFn", "bilinear_sample", "estimate_flow", "flow_consistency_loss", "warp")
