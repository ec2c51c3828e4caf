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
``SSV2_FPS = 12`` (30 / 12 = 2.5 s). ``human_video_frame_gap(fps)`` turns the gap into frames.

Something-Something-v2 layout::

    video_dir/<id>.webm              one clip per id (VP9, 12 fps, 240 px high in the release)
    labels.json                      [{"id": "78687", "label": "holding potato next to vicks
                                       vaporub bottle", "template": "Holding [something] next to
                                       [something]", "placeholders": ["potato", "vicks ..."]}, ...]

``template`` and ``placeholders`` are accepted and unused; an entry without ``label`` (the SSv2
test list) gets an empty instruction. Several processes each take a disjoint share of the ids:
ids are sorted (numerically when all are digits) and process ``i`` of ``n`` takes ``ids[i::n]``.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any, Iterator, Sequence

import numpy as np

from jaxvla.data.gaps import HUMAN_GAP_SECONDS, frame_gap
from jaxvla.data.schema import IMAGE_CAMERAS

log = logging.getLogger(__name__)

SSV2_FPS = 12.0
SSV2_FRAME_OFFSET = 30
DEFAULT_ACTION_DIM = 7
_ENCODINGS = ("jpeg", "png")


class VideoDecodeError(ValueError):
    """A video file that cannot be opened or decoded; the message names the file."""


def human_video_frame_gap(fps: float, seconds: float = HUMAN_GAP_SECONDS) -> int:
    """The frame offset between the two frames of a human-video pair at ``fps`` (at least 1):
    ``gaps.frame_gap(fps, seconds)``."""
    return frame_gap(fps, seconds)


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


def _to_rgb(frame, size: tuple[int, int] | None) -> np.ndarray:
    if size is None:
        return frame.to_ndarray(format="rgb24")
    height, width = size
    interpolation = "AREA" if height <= frame.height and width <= frame.width else "BICUBIC"
    return frame.reformat(width=width, height=height, format="rgb24", interpolation=interpolation).to_ndarray()


def read_video(
    path: str | os.PathLike,
    target_fps: float | None = None,
    max_frames: int | None = None,
    size: int | Sequence[int] | None = None,
) -> tuple[np.ndarray, float]:
    """Decodes a video file -> (frames uint8 [T, H, W, 3], fps).

    ``target_fps`` resamples by timestamp (nearest frame to ``k / target_fps``, ties to the earlier
    frame; see the module docstring) and the returned fps is ``target_fps``; without it every frame
    is kept and the fps is the stream's average rate. ``max_frames`` stops decoding once that many
    output frames exist. ``size`` (int or (height, width)) resizes while converting to RGB.

    Raises FileNotFoundError for a missing file and ``VideoDecodeError`` (a ValueError) naming the
    file for one that cannot be opened, has no video stream, or yields no frame. A truncated file
    yields the frames before the damage (FFmpeg decodes what it can).
    """
    import av  # PyAV: imported here so the rest of jaxvla works without it

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    target = None if target_fps is None else _as_fraction(target_fps, "target_fps")
    if max_frames is not None and max_frames <= 0:
        raise ValueError(f"max_frames must be positive, got {max_frames}")
    size_hw = _size_hw(size)

    frames: list[np.ndarray] = []
    try:
        with av.open(path, mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            time_base = stream.time_base
            t0 = None
            previous = None  # (time, av.VideoFrame) of the last decoded frame, converted lazily
            index = 0  # decoded frames, for streams without timestamps
            k = 0  # next output frame
            for frame in container.decode(stream):
                frame_time_base = frame.time_base or time_base
                if frame.pts is not None and frame_time_base is not None:
                    t = Fraction(frame.pts) * Fraction(frame_time_base)
                elif rate:
                    t = Fraction(index) / Fraction(rate)
                else:
                    t = Fraction(index)
                index += 1
                if t0 is None:
                    t0 = t
                t -= t0
                if previous is not None and t <= previous[0]:
                    continue  # a repeated or out-of-order timestamp: keep the first
                if target is None:
                    frames.append(_to_rgb(frame, size_hw))
                else:
                    while Fraction(k) / target <= t:
                        wanted = Fraction(k) / target
                        chosen = frame
                        if previous is not None and wanted - previous[0] <= t - wanted:
                            chosen = previous[1]
                        frames.append(_to_rgb(chosen, size_hw))
                        k += 1
                        if max_frames is not None and len(frames) >= max_frames:
                            break
                if max_frames is not None and len(frames) >= max_frames:
                    break
                previous = (t, frame)
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as error:
        raise VideoDecodeError(f"{path}: cannot decode video ({type(error).__name__}: {error})") from error
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
    from PIL import Image

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


def video_trajectory(
    encoded_frames: np.ndarray,
    instruction: str,
    traj_key: str,
    dataset_name: str,
    action_dim: int = DEFAULT_ACTION_DIM,
) -> dict[str, Any]:
    """The standardised (schema.py) trajectory of one action-free video (numpy, nested dicts)."""
    length = len(encoded_frames)

    def text(value: str) -> np.ndarray:
        out = np.empty(length, dtype=object)
        out[:] = [value.encode("utf-8")] * length
        return out

    observation = {f"image_{camera}": text("") for camera in IMAGE_CAMERAS}
    observation["image_primary"] = np.asarray(encoded_frames, dtype=object)
    observation["proprio"] = np.zeros((length, 0), np.float32)
    observation["timestep"] = np.arange(length, dtype=np.int32)
    return {
        "observation": observation,
        "action": np.zeros((length, action_dim), np.float32),
        "has_action": np.zeros(length, bool),
        "task": {"language_instruction": text(instruction)},
        "dataset_name": text(dataset_name),
        "traj_key": text(traj_key),
    }


def trajectory_signature(action_dim: int = DEFAULT_ACTION_DIM) -> dict[str, Any]:
    """``tf.TensorSpec`` tree of ``video_trajectory``'s output (for ``from_generator``)."""
    import tensorflow as tf

    string = tf.TensorSpec([None], tf.string)
    observation = {f"image_{camera}": string for camera in IMAGE_CAMERAS}
    observation["proprio"] = tf.TensorSpec([None, 0], tf.float32)
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


def load_ssv2_labels(labels_json: str | os.PathLike) -> dict[str, str]:
    """SSv2 labels file -> {video id: label}. Raises naming the file and the bad entry."""
    labels_json = os.fspath(labels_json)
    if not os.path.isfile(labels_json):
        raise FileNotFoundError(f"labels file not found: {labels_json}")
    try:
        with open(labels_json, encoding="utf-8") as f:
            entries = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{labels_json}: not valid JSON ({error})") from error
    if not isinstance(entries, list):
        raise ValueError(f"{labels_json}: expected a JSON list of {{'id', 'label'}} objects, got {type(entries).__name__}")
    labels: dict[str, str] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry:
            raise ValueError(f"{labels_json}: entry {i} has no 'id': {entry!r:.200}")
        video_id = str(entry["id"]).strip()
        if not video_id or os.sep in video_id or video_id in (".", ".."):
            raise ValueError(f"{labels_json}: entry {i} has an invalid id {entry['id']!r}")
        label = entry.get("label", "")
        if not isinstance(label, str):
            raise ValueError(f"{labels_json}: entry {i} (id {video_id}) has a non-string label {label!r:.200}")
        if video_id in labels:
            raise ValueError(f"{labels_json}: id {video_id} appears more than once")
        labels[video_id] = label
    return labels


class SomethingSomethingReader:
    """Standardised trajectories from a folder of SSv2-style videos.

    ``SomethingSomethingReader(video_dir, labels_json, split_name)`` checks the folder and the labels
    file at once, takes this process's share of the ids and (with ``missing_videos="error"``, the
    default) fails naming every id whose ``<id><video_ext>`` is absent; ``"skip"`` drops and counts
    them instead. Iterating decodes one video per trajectory, in sorted-id order (``num_workers``
    decode ahead in threads; PyAV and Pillow release the GIL). An undecodable video raises
    ``VideoDecodeError`` naming the file, or with ``ignore_errors=True`` is skipped and counted, as
    are videos shorter than ``min_frames``. ``stats`` holds the counts of the last pass.
    ``shuffle_seed`` visits the share in a new seeded order on every pass (``pass_order``) instead of
    sorted order: a cheap substitute for a large trajectory shuffle buffer.
    """

    def __init__(
        self,
        video_dir: str | os.PathLike,
        labels_json: str | os.PathLike,
        split_name: str = "train",
        target_fps: float | None = SSV2_FPS,
        image_size: int | Sequence[int] | None = None,
        encode: str = "jpeg",
        *,
        jpeg_quality: int = 95,
        action_dim: int = DEFAULT_ACTION_DIM,
        dataset_name: str = "ssv2",
        video_ext: str = ".webm",
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
        self.labels_json = os.fspath(labels_json)
        if not os.path.isdir(self.video_dir):
            raise FileNotFoundError(f"video directory not found: {self.video_dir}")
        if encode not in _ENCODINGS:
            raise ValueError(f"encode must be one of {_ENCODINGS}, got {encode!r}")
        if missing_videos not in ("error", "skip"):
            raise ValueError(f"missing_videos must be 'error' or 'skip', got {missing_videos!r}")
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
        self.jpeg_quality = jpeg_quality
        self.action_dim = action_dim
        self.dataset_name = dataset_name
        self.video_ext = video_ext if video_ext.startswith(".") else "." + video_ext
        self.max_frames = max_frames
        self.min_frames = min_frames
        self.ignore_errors = ignore_errors
        self.process_index = process_index
        self.process_count = process_count
        self.num_workers = num_workers
        self.shuffle_seed = shuffle_seed
        self._passes = 0

        self.labels = load_ssv2_labels(self.labels_json)
        if not self.labels:
            raise ValueError(f"{self.labels_json}: no entries")
        all_ids = sorted(self.labels, key=_id_sort_key)
        share = all_ids[process_index::process_count]
        present = {entry.name for entry in os.scandir(self.video_dir) if entry.is_file()}
        self.missing_ids = [i for i in share if i + self.video_ext not in present]
        if self.missing_ids and missing_videos == "error":
            shown = ", ".join(os.path.join(self.video_dir, i + self.video_ext) for i in self.missing_ids[:5])
            more = f" (and {len(self.missing_ids) - 5} more)" if len(self.missing_ids) > 5 else ""
            raise FileNotFoundError(
                f"{self.labels_json}: {len(self.missing_ids)} of {len(share)} labelled videos missing "
                f"from {self.video_dir}: {shown}{more}; pass missing_videos='skip' to skip them"
            )
        if self.missing_ids:
            log.warning("%s: skipping %d labelled ids without a video in %s", self.labels_json, len(self.missing_ids), self.video_dir)
        missing = set(self.missing_ids)
        self.video_ids = [i for i in share if i not in missing]
        if not self.video_ids:
            raise ValueError(
                f"no videos to read: {self.labels_json} lists {len(all_ids)} ids, process {process_index} of "
                f"{process_count} has {len(share)}, {len(self.missing_ids)} of them missing from {self.video_dir}"
            )
        self.stats = self._fresh_stats()

    def _fresh_stats(self) -> dict[str, Any]:
        return {
            "yielded": 0,
            "missing_videos": len(self.missing_ids),
            "decode_errors": 0,
            "too_short": 0,
            "failed_files": [],
        }

    def __len__(self) -> int:
        """Videos in this process's share (before decode failures)."""
        return len(self.video_ids)

    def video_path(self, video_id: str) -> str:
        return os.path.join(self.video_dir, video_id + self.video_ext)

    def traj_key(self, video_id: str) -> str:
        return f"{self.dataset_name}/{self.split_name}/{video_id}"

    def trajectory(self, video_id: str) -> dict[str, Any]:
        """Decodes one video -> its standardised trajectory (raises on failure)."""
        frames, _ = read_video(self.video_path(video_id), self.target_fps, self.max_frames, self.image_size)
        encoded = encode_frames(frames, self.encode, self.jpeg_quality)
        return video_trajectory(encoded, self.labels[video_id], self.traj_key(video_id), self.dataset_name, self.action_dim)

    def _try(self, video_id: str) -> tuple[str, Any]:
        try:
            return "ok", self.trajectory(video_id)
        except (VideoDecodeError, FileNotFoundError) as error:
            return "error", error

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
        if self.num_workers == 1:
            results = (self._try(i) for i in order)
            yield from self._collect(results, stats)
            return
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="video-decode") as pool:
            window = collections.deque()
            ids = iter(order)

            def results():
                for video_id in ids:
                    window.append(pool.submit(self._try, video_id))
                    if len(window) >= 2 * self.num_workers:
                        yield window.popleft().result()
                while window:
                    yield window.popleft().result()

            try:
                yield from self._collect(results(), stats)
            finally:
                for future in window:
                    future.cancel()

    def _collect(self, results, stats) -> Iterator[dict[str, Any]]:
        for status, value in results:
            if status == "error":
                if not self.ignore_errors:
                    raise value
                stats["decode_errors"] += 1
                stats["failed_files"].append(str(value))
                log.warning("skipping undecodable video: %s", value)
                continue
            if len(value["traj_key"]) < self.min_frames:
                stats["too_short"] += 1
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
    ``SomethingSomethingReader`` (target_fps, image_size, encode, process_index, process_count,
    ignore_errors, missing_videos, shuffle_seed, ...). Each pass over the dataset decodes the videos
    again (in a new order with ``shuffle_seed``). To read the skip counts, build the reader yourself
    and use ``reader.as_dataset()`` and ``reader.stats``.
    """
    reader = SomethingSomethingReader(video_dir, labels_json, split_name, num_workers=num_workers, **reader_kwargs)
    return reader.as_dataset()
