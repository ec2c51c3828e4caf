"""Per-frame tf ops: decode, resize and seeded augmentation of images.

Images in standardised trajectories are encoded strings (JPEG/PNG; ``""`` where a dataset has no
such camera). These functions turn them into uint8 ``[..., S, S, 3]`` images inside tf.data:

* ``decode_image``: one encoded string -> uint8 ``[H, W, 3]`` (``""`` -> zeros). The decoded
  image must have rank 3 and exactly 3 channels (and ``expected_shape`` when given), else the
  pipeline fails with an ``ImageFormatError`` (raised by ``TrajDataset.iterator``; a tf
  ``InvalidArgumentError`` carrying the same text when iterating the raw tf.data.Dataset) naming
  ``context`` (dataset and key) and the shape found.
* ``resize``: uint8 ``[H, W, 3]`` -> uint8 ``[S, S, 3]``, bilinear with antialiasing (a no-op when
  the image already has that size).
* ``decode_and_resize``: both, over a string tensor of any shape ``[...]`` -> ``[..., S, S, 3]``.
* ``augment_frames``: seeded, stateless augmentation of the frames of ONE sample, uint8
  ``[F, S, S, 3]``: random resized crop (scale = area fraction, ratio = width/height), then
  brightness, contrast, saturation and hue, in that order. Every random parameter is drawn once
  per call and applied to all F frames alike (a pair or clip stays consistent, which the latent
  action quantizer relies on). The result is a pure function of ``(images, seed)``.

All ops are stateless (``tf.random.stateless_*``): the same seed gives the same output on any
machine and with any tf.data parallelism.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import tensorflow as tf


BAD_IMAGE_MARKER = "JAXVLA_BAD_IMAGE"


class ImageFormatError(ValueError):
    """A decoded image with the wrong rank, channel count or size; names dataset and key."""


def _shape_error(condition: tf.Tensor, context: Any, what: Any, shape: tf.Tensor) -> tf.Operation:
    shape_text = tf.strings.reduce_join(tf.strings.as_string(shape), separator=", ")
    message = tf.strings.join(
        [BAD_IMAGE_MARKER, context, ": ", what, ", got decoded shape [", shape_text, "]", BAD_IMAGE_MARKER]
    )
    return tf.debugging.Assert(condition, [message], summarize=-1)


def decode_image(
    encoded: tf.Tensor,
    *,
    empty_shape: Sequence[int] = (1, 1),
    expected_shape: Sequence[int] | tf.Tensor | None = None,
    context: str | tf.Tensor = "image",
) -> tf.Tensor:
    """One encoded image (scalar tf.string: JPEG, PNG, BMP or GIF) -> uint8 ``[H, W, 3]``.

    ``""`` (a camera the dataset lacks) decodes to zeros of ``empty_shape + (3,)``. An image that
    is already uint8 ``[H, W, 3]`` passes through (datasets that store raw pixels). The decoded
    image must be ``[H, W, 3]`` (a grayscale or RGBA image is an error, not silently converted)
    and equal ``expected_shape`` (``(H, W)`` or ``(H, W, 3)``, or an int tensor [2] where [0, 0]
    means unchecked) when given; ``context`` (a string or a scalar string tensor) names the
    dataset and key in the error.
    """
    encoded = tf.convert_to_tensor(encoded)
    if encoded.dtype == tf.uint8:
        image = encoded
    else:
        empty_hw = tuple(int(s) for s in empty_shape)

        def _decode() -> tf.Tensor:
            return tf.io.decode_image(encoded, channels=0, dtype=tf.uint8, expand_animations=False)

        def _empty() -> tf.Tensor:
            return tf.zeros(empty_hw + (3,), tf.uint8)

        image = tf.cond(tf.equal(tf.strings.length(encoded), 0), _empty, _decode)
    shape = tf.shape(image)
    checks = [
        _shape_error(
            tf.logical_and(tf.equal(tf.rank(image), 3), tf.equal(shape[-1], 3)),
            context,
            "expected an RGB image [H, W, 3] (3 channels)",
            shape,
        )
    ]
    if expected_shape is not None:
        if isinstance(expected_shape, (tf.Tensor, np.ndarray)):
            want = tf.cast(tf.convert_to_tensor(expected_shape)[:2], tf.int32)
        else:
            want = tf.constant([int(s) for s in tuple(expected_shape)[:2]], tf.int32)
        want_text = tf.strings.reduce_join(tf.strings.as_string(want), separator=", ")
        unchecked = tf.reduce_all(tf.equal(want, 0))  # [0, 0]: no expectation
        checks.append(
            _shape_error(
                tf.logical_or(unchecked, tf.reduce_all(tf.equal(shape[:2], want))),
                context,
                tf.strings.join(["expected image shape [", want_text, ", 3]"]),
                shape,
            )
        )
    with tf.control_dependencies(checks):
        image = tf.identity(image)
    return tf.ensure_shape(image, [None, None, 3])


def resize(image: tf.Tensor, size: int | Sequence[int], antialias: bool = True) -> tf.Tensor:
    """uint8 ``[H, W, 3]`` (or ``[N, H, W, 3]``) -> uint8 resized to ``size`` (int = square).

    Bilinear with antialiasing when shrinking; identity when the size already matches.
    """
    height, width = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    shape = tf.shape(image)

    def _resize() -> tf.Tensor:
        out = tf.image.resize(tf.cast(image, tf.float32), [height, width], method="bilinear", antialias=antialias)
        return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

    same = tf.logical_and(tf.equal(shape[-3], height), tf.equal(shape[-2], width))
    out = tf.cond(same, lambda: tf.identity(image), _resize)
    static = image.shape.as_list()[:-3] + [height, width, 3]
    return tf.ensure_shape(out, static)


def decode_and_resize(
    encoded: tf.Tensor,
    size: int,
    *,
    expected_shape: Sequence[int] | tf.Tensor | None = None,
    context: str | tf.Tensor = "image",
    antialias: bool = True,
) -> tf.Tensor:
    """Encoded images of any shape ``[...]`` -> uint8 ``[..., size, size, 3]``.

    ``""`` becomes zeros ``[size, size, 3]``. uint8 input ``[..., H, W, 3]`` is only resized.
    """
    size = int(size)
    if encoded.dtype == tf.uint8:
        lead = tf.shape(encoded)[:-3]
        flat = tf.reshape(encoded, tf.concat([[-1], tf.shape(encoded)[-3:]], 0))
        out = tf.map_fn(
            lambda im: resize(decode_image(im, expected_shape=expected_shape, context=context), size, antialias),
            flat,
            fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8),
        )
        return tf.reshape(out, tf.concat([lead, [size, size, 3]], 0))
    lead_static = encoded.shape.as_list()
    lead = tf.shape(encoded)
    flat = tf.reshape(encoded, [-1])

    def _one(item: tf.Tensor) -> tf.Tensor:
        image = decode_image(item, empty_shape=(size, size), expected_shape=expected_shape, context=context)
        return resize(image, size, antialias)

    out = tf.map_fn(_one, flat, fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
    out = tf.reshape(out, tf.concat([lead, [size, size, 3]], 0))
    return tf.ensure_shape(out, lead_static + [size, size, 3])


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the seeded augmentation (``None`` or 0 disables an op).

    crop_scale: (min, max) area fraction of the random resized crop.
    crop_ratio: (min, max) aspect ratio (width / height) of the crop, sampled log-uniformly.
    brightness: max absolute delta added in [0, 1] pixel units.
    contrast, saturation: (min, max) multiplicative factors.
    hue: max absolute hue shift (fraction of the colour wheel, <= 0.5).
    """

    crop_scale: tuple[float, float] | None = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.1
    contrast: tuple[float, float] | None = (0.9, 1.1)
    saturation: tuple[float, float] | None = (0.9, 1.1)
    hue: float = 0.05

    @classmethod
    def from_mapping(cls, values) -> "AugmentConfig":
        """From a dict / ConfigDict with any subset of the fields (unknown keys are an error)."""
        if values is None:
            return cls()
        values = dict(values)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"augmentation: unknown keys {unknown}; known: {sorted(names)}")

        def pair(value):
            if value is None or value == () or value == []:
                return None
            return tuple(float(v) for v in value)

        out = {}
        for key, value in values.items():
            if key in ("brightness", "hue"):
                out[key] = float(value or 0.0)
            elif key == "crop_ratio":
                out[key] = pair(value) or (1.0, 1.0)
            else:
                out[key] = pair(value)
        return cls(**out)


