"""Tests of the weight-free optical flow estimator and ViPRA's flow-consistency loss.

The accuracy tests run on one reference frame [H,W,3] and a copy of it translated by a known
sub-pixel amount. ``reference_frame`` renders a synthetic scene; any [H,W,3] frame (e.g. a
rendered Meta-World observation) can be returned there instead: nothing else depends on how the
frame was made.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvla.losses.flow import estimate_flow, flow_consistency_loss, warp

TRUE_SHIFT = (1.3, -0.7)  # (dx, dy) px: frame_b(x + dx, y + dy) = frame_a(x, y)


def render_synthetic_scene(size: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth, textured scene [size,size,3] in [-1,1]: colour blobs over a gradient background,
    anti-aliased coloured rectangles (hard-ish edges, flat interiors) and a striped patch."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    image = rng.uniform(0.2, 0.5, 3) + 0.2 * (x / size)[..., None] * rng.uniform(-1, 1, 3)
    for _ in range(14):
        cx, cy = rng.uniform(0, size, 2)
        sigma = rng.uniform(3, 9)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
        image = image + blob[..., None] * rng.uniform(-0.4, 0.4, 3)

    def soft_step(t):  # ~1 px wide edge: sharp like a rendered object, yet band-limited
        return 1.0 / (1.0 + np.exp(-t / 0.6))

    for _ in range(6):
        x0, y0 = rng.uniform(0, 0.8 * size, 2)
        width, height = rng.uniform(6, 20, 2)
        mask = (soft_step(x - x0) * soft_step(x0 + width - x)
                * soft_step(y - y0) * soft_step(y0 + height - y))
        image = image * (1 - mask[..., None]) + mask[..., None] * rng.uniform(0, 1, 3)
    centre_weight = np.exp(-((x - size / 2) ** 2 + (y - size / 2) ** 2) / (2 * (size / 5) ** 2))
    stripes = 0.15 * (np.sin(0.45 * x + 0.3 * y) * centre_weight)[..., None]
    return (np.clip(image + stripes, 0, 1) * 2 - 1).astype(np.float32)


def translate_frame(frame: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """``out(x + dx, y + dy) = frame(x, y)`` for any [H,W,C] frame, by an exact Fourier shift.

    The frame is mirrored to 2H x 2W first so that its periodic extension is continuous: no
    wrap-around edge rings into the image (only the border strip sees mirrored content).
    """
    height, width = frame.shape[:2]
    mirrored = np.concatenate([frame, frame[::-1]], axis=0)
    mirrored = np.concatenate([mirrored, mirrored[:, ::-1]], axis=1)
    freq_y = np.fft.fftfreq(2 * height)[:, None]
    freq_x = np.fft.fftfreq(2 * width)[None, :]
    phase = np.exp(-2j * np.pi * (freq_x * dx + freq_y * dy))[..., None]
    shifted = np.fft.ifft2(np.fft.fft2(mirrored, axes=(0, 1)) * phase, axes=(0, 1)).real
    return shifted[:height, :width].astype(np.float32)


@pytest.fixture(scope="module")
def reference_frame() -> np.ndarray:
    """[H,W,3] frame the accuracy tests run on (replaceable by a real rendered frame)."""
    return render_synthetic_scene(64, seed=0)


def interior(field: np.ndarray) -> np.ndarray:
    """Drops a border (1/8 of the side, >= 8 px) where content enters or leaves the frame."""
    border = max(8, field.shape[0] // 8)
    return field[border:-border, border:-border]


@pytest.fixture(scope="module")
def flows(reference_frame):
    """Flows a->b, b->a and a->a from ONE batched call (one compilation for all tests)."""
    frame_a = reference_frame
    frame_b = translate_frame(frame_a, *TRUE_SHIFT)
    sources = np.stack([frame_a, frame_b, frame_a])
    targets = np.stack([frame_b, frame_a, frame_a])
    flow = np.asarray(estimate_flow(sources, targets))
    assert flow.shape == (3, *frame_a.shape[:2], 2) and flow.dtype == np.float32
    return {"ab": flow[0], "ba": flow[1], "aa": flow[2], "frame_a": frame_a, "frame_b": frame_b}


def test_translate_frame_convention(reference_frame):
    """The test's own shifter: an integer shift moves content by exactly that many pixels."""
    shifted = translate_frame(reference_frame, 2.0, -1.0)
    np.testing.assert_allclose(shifted[5:-5, 7:-5], reference_frame[6:-4, 5:-7], atol=1e-4)


def test_warp_convention_matches_flow_definition(flows):
    """warp(frame_b, true flow) ~= frame_a: the (dx, dy) convention of the module."""
    true_flow = np.broadcast_to(np.float32(TRUE_SHIFT), (1, *flows["frame_a"].shape[:2], 2))
    warped = np.asarray(warp(flows["frame_b"][None], true_flow))[0]
    unwarped_error = np.abs(interior(flows["frame_b"] - flows["frame_a"])).mean()
    warped_error = np.abs(interior(warped - flows["frame_a"])).mean()
    assert warped_error < 0.1 * unwarped_error


