"""Action-free human video (Something-Something-v2 layout) as standardised trajectories.

A folder of raw videos becomes trajectories of the schema in ``jaxvla/data/schema.py``: frames
are decoded with PyAV, resampled to a fixed frame rate, re-encoded as JPEG (so they take the same
decode path as RLDS images) and given zero actions with ``has_action`` False.

Frame-rate resampling (``read_video(..., target_fps=f)``): output frame ``k`` is the decoded frame
whose presentation time (relative to the first decoded frame) is nearest to ``k / f`` seconds, for
every ``k`` with ``k / f <= t_last`` (the last frame's time). Times are compared as exact
fractions, and a tie goes to the earlier frame. Lowering the rate drops frames; raising it repeats
them. Without ``target_fps`` every decoded frame is kept at the stream's own rate.

The frame index within a trajectory (``observation/timestep``) counts *resampled* frames, so latent
labels written for one ``target_fps`` only match trajectories read at that rate (record it in the
labeller's ``meta``).

LAPA's frame gap for human video is about 2.4 s (``gaps.HUMAN_GAP_SECONDS``); its SSv2 latent
action quantizer pairs frames ``SSV2_FRAME_OFFSET = 30`` apart on videos stored at
``SSV2_FPS = 12`` (30 / 12 = 2.5 s). ``registry.dataset_gap`` turns the gap of a ``kind="human"``
spec (such as the ``video_folder`` entry, ``video_folder_spec``) into frames at its fps.

Something-Something-v2 layout::

    video_dir/<id>.webm              one clip per id (VP9, 12 fps, 240 px high in the release)
    labels.json                      [{"id": "78687", "label": "holding potato next to vicks
                                       vaporub bottle", "template": "Holding [something] next to
                                       [something]", "placeholders": ["potato", "vicks ..."]}, ...]

``template`` and ``placeholders`` are accepted and unused; an entry without ``label`` (the SSv2
test list) gets an empty instruction. Several processes each take a disjoint share of the ids:
ids are sorted (numerically when all are digits) and process ``i`` of ``n`` takes ``ids[i::n]``.

Any folder of clips (``VideoFolderReader``): every file with a video extension
(``VIDEO_EXTENSIONS``: .mp4, .webm, .mkv, .avi, .mov, ...; the container and codec are whatever the
local FFmpeg decodes, e.g. H.264, HEVC, VP8/VP9, MPEG-4) is one clip whose id is its path
relative to the folder without the extension; a labels file (the SSv2 list above, or a JSON object
``{id: instruction}``) is optional. Frames are turned upright by the stream's display rotation
(the display matrix side data, or the legacy ``rotate`` tag; mirroring is not applied) and then
center-cropped (``crop="center"``, default), black-padded (``"pad"``) or left as they are
(``"none"``) to the aspect ratio of the output size (square without one), so the pipeline's square
resize never squashes them.

As a dataset (``video_folder_spec`` / ``registry.register_video_folder``, and the built-in pipeline entry
``video_folder`` that reads the folder named by ``config.data.data_dir``): kind "human", frames
resampled to ``fps`` (12 by default, SSv2's rate), which is the spec's ``control_hz``, so
``config.data.gap_seconds`` (0: 2.4 s) becomes frames. Video trajectories have no proprioception:
``observation/proprio`` is [T, 0] (``pipeline.flatten_samples`` keeps that zero-width key away
from TensorFlow 2.21's ``unbatch``, which segfaults on it).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from jaxvla.data.schema import IMAGE_CAMERAS
from jaxvla.data.spec import DatasetSpec

log = logging.getLogger(__name__)

SSV2_FPS = 12.0
SSV2_FRAME_OFFSET = 30
DEFAULT_ACTION_DIM = 7
_ENCODINGS = ("jpeg", "png")
# File extensions read as video (lower case); the container is probed from the content.
VIDEO_EXTENSIONS = (".webm", ".mp4", ".m4v", ".mkv", ".avi", ".mov", ".mpg", ".mpeg", ".ts", ".flv", ".3gp", ".ogv",
                    ".wmv")
CROP_MODES = ("center", "pad", "none")
VIDEO_FOLDER_FPS = SSV2_FPS  # frame rate of the video_folder dataset entry (LAPA's human-video rate)
VIDEO_FOLDER_IMAGE_SIZE = 256  # side of the square frames it stores (the pipeline resizes them again)
VIDEO_FOLDER_LABELS = "labels.json"  # the labels file a video_folder entry reads when present


class VideoDecodeError(ValueError):
    """A video file that cannot be opened or decoded; the message names the file."""


def _as_fraction(value: float, name: str) -> Fraction:
    if value is None or not np.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value if isinstance(value, Fraction) else Fraction(float(value)).limit_denominator(1_000_000)


def _size_hw(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        height = width = int(size)
    else:
        if len(size) != 2:
            raise ValueError(f"size must be an int or (height, width), got {size!r}")
        height, width = (int(s) for s in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return height, width


def _display_quarter_turns(frame, stream) -> int:
    """Counter-clockwise quarter turns (0-3) that put a decoded frame upright: the frame's display
    matrix side data (``VideoFrame.rotation``, counter-clockwise degrees), else the stream's legacy
    ``rotate`` tag (clockwise degrees). Angles round to the nearest quarter turn."""
    degrees = 0.0
    try:
        degrees = float(frame.rotation or 0)
    except (AttributeError, TypeError, ValueError):
        degrees = 0.0
    if not degrees:
        tag = (stream.metadata or {}).get("rotate")
        try:
            degrees = -float(tag) if tag else 0.0
        except ValueError:
            degrees = 0.0
    return int(round(degrees / 90.0)) % 4


def _fit_aspect(image: np.ndarray, aspect: float, crop: str) -> np.ndarray:
    """Center-crops (``"center"``) or black-pads (``"pad"``) ``image`` [H, W, 3] to width / height
    = ``aspect``; ``"none"`` returns it unchanged."""
    if crop == "none":
        return image
    height, width = image.shape[:2]
    if crop == "center":
        if width > height * aspect:
            new = max(1, int(round(height * aspect)))
            left = (width - new) // 2
            return image[:, left : left + new]
        new = max(1, int(round(width / aspect)))
        top = (height - new) // 2
        return image[top : top + new]
    if width > height * aspect:
        new_h, new_w = int(round(width / aspect)), width
    else:
        new_h, new_w = height, int(round(height * aspect))
    if (new_h, new_w) == (height, width):
        return image
    out = np.zeros((new_h, new_w, image.shape[2]), image.dtype)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    out[top : top + height, left : left + width] = image
    return out


def _to_rgb(frame, size: tuple[int, int] | None, crop: str = "none", quarter_turns: int = 0,
            path: str = "") -> np.ndarray:
    """A decoded frame of ``path`` -> uint8 [H, W, 3]: turned upright, cropped / padded to the
    aspect of ``size`` (square without a size), resized to ``size``. A frame FFmpeg cannot convert
    raises ``VideoDecodeError`` naming ``path``."""
    import av  # PyAV, already loaded by whoever decoded the frame

    try:
        return _convert_frame(frame, size, crop, quarter_turns)
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise VideoDecodeError(f"{path}: cannot convert a frame ({type(error).__name__}: {error})") from error


def _convert_frame(frame, size: tuple[int, int] | None, crop: str, quarter_turns: int) -> np.ndarray:
    if not quarter_turns and (crop == "none" or size is None and frame.width == frame.height
                              or size is not None and frame.width * size[0] == frame.height * size[1]):
        if size is None:
            return frame.to_ndarray(format="rgb24")
        height, width = size
        interpolation = "AREA" if height <= frame.height and width <= frame.width else "BICUBIC"
        return frame.reformat(width=width, height=height, format="rgb24", interpolation=interpolation).to_ndarray()
    image = frame.to_ndarray(format="rgb24")
    if quarter_turns:
        image = np.rot90(image, quarter_turns)
    image = _fit_aspect(image, 1.0 if size is None else size[1] / size[0], crop)
    if size is not None and image.shape[:2] != tuple(size):
        height, width = size
        downscale = height <= image.shape[0] and width <= image.shape[1]
        method = Image.Resampling.BOX if downscale else Image.Resampling.BICUBIC
        image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width, height), method))
    return np.ascontiguousarray(image)


def decode_timed(path: str | os.PathLike, seek_seconds: float = 0.0) -> Iterator[tuple[Fraction, Any, Any]]:
    """Every decoded frame of ``path``'s first video stream, in decode order, as ``(t, frame,
    stream)``: ``t`` the frame's time in seconds (a Fraction: its pts, or without one its index over
    the stream's rate), ``frame`` an ``av.VideoFrame``, ``stream`` the ``av`` video stream. With
    ``seek_seconds`` > 0 decoding starts at the keyframe at or before that time.

    Raises FileNotFoundError for a missing file and ``VideoDecodeError`` (a ValueError) naming the
    file for one that cannot be opened or decoded or has no video stream. The one PyAV decode loop
    of ``read_video`` (resampling) and ``lerobot.decode_video_span`` (nearest frames to timestamps).
    """
    import av  # PyAV: imported here so the rest of jaxvla works without it

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        with av.open(path, mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if seek_seconds > 0:
                container.seek(int(seek_seconds / float(stream.time_base)), stream=stream, backward=True)
            for index, frame in enumerate(container.decode(stream)):
                time_base = frame.time_base or stream.time_base
                if frame.pts is not None and time_base is not None:
                    t = Fraction(frame.pts) * Fraction(time_base)
                elif rate:
                    t = Fraction(index) / Fraction(rate)
                else:
                    t = Fraction(index)
                yield t, frame, stream
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as error:
        raise VideoDecodeError(f"{path}: cannot decode video ({type(error).__name__}: {error})") from error


def read_video(
    path: str | os.PathLike,
    target_fps: float | None = None,
    max_frames: int | None = None,
    size: int | Sequence[int] | None = None,
    crop: str = "none",
    autorotate: bool = True,
) -> tuple[np.ndarray, float]:
    """Decodes a video file -> (frames uint8 [T, H, W, 3], fps).

    ``target_fps`` resamples by timestamp (nearest frame to ``k / target_fps``, ties to the earlier
    frame; see the module docstring) and the returned fps is ``target_fps``; without it every frame
    is kept and the fps is the stream's average rate. ``max_frames`` stops decoding once that many
    output frames exist. ``size`` (int or (height, width)) resizes while converting to RGB.
    ``autorotate`` turns frames upright by the stream's display rotation (a clip recorded with a
    90-degree rotation flag comes out in its display orientation); ``crop`` ("center" | "pad" |
    "none") then crops or pads them to the aspect ratio of ``size`` (square without a size) before
    resizing, instead of squashing.

    Raises FileNotFoundError for a missing file and ``VideoDecodeError`` (a ValueError) naming the
    file for one that cannot be opened, has no video stream, or yields no frame. A truncated file
    yields the frames before the damage (FFmpeg decodes what it can).
    """
    path = os.fspath(path)
    target = None if target_fps is None else _as_fraction(target_fps, "target_fps")
    if max_frames is not None and max_frames <= 0:
        raise ValueError(f"max_frames must be positive, got {max_frames}")
    size_hw = _size_hw(size)
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")

    frames: list[np.ndarray] = []
    turns = None  # quarter turns to display orientation, from the first decoded frame
    rate = None
    t0 = None
    previous = None  # (time, av.VideoFrame) of the last decoded frame, converted lazily
    k = 0  # next output frame
    for t, frame, stream in decode_timed(path):
        if turns is None:
            turns = _display_quarter_turns(frame, stream) if autorotate else 0
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if t0 is None:
            t0 = t
        t -= t0
        if previous is not None and t <= previous[0]:
            continue  # a repeated or out-of-order timestamp: keep the first
        if target is None:
            frames.append(_to_rgb(frame, size_hw, crop, turns, path))
        else:
            while Fraction(k) / target <= t:
                wanted = Fraction(k) / target
                chosen = frame
                if previous is not None and wanted - previous[0] <= t - wanted:
                    chosen = previous[1]
                frames.append(_to_rgb(chosen, size_hw, crop, turns, path))
                k += 1
                if max_frames is not None and len(frames) >= max_frames:
                    break
        if max_frames is not None and len(frames) >= max_frames:
            break
        previous = (t, frame)
    if not frames:
        raise VideoDecodeError(f"{path}: no frames decoded")
    if target is not None:
        fps = float(target)
    elif rate:
        fps = float(rate)
    else:
        fps = float("nan")
    return np.stack(frames), fps


def encode_frames(frames: np.ndarray, encode: str = "jpeg", quality: int = 95) -> np.ndarray:
    """uint8 [T, H, W, 3] -> object array [T] of encoded image bytes (Pillow)."""
    if encode not in _ENCODINGS:
        raise ValueError(f"encode must be one of {_ENCODINGS}, got {encode!r}")
    out = np.empty(len(frames), dtype=object)
    for i, frame in enumerate(frames):
        buffer = io.BytesIO()
        if encode == "jpeg":
            Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
        else:
            Image.fromarray(frame).save(buffer, format="PNG", compress_level=1)
        out[i] = buffer.getvalue()
    return out


def schema_trajectory(
    images: Mapping[str, np.ndarray],
    instructions: str | Sequence[str],
    traj_key: str,
    dataset_name: str,
    *,
    action: np.ndarray | None = None,
    action_dim: int = DEFAULT_ACTION_DIM,
    proprio: np.ndarray | None = None,
    timestep: np.ndarray | None = None,
) -> dict[str, Any]:
    """The standardised (schema.py) trajectory of one episode, built in numpy (nested dicts), the
    layout ``trajectory_signature`` describes.

    ``images``: camera name (``"primary"``, ``"wrist"``, ... of ``IMAGE_CAMERAS``) -> encoded
    frames, an object array ``[T]`` of bytes; cameras left out are ``b""``. ``instructions``: one
    string, or one per step. ``action`` float ``[T, A]`` (``has_action`` true), or None for an
    action-free video (zeros ``[T, action_dim]``, ``has_action`` false). ``proprio`` float
    ``[T, P]`` (default ``[T, 0]``); ``timestep`` int ``[T]`` (default ``0 .. T-1``).
    """
    unknown = sorted(set(images) - set(IMAGE_CAMERAS))
    if unknown:
        raise ValueError(f"cameras {unknown}: expected some of {list(IMAGE_CAMERAS)}")
    sized = [*images.values(), *(a for a in (action, proprio, timestep) if a is not None)]
    if not sized:
        raise ValueError(f"{traj_key}: no frames, actions, state or timesteps to size the trajectory")
    length = len(sized[0])

    def text(values: str | Sequence[str]) -> np.ndarray:
        values = [values] * length if isinstance(values, str) else list(values)
        if len(values) != length:
            raise ValueError(f"{traj_key}: {len(values)} strings for a trajectory of {length} steps")
        out = np.empty(length, dtype=object)
        out[:] = [v.encode("utf-8") for v in values]
        return out

    observation = {f"image_{camera}": text("") for camera in IMAGE_CAMERAS}
    for camera, frames in images.items():
        if len(frames) != length:
            raise ValueError(f"{traj_key}: camera {camera!r} has {len(frames)} frames, expected {length}")
        observation[f"image_{camera}"] = np.asarray(frames, dtype=object)
    observation["proprio"] = (np.zeros((length, 0), np.float32) if proprio is None
                              else np.asarray(proprio, np.float32).reshape(length, -1))
    observation["timestep"] = (np.arange(length, dtype=np.int32) if timestep is None
                               else np.asarray(timestep, np.int32))
    return {
        "observation": observation,
        "action": (np.zeros((length, action_dim), np.float32) if action is None
                   else np.asarray(action, np.float32).reshape(length, -1)),
        "has_action": np.full(length, action is not None),
        "task": {"language_instruction": text(instructions)},
        "dataset_name": text(dataset_name),
        "traj_key": text(traj_key),
    }


def video_trajectory(
    encoded_frames: np.ndarray,
    instruction: str,
    traj_key: str,
    dataset_name: str,
    action_dim: int = DEFAULT_ACTION_DIM,
) -> dict[str, Any]:
    """The schema trajectory of one action-free video: ``encoded_frames`` ``[T]`` as the primary
    camera, zero actions ``[T, action_dim]`` with ``has_action`` false, no state."""
    return schema_trajectory({"primary": encoded_frames}, instruction, traj_key, dataset_name,
                             action_dim=action_dim)


def trajectory_signature(action_dim: int = DEFAULT_ACTION_DIM, proprio_dim: int = 0) -> dict[str, Any]:
    """``tf.TensorSpec`` tree of a schema trajectory built in numpy (``video_trajectory``'s output:
    ``proprio_dim`` 0; LeRobot episodes: their state width), for ``from_generator``."""
    import tensorflow as tf

    string = tf.TensorSpec([None], tf.string)
    observation = {f"image_{camera}": string for camera in IMAGE_CAMERAS}
    observation["proprio"] = tf.TensorSpec([None, int(proprio_dim)], tf.float32)
    observation["timestep"] = tf.TensorSpec([None], tf.int32)
    return {
        "observation": observation,
        "action": tf.TensorSpec([None, action_dim], tf.float32),
        "has_action": tf.TensorSpec([None], tf.bool),
        "task": {"language_instruction": string},
        "dataset_name": string,
        "traj_key": string,
    }


def _id_sort_key(video_id: str) -> tuple:
    return (0, int(video_id), video_id) if video_id.isdigit() else (1, 0, video_id)


def _check_id(video_id: str, where: str) -> str:
    video_id = str(video_id).strip()
    parts = video_id.replace("\\", "/").split("/")
    if not video_id or os.path.isabs(video_id) or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{where} has an invalid id {video_id!r}")
    return video_id


def load_ssv2_labels(labels_json: str | os.PathLike) -> dict[str, str]:
    """Labels file -> {video id: label}. Raises naming the file and the bad entry.

    The SSv2 layout (a JSON list of ``{"id", "label", ...}`` objects; ``label`` optional) or a
    JSON object ``{id: label}``. Ids are clip paths relative to the video folder, without the
    extension (``"78687"``, ``"kitchen/pour_01"``)."""
    labels_json = os.fspath(labels_json)
    if not os.path.isfile(labels_json):
        raise FileNotFoundError(f"labels file not found: {labels_json}")
    try:
        with open(labels_json, encoding="utf-8") as f:
            entries = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{labels_json}: not valid JSON ({error})") from error
    if isinstance(entries, dict):
        entries = [{"id": key, "label": value} for key, value in entries.items()]
    if not isinstance(entries, list):
        raise ValueError(
            f"{labels_json}: expected a JSON list of {{'id', 'label'}} objects or an {{id: label}} object, "
            f"got {type(entries).__name__}"
        )
    labels: dict[str, str] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry:
            raise ValueError(f"{labels_json}: entry {i} has no 'id': {entry!r:.200}")
        video_id = _check_id(entry["id"], f"{labels_json}: entry {i}")
        label = entry.get("label", "")
        if not isinstance(label, str):
            raise ValueError(f"{labels_json}: entry {i} (id {video_id}) has a non-string label {label!r:.200}")
        if video_id in labels:
            raise ValueError(f"{labels_json}: id {video_id} appears more than once")
        labels[video_id] = label
    return labels


def _extensions(extensions: str | Sequence[str] | None) -> tuple[str, ...]:
    if extensions is None:
        return VIDEO_EXTENSIONS
    if isinstance(extensions, str):
        extensions = [e for e in extensions.replace(",", " ").split() if e]
    out = tuple(("" if e.startswith(".") else ".") + e.lower() for e in extensions)
    if not out:
        raise ValueError("extensions is empty; name at least one (e.g. '.mp4')")
    return out


def find_videos(video_dir: str | os.PathLike, extensions: str | Sequence[str] | None = None,
                recursive: bool = False) -> dict[str, str]:
    """{clip id: path} of the video files in ``video_dir`` (extension case-insensitive; hidden
    files skipped): the id is the path relative to the folder, ``/``-separated, without the
    extension. Two files with one id (``a.mp4`` and ``a.webm``) are an error naming both."""
    root = os.fspath(video_dir)
    wanted = _extensions(extensions)
    found: dict[str, str] = {}
    walker = os.walk(root) if recursive else [(root, [], sorted(os.listdir(root)))]
    for directory, subdirs, files in walker:
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            path = os.path.join(directory, name)
            if name.startswith(".") or ext.lower() not in wanted or not os.path.isfile(path):
                continue
            relative = os.path.relpath(os.path.join(directory, stem), root).replace(os.sep, "/")
            if relative in found:
                raise ValueError(f"{root}: two videos for clip id {relative!r}: {found[relative]} and {path}")
            found[relative] = path
    return found


def map_ahead(fn, items: Sequence[Any], num_workers: int) -> Iterator[Any]:
    """``fn(item)`` for each item, in order, ``num_workers`` threads computing ahead."""
    if num_workers <= 1:
        for item in items:
            yield fn(item)
        return
    pool = ThreadPoolExecutor(num_workers, thread_name_prefix="video-decode")
    window: collections.deque = collections.deque()
    exhausted = False
    try:
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * num_workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
        exhausted = True
    finally:
        # Closed early, the generator may be finalized by the garbage collector on any thread, one
        # of this pool's workers included, which cannot join itself (``with`` would raise
        # "cannot join current thread"): cancel what is queued and let calls in flight finish alone.
        pool.shutdown(wait=exhausted, cancel_futures=True)


class VideoFolderReader:
    """Standardised trajectories from a folder of clips (any container / codec FFmpeg decodes).

    ``VideoFolderReader(video_dir, labels=None, split_name)`` lists the clips at once
    (``find_videos``: every file with one of ``extensions``, default ``VIDEO_EXTENSIONS``; with
    ``recursive`` also in subfolders), takes this process's share of the ids and, with a labels
    file (``load_ssv2_labels``), reads only the labelled ids: with ``missing_videos="error"`` (the
    default) a labelled id without a file is an error naming it, ``"skip"`` drops and counts it.
    Without labels every clip is read with an empty instruction.

    Iterating decodes one clip per trajectory (``decode``: resampled to ``target_fps`` or at the
    clip's own rate, turned upright, cropped / padded per ``crop`` and resized to ``image_size``),
    in sorted-id order (``num_workers`` decode ahead in threads; PyAV and Pillow release the GIL).
    An undecodable clip raises ``VideoDecodeError`` naming the file, or with ``ignore_errors=True``
    is skipped and counted, as are clips shorter than ``min_frames``. ``stats`` holds the counts of
    the last pass (``skipped``: ``{"id", "path", "reason"}`` per skipped clip).
    ``shuffle_seed`` visits the share in a new seeded order on every pass (``pass_order``) instead of
    sorted order: a cheap substitute for a large trajectory shuffle buffer.
    """

    def __init__(
        self,
        video_dir: str | os.PathLike,
        labels: str | os.PathLike | None = None,
        split_name: str = "train",
        target_fps: float | None = None,
        image_size: int | Sequence[int] | None = None,
        encode: str = "jpeg",
        *,
        crop: str = "center",
        autorotate: bool = True,
        jpeg_quality: int = 95,
        action_dim: int = DEFAULT_ACTION_DIM,
        dataset_name: str = "video_folder",
        extensions: str | Sequence[str] | None = None,
        video_ext: str | None = None,
        recursive: bool = False,
        max_frames: int | None = None,
        min_frames: int = 1,
        missing_videos: str = "error",
        ignore_errors: bool = False,
        process_index: int = 0,
        process_count: int = 1,
        num_workers: int = 1,
        shuffle_seed: int | None = None,
    ):
        self.video_dir = os.fspath(video_dir)
        self.labels_json = None if labels is None else os.fspath(labels)
        if not os.path.isdir(self.video_dir):
            raise FileNotFoundError(f"video directory not found: {self.video_dir}")
        if encode not in _ENCODINGS:
            raise ValueError(f"encode must be one of {_ENCODINGS}, got {encode!r}")
        if crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
        if missing_videos not in ("error", "skip"):
            raise ValueError(f"missing_videos must be 'error' or 'skip', got {missing_videos!r}")
        if process_index is None or process_count is None:
            from jaxvla.data.dataset import _default_process  # TensorFlow

            process_index, process_count = _default_process(process_index, process_count)
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
        if target_fps is not None:
            _as_fraction(target_fps, "target_fps")
        if action_dim < 0 or min_frames < 1 or num_workers < 1:
            raise ValueError(f"need action_dim >= 0, min_frames >= 1, num_workers >= 1; got {action_dim}, {min_frames}, {num_workers}")
        self.split_name = split_name
        self.target_fps = target_fps
        self.image_size = _size_hw(image_size)
        self.encode = encode
        self.crop = crop
        self.autorotate = autorotate
        self.jpeg_quality = jpeg_quality
        self.action_dim = action_dim
        self.dataset_name = dataset_name
        self.extensions = _extensions(video_ext if video_ext is not None else extensions)
        self.recursive = recursive
        self.max_frames = max_frames
        self.min_frames = min_frames
        self.ignore_errors = ignore_errors
        self.process_index = process_index
        self.process_count = process_count
        self.num_workers = num_workers
        self.shuffle_seed = shuffle_seed
        self._passes = 0

        self.paths = find_videos(self.video_dir, self.extensions, recursive)
        if self.labels_json is not None:
            self.labels = load_ssv2_labels(self.labels_json)
            if not self.labels:
                raise ValueError(f"{self.labels_json}: no entries")
        else:
            if not self.paths:
                raise ValueError(
                    f"no video files in {self.video_dir} (extensions {', '.join(self.extensions)}"
                    f"{'' if recursive else '; subfolders not searched'})"
                )
            self.labels = {video_id: "" for video_id in self.paths}
        all_ids = sorted(self.labels, key=_id_sort_key)
        share = all_ids[process_index::process_count]
        self.missing_ids = [i for i in share if i not in self.paths]
        if self.missing_ids and missing_videos == "error":
            shown = ", ".join(self.video_path(i) for i in self.missing_ids[:5])
            more = f" (and {len(self.missing_ids) - 5} more)" if len(self.missing_ids) > 5 else ""
            raise FileNotFoundError(
                f"{self.labels_json}: {len(self.missing_ids)} of {len(share)} labelled videos missing "
                f"from {self.video_dir}: {shown}{more} (looked for {', '.join(self.extensions)}); pass "
                "missing_videos='skip' to skip them"
            )
        if self.missing_ids:
            log.warning("%s: skipping %d labelled ids without a video in %s", self.labels_json, len(self.missing_ids), self.video_dir)
        missing = set(self.missing_ids)
        self.video_ids = [i for i in share if i not in missing]
        if not self.video_ids:
            raise ValueError(
                f"no videos to read: {self.labels_json or self.video_dir} lists {len(all_ids)} ids, process "
                f"{process_index} of {process_count} has {len(share)}, {len(self.missing_ids)} of them missing from "
                f"{self.video_dir}"
            )
        self.stats = self._fresh_stats()

    def _fresh_stats(self) -> dict[str, Any]:
        return {
            "yielded": 0,
            "missing_videos": len(self.missing_ids),
            "decode_errors": 0,
            "too_short": 0,
            "failed_files": [],
            "skipped": [],
        }

    def __len__(self) -> int:
        """Videos in this process's share (before decode failures)."""
        return len(self.video_ids)

    def video_path(self, video_id: str) -> str:
        """The clip's file (for an id without one: the path with the first extension)."""
        return self.paths.get(video_id) or os.path.join(self.video_dir, video_id + self.extensions[0])

    def traj_key(self, video_id: str) -> str:
        return f"{self.dataset_name}/{self.split_name}/{video_id}"

    def decode(self, video_id: str) -> tuple[np.ndarray, float]:
        """One clip -> (frames uint8 [T, H, W, 3], fps): ``read_video`` with this reader's settings
        (fps is ``target_fps``, or the clip's own average rate without one)."""
        return read_video(self.video_path(video_id), self.target_fps, self.max_frames, self.image_size,
                          crop=self.crop, autorotate=self.autorotate)

    def trajectory(self, video_id: str) -> dict[str, Any]:
        """Decodes one video -> its standardised trajectory (raises on failure)."""
        frames, _ = self.decode(video_id)
        encoded = encode_frames(frames, self.encode, self.jpeg_quality)
        return video_trajectory(encoded, self.labels[video_id], self.traj_key(video_id), self.dataset_name, self.action_dim)

    def _try(self, video_id: str) -> tuple[str, str, Any]:
        try:
            return video_id, "ok", self.trajectory(video_id)
        except (VideoDecodeError, FileNotFoundError) as error:
            return video_id, "error", error

    def pass_order(self, index: int) -> list[str]:
        """The video ids of pass ``index`` over this share: sorted, or with ``shuffle_seed`` a
        permutation that depends only on (seed, process_index, index)."""
        if self.shuffle_seed is None:
            return list(self.video_ids)
        rng = np.random.default_rng([self.shuffle_seed, self.process_index, index])
        return [self.video_ids[i] for i in rng.permutation(len(self.video_ids))]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stats = stats = self._fresh_stats()
        order = self.pass_order(self._passes)
        self._passes += 1
        yield from self._collect(map_ahead(self._try, order, self.num_workers), stats)

    def _collect(self, results, stats) -> Iterator[dict[str, Any]]:
        for video_id, status, value in results:
            if status == "error":
                if not self.ignore_errors:
                    raise value
                stats["decode_errors"] += 1
                stats["failed_files"].append(str(value))
                stats["skipped"].append({"id": video_id, "path": self.video_path(video_id),
                                         "reason": f"undecodable: {value}"})
                log.warning("skipping undecodable video: %s", value)
                continue
            if len(value["traj_key"]) < self.min_frames:
                stats["too_short"] += 1
                stats["skipped"].append({"id": video_id, "path": self.video_path(video_id),
                                         "reason": f"too short: {len(value['traj_key'])} < {self.min_frames} frames"})
                continue
            stats["yielded"] += 1
            yield value
        if stats["yielded"] == 0:
            raise ValueError(
                f"no trajectories from {self.video_dir}: {len(self.video_ids)} videos, "
                f"{stats['decode_errors']} undecodable, {stats['too_short']} shorter than {self.min_frames} frames"
            )

    def output_signature(self) -> dict[str, Any]:
        return trajectory_signature(self.action_dim)

    def as_dataset(self):
        """This process's trajectories as a ``tf.data.Dataset`` (one element per video)."""
        import tensorflow as tf

        return tf.data.Dataset.from_generator(self.__iter__, output_signature=self.output_signature())


class SomethingSomethingReader(VideoFolderReader):
    """``VideoFolderReader`` with SSv2's defaults: a labels file (required), 12 fps, dataset name
    ``ssv2``. ``video_ext`` (None: any of ``VIDEO_EXTENSIONS``) restricts the extension."""

    def __init__(
        self,
        video_dir: str | os.PathLike,
        labels_json: str | os.PathLike,
        split_name: str = "train",
        target_fps: float | None = SSV2_FPS,
        image_size: int | Sequence[int] | None = None,
        encode: str = "jpeg",
        *,
        dataset_name: str = "ssv2",
        **kwargs: Any,
    ):
        super().__init__(video_dir, labels_json, split_name, target_fps, image_size, encode,
                         dataset_name=dataset_name, **kwargs)


def video_trajectory_dataset(
    video_dir: str | os.PathLike,
    labels_json: str | os.PathLike,
    split_name: str = "train",
    *,
    num_workers: int = 2,
    **reader_kwargs: Any,
):
    """``tf.data.Dataset`` of standardised trajectories from an SSv2-layout folder.

    Built with ``tf.data.Dataset.from_generator`` and an explicit output signature (see
    ``trajectory_signature``); ``num_workers`` threads decode videos ahead, in order, so the
    element order is the sorted-id order of this process's share. ``reader_kwargs`` go to
    ``SomethingSomethingReader`` (target_fps, image_size, encode, crop, process_index,
    process_count, ignore_errors, missing_videos, shuffle_seed, ...). Each pass over the dataset
    decodes the videos again (in a new order with ``shuffle_seed``). To read the skip counts, build
    the reader yourself and use ``reader.as_dataset()`` and ``reader.stats``.
    """
    reader = SomethingSomethingReader(video_dir, labels_json, split_name, num_workers=num_workers, **reader_kwargs)
    return reader.as_dataset()


# -- the pipeline's dataset entry -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VideoFolderSource:
    """The ``trajectories_fn`` of a video folder dataset spec (``DatasetSpec``): reads
    ``video_dir`` (None: the ``data_dir`` the pipeline passes, i.e. ``config.data.data_dir``) with a
    ``VideoFolderReader``; undecodable clips and labelled ids without a file are skipped and
    counted. The labels file is ``labels`` (a relative path that does not exist is taken inside the
    folder), else the
    folder's ``labels.json`` when there is one. Training passes visit the clips in a new seeded
    order each (``shuffle_seed``); evaluation reads them in sorted order."""

    video_dir: str | None = None
    name: str = "video_folder"
    labels: str | None = None
    fps: float | None = VIDEO_FOLDER_FPS
    crop: str = "center"
    image_size: int | None = VIDEO_FOLDER_IMAGE_SIZE
    extensions: tuple[str, ...] | None = None
    recursive: bool = False
    num_workers: int = 2
    action_dim: int = DEFAULT_ACTION_DIM

    def folder(self, data_dir: str | os.PathLike | None = None) -> str:
        folder = self.video_dir or (os.fspath(data_dir) if data_dir else "")
        if not folder:
            raise ValueError(
                f"dataset {self.name!r}: no video folder; set config.data.data_dir to the folder of clips "
                "(or register the dataset with video_dir=...)"
            )
        return folder

    def labels_file(self, folder: str) -> str | None:
        if self.labels:
            if os.path.isabs(self.labels) or os.path.isfile(self.labels):
                return self.labels
            return os.path.join(folder, self.labels)
        default = os.path.join(folder, VIDEO_FOLDER_LABELS)
        return default if os.path.isfile(default) else None

    def reader(self, split: str = "train", *, train: bool = False, seed: int | None = 0, process_index: int | None = 0,
               process_count: int | None = 1, data_dir: str | os.PathLike | None = None) -> VideoFolderReader:
        folder = self.folder(data_dir)
        return VideoFolderReader(
            folder, self.labels_file(folder), split, target_fps=self.fps, image_size=self.image_size, crop=self.crop,
            dataset_name=self.name, extensions=self.extensions, recursive=self.recursive, missing_videos="skip",
            ignore_errors=True, process_index=process_index, process_count=process_count,
            num_workers=self.num_workers, shuffle_seed=(seed or 0) if train else None, action_dim=self.action_dim,
        )

    def __call__(self, split: str, train: bool, seed: int | None, process_index: int | None, process_count: int | None,
                 data_dir: str | os.PathLike | None = None):
        reader = self.reader(split, train=train, seed=seed, process_index=process_index,
                             process_count=process_count, data_dir=data_dir)
        return reader.as_dataset()


def video_folder_spec(
    video_dir: str | os.PathLike | None = None, name: str = "video_folder", **settings: Any
) -> DatasetSpec:
    """A ``DatasetSpec`` (``jaxvla.data.spec``) reading a folder of clips (``VideoFolderSource(video_dir, name,
    **settings)``: labels, fps, crop, image_size, extensions, recursive, num_workers, action_dim):
    kind "human", ``control_hz`` = fps (gaps in seconds become frames at it), one split (the
    validation split reads the same clips)."""
    if "extensions" in settings and settings["extensions"] is not None:
        settings["extensions"] = _extensions(settings["extensions"])
    source = VideoFolderSource(None if video_dir is None else os.fspath(video_dir), name, **settings)
    if source.crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {source.crop!r}")
    return DatasetSpec(
        name=name, kind="human", control_hz=None if source.fps is None else float(source.fps),
        train_split="train", val_split="train", gripper_dims=(), trajectories_fn=source,
        fingerprint=repr(source),
    )