def _uniform(seed: tf.Tensor, low: float, high: float) -> tf.Tensor:
    return tf.random.stateless_uniform([], seed, minval=low, maxval=high, dtype=tf.float32)


def augment_frames(images: tf.Tensor, seed: tf.Tensor, config: AugmentConfig | None = None) -> tf.Tensor:
    """Seeded augmentation of the frames of one sample: uint8 ``[F, H, W, 3]`` -> same shape.

    ``seed`` is an int32/int64 tensor of shape [2] (stateless RNG seed). The same crop box and
    colour factors are applied to all F frames.
    """
    config = config or AugmentConfig()
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4:
        raise ValueError(f"augment_frames expects [F, H, W, 3] frames, got shape {images.shape}")
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=8)
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    x = tf.cast(images, tf.float32) / 255.0

    if config.crop_scale is not None:
        scale = _uniform(seeds[0], config.crop_scale[0], config.crop_scale[1])
        log_lo = tf.math.log(tf.constant(config.crop_ratio[0], tf.float32))
        log_hi = tf.math.log(tf.constant(config.crop_ratio[1], tf.float32))
        ratio = tf.exp(_uniform(seeds[1], 0.0, 1.0) * (log_hi - log_lo) + log_lo)
        # Box sides as fractions of the image sides: w * h = scale, w / h = ratio (square pixels
        # relative to the image's own aspect), each clipped to the image.
        crop_w = tf.minimum(tf.sqrt(scale * ratio), 1.0)
        crop_h = tf.minimum(tf.sqrt(scale / ratio), 1.0)
        top = _uniform(seeds[2], 0.0, 1.0) * (1.0 - crop_h)
        left = _uniform(seeds[3], 0.0, 1.0) * (1.0 - crop_w)
        box = tf.stack([top, left, top + crop_h, left + crop_w])
        frames = tf.shape(x)[0]
        x = tf.image.crop_and_resize(
            x,
            tf.tile(box[None], [frames, 1]),
            tf.range(frames),
            tf.stack([height, width]),
            method="bilinear",
        )
    if config.brightness:
        x = tf.clip_by_value(x + _uniform(seeds[4], -config.brightness, config.brightness), 0.0, 1.0)
    if config.contrast is not None:
        x = tf.clip_by_value(tf.image.adjust_contrast(x, _uniform(seeds[5], *config.contrast)), 0.0, 1.0)
    if config.saturation is not None:
        x = tf.clip_by_value(tf.image.adjust_saturation(x, _uniform(seeds[6], *config.saturation)), 0.0, 1.0)
    if config.hue:
        x = tf.clip_by_value(tf.image.adjust_hue(x, _uniform(seeds[7], -config.hue, config.hue)), 0.0, 1.0)
    out = tf.cast(tf.round(x * 255.0), tf.uint8)
    return tf.ensure_shape(out, images.shape)