def test_recovers_subpixel_translation(flows):
    flow = interior(flows["ab"])
    mean_error = np.abs(flow.reshape(-1, 2).mean(axis=0) - np.float32(TRUE_SHIFT))
    endpoint_error = np.linalg.norm(flow - np.float32(TRUE_SHIFT), axis=-1)
    assert mean_error.max() < 0.5, (mean_error, flow.reshape(-1, 2).mean(axis=0))
    assert np.median(endpoint_error) < 0.5


def test_forward_backward_consistency(flows):
    """For a translation, flow(a, b) ~= -flow(b, a) at every interior pixel."""
    mismatch = np.linalg.norm(interior(flows["ab"] + flows["ba"]), axis=-1)
    assert mismatch.mean() < 0.5
    backward_mean = interior(flows["ba"]).reshape(-1, 2).mean(axis=0)
    assert np.abs(backward_mean + np.float32(TRUE_SHIFT)).max() < 0.5


def test_identical_frames_give_zero_flow(flows):
    assert np.abs(flows["aa"]).max() < 1e-3


def test_loss_pairs_consecutive_frames_both_ways():
    """With a stand-in FlowFn (any callable (a, b) -> flow can replace the estimator), the loss
    is the mean |flow_fn(recon pairs) - flow_fn(real pairs)| over forward and backward pairs."""

    def difference_flow(a, b):  # [N,H,W,3] -> [N,H,W,2], antisymmetric like a real flow
        return (b - a)[..., :2]

    rng = np.random.default_rng(1)
    recon = rng.normal(size=(2, 3, 4, 4, 3)).astype(np.float32)
    real = rng.normal(size=(2, 3, 4, 4, 3)).astype(np.float32)
    forward = lambda clip: (clip[:, 1:] - clip[:, :-1])[..., :2]  # noqa: E731
    expected = np.mean(np.abs(forward(recon) - forward(real)))  # backward = -forward: same L1
    loss = flow_consistency_loss(jnp.asarray(recon), jnp.asarray(real), flow_fn=difference_flow)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    # The real clip is a target: no gradient reaches it.
    grad_real = jax.grad(lambda r: flow_consistency_loss(recon, r, flow_fn=difference_flow))(real)
    assert np.all(np.asarray(grad_real) == 0)
    with pytest.raises(ValueError):
        flow_consistency_loss(recon[:, :1], real[:, :1], flow_fn=difference_flow)


def test_flow_consistency_loss_jits_and_differentiates():
    """jit(value_and_grad(loss)) with the default estimator: zero for a perfect reconstruction,
    positive with finite, non-zero gradients w.r.t. the reconstruction otherwise."""
    size = 16  # one pyramid level keeps compilation short; otherwise the default code path
    frame = render_synthetic_scene(size, seed=3)
    clip = [frame, translate_frame(frame, 1.0, 0.5), translate_frame(frame, 2.0, 1.0)]
    real = np.stack(clip)[None]  # [B=1, T=3, H, W, 3]
    noise = np.random.default_rng(2).normal(scale=0.05, size=real.shape).astype(np.float32)
    loss_and_grad = jax.jit(jax.value_and_grad(flow_consistency_loss))

    perfect_loss, _ = loss_and_grad(jnp.asarray(real), jnp.asarray(real))
    assert abs(float(perfect_loss)) < 1e-5  # not bit-exact: the two flows compile differently

    loss, grad = loss_and_grad(jnp.asarray(real + noise), jnp.asarray(real))
    grad = np.asarray(grad)
    assert float(loss) > 0.0
    assert grad.shape == real.shape
    assert np.all(np.isfinite(grad))
    assert np.abs(grad).max() > 0.0
    # Every frame takes part in some pair, so every frame receives gradient.
    assert np.all(np.abs(grad).reshape(real.shape[1], -1).max(axis=1) > 0.0)


def test_recovers_subpixel_translation_of_a_rendered_metaworld_frame(metaworld_dataset):
    from jaxvla.data.pipeline import trajectory_frames

    data = {"dataset": "metaworld", "data_dir": str(metaworld_dataset["version_dir"])}
    _, images = next(trajectory_frames(data, "train", image_size=64))
    frame_a = images[0].astype(np.float32) / 127.5 - 1.0  # a real 64 px render [64, 64, 3]
    frame_b = translate_frame(frame_a, *TRUE_SHIFT)
    flow_fn = jax.jit(estimate_flow)
    flow = np.asarray(flow_fn(frame_a[None], frame_b[None]))[0]
    # Flat regions of the render carry no motion signal: score where the image has texture.
    gy, gx = np.gradient(frame_a.mean(-1))
    textured = interior(np.hypot(gx, gy) > 0.02)
    estimate = interior(flow)[textured]
    assert textured.sum() > 200
    mean_error = np.abs(estimate.mean(axis=0) - np.float32(TRUE_SHIFT))
    assert mean_error.max() < 0.5, estimate.mean(axis=0)
    grad = jax.grad(lambda b: jnp.sum(flow_fn(jnp.asarray(frame_a)[None], b)))(jnp.asarray(frame_b)[None])
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) > 0
