"""LeRobot datasets (a local directory, layouts v2.0, v2.1 and v3.0) read as trajectories and written.

LeRobot, openpi and GR00T users keep their data in this format: per-frame tables in Parquet, camera
streams in MP4, metadata in ``meta/``. Both layouts share ``meta/info.json``::

    {"codebase_version": "v3.0", "fps": 80, "robot_type": "sawyer", "total_episodes": 50, ...,
     "splits": {"train": "0:50"},
     "data_path":  "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",          (v3.0)
                   "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"  (v2.x)
     "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" (v3.0)
                   "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
     "features": {"observation.image": {"dtype": "video", "shape": [H, W, 3], ...},
                  "observation.state": {"dtype": "float32", "shape": [P]},
                  "action": {"dtype": "float32", "shape": [A]},
                  "timestamp": ..., "frame_index": ..., "episode_index": ..., "index": ...,
                  "task_index": ...}}

* v2.0 / v2.1: one Parquet file and one MP4 per camera for every episode (chunk =
  ``episode_index // chunks_size``); ``meta/episodes.jsonl`` (``episode_index``, ``tasks``,
  ``length``), ``meta/tasks.jsonl`` (``task_index``, ``task``), v2.1 adds
  ``meta/episodes_stats.jsonl``.
* v3.0: many episodes per file. ``meta/episodes/chunk-*/file-*.parquet`` gives, per episode, its
  data file (``data/chunk_index``, ``data/file_index``), its rows there (``dataset_from_index``,
  ``dataset_to_index``) and, per camera, its video file and its span in that file
  (``videos/<key>/from_timestamp`` .. ``to_timestamp``); ``meta/tasks.parquet`` maps task strings
  to ``task_index``; ``meta/stats.json`` holds the statistics.

Frame ``i`` of an episode is shown at ``timestamp`` (``i / fps`` as LeRobot writes it) from the
start of its span in the video; the reader takes, for every row, the decoded frame whose
presentation time is nearest to ``from_timestamp + timestamp`` and raises ``LeRobotFormatError``
when none lies within half a frame (a video shorter than its table). Features of dtype ``image``
(PNG/JPEG bytes in the Parquet table, the ``{"bytes", "path"}`` struct of Hugging Face datasets)
are read too.

Reading (``LeRobotSource``, the ``trajectories_fn`` of a pipeline dataset entry; ``lerobot_spec``
/ ``registry.register_lerobot``; the built-in entry ``lerobot`` reads the directory named by
``config.data.data_dir``): one trajectory per episode in the schema of ``jaxvla.data.schema``,

    observation/image_primary     tf.string [T]  (JPEG of the camera mapped to ``primary``)
    observation/image_{secondary,wrist}  [T]     (another camera each, or "")
    observation/proprio           float32 [T, P] (``observation.state``; P = 0 without it)
    observation/timestep          int32 [T]      (``frame_index``)
    action                        float32 [T, A] (zeros and has_action False without ``action``)
    has_action                    bool [T]
    task/language_instruction     tf.string [T]  (the task of ``task_index``)
    dataset_name, traj_key        tf.string [T]  (traj_key ``<name>/<split>/<episode_index>``)

Writing (``write_lerobot_dataset``, and ``scripts/export_lerobot.py`` for any dataset of the
registry, e.g. the Meta-World demonstrations): v3.0 by default (v2.1 selectable), H.264 video
(libx264, yuv420p, ``crf`` 18 unless given), per-episode and whole-dataset statistics (``min``,
``max``, ``mean``, ``std``, ``count``; images per channel in [0, 1]). The directory appears
complete or not at all: everything is written to a sibling temporary directory that is renamed
at the end.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import os
import shutil
import tempfile
from fractions import Fraction
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from jaxvla.data.schema import IMAGE_CAMERAS
from jaxvla.data.spec import DatasetSpec
from jaxvla.data.video import decode_timed, encode_frames, schema_trajectory, trajectory_signature

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("v2.0", "v2.1", "v3.0")
WRITE_VERSIONS = ("v2.1", "v3.0")
CHUNKS_SIZE = 1000  # episodes (v2.x) or files (v3.0) per chunk directory, as LeRobot writes them
STATE_KEY = "observation.state"
ACTION_KEY = "action"
IMAGE_DTYPES = ("video", "image")
# The per-frame bookkeeping columns every LeRobot table has.
INDEX_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
V2_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V2_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V3_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"


class LeRobotFormatError(ValueError):
    """A LeRobot directory that does not hold what its metadata promises (names the file and key)."""


# --------------------------------------------------------------------------- metadata


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (not a LeRobot dataset directory?)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise LeRobotFormatError(f"{path}: not valid JSON ({error})") from None


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise LeRobotFormatError(f"{path}:{number}: not valid JSON ({error})") from None
    return rows


def _parquet():
    import pyarrow.parquet as pq  # a dependency of jaxvla's; imported where Parquet is read or written

    return pq


@dataclasses.dataclass(frozen=True)
class LeRobotInfo:
    """``meta/info.json`` of the dataset at ``root``, checked."""

    root: str
    version: str
    fps: float
    features: dict[str, dict]
    data_path: str
    video_path: str | None
    splits: dict[str, str]
    chunks_size: int
    robot_type: str | None

    @property
    def camera_keys(self) -> list[str]:
        """Features holding frames (dtype ``video`` or ``image``), in the order info.json lists them."""
        return [k for k, f in self.features.items() if f.get("dtype") in IMAGE_DTYPES]

    def vector_dim(self, key: str) -> int:
        """Width of a 1-D float feature (0 when the dataset has no such feature)."""
        if key not in self.features:
            return 0
        shape = self.features[key].get("shape") or [1]
        if len(shape) != 1:
            raise LeRobotFormatError(f"{self.root}/meta/info.json: feature {key!r} has shape {shape}, expected [dim]")
        return int(shape[0])

    def image_hw(self, key: str) -> tuple[int, int]:
        feature = self.features[key]
        shape, names = list(feature.get("shape") or []), list(feature.get("names") or [])
        if len(shape) != 3:
            raise LeRobotFormatError(f"{self.root}/meta/info.json: camera {key!r} has shape {shape}, expected 3 dims")
        if names and len(names) == 3 and names[0] in ("channels", "channel", "c"):
            return int(shape[1]), int(shape[2])
        if names and len(names) == 3 and names[2] in ("channels", "channel", "c"):
            return int(shape[0]), int(shape[1])
        return (int(shape[1]), int(shape[2])) if int(shape[0]) in (1, 3, 4) else (int(shape[0]), int(shape[1]))


def read_info(root: str | os.PathLike) -> LeRobotInfo:
    """Reads and checks ``<root>/meta/info.json``. Raises FileNotFoundError for a missing file and
    ``LeRobotFormatError`` naming the key for a missing or unsupported entry."""
    root = os.path.abspath(os.fspath(root))
    path = os.path.join(root, "meta", "info.json")
    info = _read_json(path)
    if not isinstance(info, dict):
        raise LeRobotFormatError(f"{path}: expected a JSON object")
    for key in ("codebase_version", "fps", "features", "data_path"):
        if key not in info:
            raise LeRobotFormatError(f"{path}: no {key!r} entry")
    version = str(info["codebase_version"])
    if version not in SUPPORTED_VERSIONS:
        raise LeRobotFormatError(f"{path}: codebase_version {version!r} is not supported; "
                                 f"supported: {list(SUPPORTED_VERSIONS)}")
    fps = float(info["fps"])
    if not fps > 0:
        raise LeRobotFormatError(f"{path}: fps must be > 0, got {info['fps']!r}")
    features = info["features"]
    if not isinstance(features, dict):
        raise LeRobotFormatError(f"{path}: 'features' must be an object")
    if any(f.get("dtype") == "video" for f in features.values()) and not info.get("video_path"):
        raise LeRobotFormatError(f"{path}: video features but no 'video_path'")
    return LeRobotInfo(
        root=root, version=version, fps=fps, features=features, data_path=str(info["data_path"]),
        video_path=info.get("video_path"), splits=dict(info.get("splits") or {"train": f"0:{info.get('total_episodes', 0)}"}),
        chunks_size=int(info.get("chunks_size") or CHUNKS_SIZE), robot_type=info.get("robot_type"),
    )


def read_tasks(info: LeRobotInfo) -> dict[int, str]:
    """task_index -> task string (``meta/tasks.jsonl`` for v2.x, ``meta/tasks.parquet`` for v3.0)."""
    if info.version.startswith("v2"):
        path = os.path.join(info.root, "meta", "tasks.jsonl")
        rows = _read_jsonl(path)
        try:
            return {int(row["task_index"]): str(row["task"]) for row in rows}
        except KeyError as error:
            raise LeRobotFormatError(f"{path}: a row has no {error.args[0]!r}") from None
    path = os.path.join(info.root, "meta", "tasks.parquet")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing")
    table = _parquet().read_table(path).to_pydict()
    if "task_index" not in table:
        raise LeRobotFormatError(f"{path}: no 'task_index' column; columns: {sorted(table)}")
    # pandas writes the task strings as the (named or unnamed) index column.
    names = [c for c in ("task", "__index_level_0__") if c in table]
    if not names:
        raise LeRobotFormatError(f"{path}: no task string column ('task' or the pandas index); columns: {sorted(table)}")
    return {int(i): str(t) for i, t in zip(table["task_index"], table[names[0]])}


def read_episodes(info: LeRobotInfo) -> list[dict]:
    """Per-episode metadata sorted by ``episode_index``: ``episode_index``, ``length``, ``tasks``,
    ``data_file`` (path), ``rows`` ((from, to) in that file, v3.0) and ``videos`` {camera key:
    (path, from_timestamp)}."""
    episodes = []
    if info.version.startswith("v2"):
        path = os.path.join(info.root, "meta", "episodes.jsonl")
        for row in _read_jsonl(path):
            if "episode_index" not in row or "length" not in row:
                raise LeRobotFormatError(f"{path}: every row needs 'episode_index' and 'length', got {sorted(row)}")
            index = int(row["episode_index"])
            fields = {"episode_chunk": index // info.chunks_size, "episode_index": index}
            videos = {}
            for key in info.camera_keys:
                if info.features[key]["dtype"] == "video":
                    videos[key] = (os.path.join(info.root, info.video_path.format(video_key=key, **fields)), 0.0)
            episodes.append({
                "episode_index": index, "length": int(row["length"]), "tasks": list(row.get("tasks") or []),
                "data_file": os.path.join(info.root, info.data_path.format(**fields)), "rows": None, "videos": videos,
            })
    else:
        directory = os.path.join(info.root, "meta", "episodes")
        files = sorted(
            os.path.join(dirpath, name) for dirpath, _, names in os.walk(directory) for name in names
            if name.endswith(".parquet")
        )
        if not files:
            raise FileNotFoundError(f"{directory}: no episode metadata (meta/episodes/chunk-*/file-*.parquet)")
        needed = ["episode_index", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
                  "dataset_to_index"]
        for path in files:
            table = _parquet().read_table(path).to_pydict()
            missing = [c for c in needed if c not in table]
            if missing:
                raise LeRobotFormatError(f"{path}: no column(s) {missing}; columns: {sorted(table)}")
            for i in range(len(table["episode_index"])):
                data_file = info.data_path.format(chunk_index=int(table["data/chunk_index"][i]),
                                                  file_index=int(table["data/file_index"][i]))
                videos = {}
                for key in info.camera_keys:
                    if info.features[key]["dtype"] != "video":
                        continue
                    columns = [f"videos/{key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp")]
                    absent = [c for c in columns if c not in table]
                    if absent:
                        raise LeRobotFormatError(f"{path}: no column(s) {absent} for camera {key!r}")
                    video = info.video_path.format(video_key=key, chunk_index=int(table[columns[0]][i]),
                                                   file_index=int(table[columns[1]][i]))
                    videos[key] = (os.path.join(info.root, video), float(table[columns[2]][i]))
                episodes.append({
                    "episode_index": int(table["episode_index"][i]), "length": int(table["length"][i]),
                    "tasks": list(table["tasks"][i] or []) if "tasks" in table else [],
                    "data_file": os.path.join(info.root, data_file),
                    "rows": (int(table["dataset_from_index"][i]), int(table["dataset_to_index"][i])),
                    "videos": videos,
                })
    episodes.sort(key=lambda e: e["episode_index"])
    return episodes


def split_episodes(info: LeRobotInfo, episodes: Sequence[dict], split: str) -> list[dict]:
    """The episodes of ``split`` (info.json's ``splits``: ``"start:stop"`` episode ranges)."""
    if split not in info.splits:
        raise KeyError(f"{info.root}/meta/info.json: no split {split!r}; splits: {sorted(info.splits)}")
    text = str(info.splits[split])
    try:
        start, stop = (int(v) for v in text.split(":"))
    except ValueError:
        raise LeRobotFormatError(f"{info.root}/meta/info.json: split {split!r} is {text!r}, expected 'start:stop'") from None
    return [e for e in episodes if start <= e["episode_index"] < stop]


# --------------------------------------------------------------------------- frames


def decode_video_span(path: str, start: float, timestamps: np.ndarray, fps: float) -> np.ndarray:
    """Frames of ``path`` nearest to ``start + timestamps`` (seconds) -> uint8 [T, H, W, 3].

    Seeks to the keyframe before ``start`` and decodes until the last wanted time
    (``video.decode_timed``). Raises FileNotFoundError for a missing file, ``VideoDecodeError`` for
    one that cannot be decoded or has no video stream, and ``LeRobotFormatError`` naming the file
    when a wanted time has no frame within half a frame period (the video is shorter than its
    table); both are ValueErrors."""
    wanted = float(start) + np.asarray(timestamps, np.float64)
    tolerance = 0.5 / fps + 1e-4
    first = float(wanted.min()) if len(wanted) else float(start)
    last = float(wanted.max()) if len(wanted) else float(start)
    decoded_times: list[float] = []
    decoded: list[Any] = []
    # Seek a second early: the keyframe before the span may be up to a GOP before it.
    for t, frame, _ in decode_timed(path, seek_seconds=max(0.0, start - 1.0) if start > tolerance else 0.0):
        if t < first - tolerance:
            continue
        if t > last + tolerance:
            break
        decoded_times.append(float(t))
        decoded.append(frame)
    times = np.asarray(decoded_times)
    out = []
    for t in wanted:
        if len(times) == 0:
            raise LeRobotFormatError(f"{path}: no frame near {t:.4f} s (the video ends before its table)")
        nearest = int(np.argmin(np.abs(times - t)))
        if abs(times[nearest] - t) > tolerance:
            raise LeRobotFormatError(
                f"{path}: no frame within half a frame of {t:.4f} s (nearest {times[nearest]:.4f} s)"
            )
        out.append(decoded[nearest].to_ndarray(format="rgb24"))
    return np.stack(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


def _decode_image_cell(cell: Any, where: str) -> np.ndarray:
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not data:
        raise LeRobotFormatError(f"{where}: an image cell has no bytes")
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


# --------------------------------------------------------------------------- reader


@dataclasses.dataclass(frozen=True)
class LeRobotSource:
    """The ``trajectories_fn`` of a LeRobot dataset entry: reads ``root`` (None: the ``data_dir``
    the pipeline passes, i.e. ``config.data.data_dir``).

    ``cameras`` maps schema cameras (``primary``, ``secondary``, ``wrist``) to LeRobot feature
    keys; empty: the dataset's first camera is ``primary``. Training passes visit the episodes in
    a new seeded order each; evaluation reads them in episode order. Process ``i`` of ``n`` takes
    episodes ``i::n`` of the split."""

    root: str | None = None
    name: str = "lerobot"
    cameras: tuple[tuple[str, str], ...] = ()
    state_key: str = STATE_KEY
    action_key: str = ACTION_KEY
    jpeg_quality: int = 95

    def folder(self, data_dir: str | os.PathLike | None = None) -> str:
        folder = self.root or (os.fspath(data_dir) if data_dir else "")
        if not folder:
            raise ValueError(f"dataset {self.name!r}: no LeRobot directory; set config.data.data_dir to it "
                             "(or register the dataset with root=...)")
        return folder

    def camera_map(self, info: LeRobotInfo) -> dict[str, str]:
        """schema camera -> LeRobot feature key, checked against info.json."""
        if self.cameras:
            mapping = dict(self.cameras)
            for camera, key in mapping.items():
                if camera not in IMAGE_CAMERAS:
                    raise ValueError(f"dataset {self.name!r}: camera {camera!r} is not one of {IMAGE_CAMERAS}")
                if key not in info.camera_keys:
                    raise KeyError(f"{info.root}/meta/info.json: no camera feature {key!r}; cameras: {info.camera_keys}")
            return mapping
        if not info.camera_keys:
            raise LeRobotFormatError(f"{info.root}/meta/info.json: no video or image feature")
        return {"primary": info.camera_keys[0]}

    def trajectories(self, split: str = "train", *, train: bool = False, seed: int | None = 0,
                     process_index: int | None = 0, process_count: int | None = 1,
                     data_dir: str | os.PathLike | None = None, pass_index: int = 0) -> Iterator[dict[str, Any]]:
        """One pass over this process's share of ``split`` as schema trajectories (numpy, module
        docstring): episode order, or with ``train`` a permutation seeded by (seed, process,
        pass_index)."""
        info = read_info(self.folder(data_dir))
        cameras, tasks = self.camera_map(info), read_tasks(info)
        episodes = split_episodes(info, read_episodes(info), split)[(process_index or 0)::(process_count or 1)]
        if not episodes:
            raise ValueError(f"{info.root}: split {split!r} has no episodes for process {process_index} of {process_count}")
        if train:
            rng = np.random.default_rng([seed or 0, process_index or 0, pass_index])
            episodes = [episodes[i] for i in rng.permutation(len(episodes))]
        cache: dict[str, Any] = {}
        for episode in episodes:
            yield self.episode_trajectory(info, episode, cameras, tasks, split, cache)

    def episode_trajectory(self, info: LeRobotInfo, episode: dict, cameras: Mapping[str, str],
                           tasks: Mapping[int, str], split: str, cache: dict | None = None) -> dict[str, Any]:
        """One episode -> one schema trajectory (numpy)."""
        cache = {} if cache is None else cache
        path = episode["data_file"]
        if cache.get("path") != path:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: data file of episode {episode['episode_index']} missing")
            cache["path"], cache["table"] = path, _parquet().read_table(path).to_pydict()
        table = cache["table"]
        for column in ("episode_index", "frame_index", "timestamp"):
            if column not in table:
                raise LeRobotFormatError(f"{path}: no {column!r} column; columns: {sorted(table)}")
        rows = np.flatnonzero(np.asarray(table["episode_index"]) == episode["episode_index"])
        if len(rows) != episode["length"]:
            raise LeRobotFormatError(f"{path}: episode {episode['episode_index']} has {len(rows)} rows, its "
                                     f"metadata says length {episode['length']}")
        frame_index = np.asarray(table["frame_index"])[rows]
        rows = rows[np.argsort(frame_index, kind="stable")]
        length = len(rows)

        def column(key: str, width: int) -> np.ndarray:
            if not width:
                return np.zeros((length, 0), np.float32)
            if key not in table:
                raise LeRobotFormatError(f"{path}: no {key!r} column; columns: {sorted(table)}")
            values = np.asarray([table[key][r] for r in rows], np.float32).reshape(length, -1)
            if values.shape[1] != width:
                raise LeRobotFormatError(f"{path}: {key!r} has width {values.shape[1]}, info.json says {width}")
            return values

        proprio = column(self.state_key, info.vector_dim(self.state_key))
        action_dim = info.vector_dim(self.action_key)
        action = column(self.action_key, action_dim)
        timestamps = np.asarray([table["timestamp"][r] for r in rows], np.float64)
        if "task_index" in table:
            task_ids = [int(table["task_index"][r]) for r in rows]
            unknown = sorted(set(task_ids) - set(tasks))
            if unknown:
                raise LeRobotFormatError(f"{path}: task_index {unknown} not in the tasks table")
            instructions = [tasks[t] for t in task_ids]
        else:
            instructions = [episode["tasks"][0] if episode["tasks"] else ""] * length

        images = {}
        for camera, key in cameras.items():
            if info.features[key]["dtype"] == "video":
                video, start = episode["videos"][key]
                frames = decode_video_span(video, start, timestamps, info.fps)
            else:
                if key not in table:
                    raise LeRobotFormatError(f"{path}: no image column {key!r}")
                frames = np.stack([_decode_image_cell(table[key][r], f"{path}:{key}") for r in rows])
            images[camera] = encode_frames(frames, "jpeg", self.jpeg_quality)
        return schema_trajectory(images, instructions, f"{self.name}/{split}/{episode['episode_index']}", self.name,
                                 action=action if action_dim else None, action_dim=1, proprio=proprio,
                                 timestep=frame_index[np.argsort(frame_index, kind="stable")])

    def signature(self, info: LeRobotInfo) -> dict[str, Any]:
        """``tf.TensorSpec`` tree of ``episode_trajectory``'s output."""
        return trajectory_signature(info.vector_dim(self.action_key) or 1, info.vector_dim(self.state_key))

    def __call__(self, split: str, train: bool, seed: int | None, process_index: int | None,
                 process_count: int | None, data_dir: str | os.PathLike | None = None):
        """This process's trajectories as a ``tf.data.Dataset`` (one element per episode; a
        training pass revisits them in a new order each time the dataset is iterated)."""
        import tensorflow as tf

        info = read_info(self.folder(data_dir))
        passes = itertools.count()

        def one_pass():
            yield from self.trajectories(split, train=train, seed=seed, process_index=process_index,
                                         process_count=process_count, data_dir=data_dir, pass_index=next(passes))

        return tf.data.Dataset.from_generator(one_pass, output_signature=self.signature(info))


# --------------------------------------------------------------------------- writer


@dataclasses.dataclass
class LeRobotEpisode:
    """One episode to write: ``frames`` {camera feature key: uint8 [T, H, W, 3]}, ``state``
    float32 [T, P] (or None), ``action`` float32 [T, A] (or None), ``task`` its instruction."""

    frames: Mapping[str, np.ndarray]
    task: str
    state: np.ndarray | None = None
    action: np.ndarray | None = None

    @property
    def length(self) -> int:
        return len(next(iter(self.frames.values())))


def _vector_stats(values: np.ndarray) -> dict[str, list]:
    values = np.asarray(values, np.float64)
    return {"min": values.min(0).tolist(), "max": values.max(0).tolist(), "mean": values.mean(0).tolist(),
            "std": values.std(0).tolist(), "count": [int(len(values))]}


def _image_stats(frames: np.ndarray) -> dict[str, list]:
    """Per-channel statistics of frames in [0, 1], shaped [3, 1, 1] as LeRobot stores them."""
    pixels = np.asarray(frames, np.float64).reshape(-1, 3) / 255.0

    def shaped(v):
        return [[[float(x)]] for x in v]

    return {"min": shaped(pixels.min(0)), "max": shaped(pixels.max(0)), "mean": shaped(pixels.mean(0)),
            "std": shaped(pixels.std(0)), "count": [int(len(frames))]}


def _merge_stats(parts: Sequence[dict[str, list]]) -> dict[str, list]:
    """Whole-dataset statistics from per-episode ones (count-weighted mean and variance)."""
    counts = np.asarray([p["count"][0] for p in parts], np.float64)
    means = np.stack([np.asarray(p["mean"], np.float64) for p in parts])
    stds = np.stack([np.asarray(p["std"], np.float64) for p in parts])
    w = (counts / counts.sum()).reshape((-1,) + (1,) * (means.ndim - 1))
    mean = (w * means).sum(0)
    var = (w * (stds ** 2 + (means - mean) ** 2)).sum(0)
    return {"min": np.min([np.asarray(p["min"]) for p in parts], 0).tolist(),
            "max": np.max([np.asarray(p["max"]) for p in parts], 0).tolist(),
            "mean": mean.tolist(), "std": np.sqrt(var).tolist(), "count": [int(counts.sum())]}


class _VideoWriter:
    """Appends frames to an H.264 MP4 (pts = frames written so far, time base 1 / fps)."""

    def __init__(self, path: str, fps: float, height: int, width: int, codec: str, crf: int):
        import av

        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.container = av.open(path, mode="w")
        rate = Fraction(fps).limit_denominator(1000)
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.codec_context.time_base = 1 / rate
        if codec in ("libx264", "libx265"):
            self.stream.options = {"crf": str(int(crf)), "g": "2"}
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        import av

        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = self.frames
            self.frames += 1
            for packet in self.stream.encode(frame):
                self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def _table(columns: Mapping[str, Any], features: Mapping[str, dict]):
    import pyarrow as pa

    arrays = {}
    for key, values in columns.items():
        dtype = features[key]["dtype"]
        width = int((features[key].get("shape") or [1])[0])
        if key in INDEX_FEATURES:
            arrays[key] = pa.array(values, pa.float32() if dtype == "float32" else pa.int64())
        else:
            arrays[key] = pa.array([list(map(float, v)) for v in values], pa.list_(pa.float32(), width))
    return pa.table(arrays)


def write_lerobot_dataset(
    root: str | os.PathLike,
    episodes: Iterable[LeRobotEpisode],
    *,
    fps: float,
    version: str = "v3.0",
    robot_type: str | None = None,
    codec: str = "libx264",
    crf: int = 18,
    overwrite: bool = False,
    progress: bool = False,
) -> LeRobotInfo:
    """Writes ``episodes`` as a LeRobot dataset at ``root`` (module docstring) and returns its info.

    Every episode must have the same cameras (frame sizes even, as yuv420p needs) and the same
    state / action widths. Raises FileExistsError when ``root`` exists (unless ``overwrite``) and
    ValueError naming the episode for inconsistent episodes; on any error nothing is left at
    ``root``."""
    if version not in WRITE_VERSIONS:
        raise ValueError(f"version must be one of {WRITE_VERSIONS}, got {version!r}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    root = os.path.abspath(os.fspath(root))
    if os.path.exists(root) and not overwrite:
        raise FileExistsError(f"{root} exists; pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.", dir=parent)
    try:
        info = _write(staging, root, episodes, fps=float(fps), version=version, robot_type=robot_type, codec=codec,
                      crf=crf, progress=progress)
        if os.path.exists(root):
            shutil.rmtree(root)
        os.rename(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dataclasses.replace(info, root=root)


def _write(out: str, root: str, episodes: Iterable[LeRobotEpisode], *, fps: float, version: str,
           robot_type: str | None, codec: str, crf: int, progress: bool) -> LeRobotInfo:
    from tqdm import tqdm

    pq = _parquet()
    features: dict[str, dict] | None = None
    cameras: list[str] = []
    tasks: dict[str, int] = {}
    episode_rows: list[dict] = []
    episode_stats: list[dict] = []
    columns: dict[str, list] = {}
    videos: dict[str, _VideoWriter] = {}
    total = 0
    for episode_index, episode in enumerate(tqdm(episodes, desc="LeRobot episodes", unit="ep", disable=not progress)):
        length = episode.length
        where = f"episode {episode_index}"
        if length == 0:
            raise ValueError(f"{where}: no frames")
        if features is None:
            cameras = sorted(episode.frames)
            features = {}
            for key in cameras:
                _, height, width, channels = np.shape(episode.frames[key])
                if channels != 3 or height % 2 or width % 2:
                    raise ValueError(f"{where}: camera {key!r} frames are {np.shape(episode.frames[key])[1:]}; "
                                     "expected [H, W, 3] with H and W even (yuv420p)")
                features[key] = {
                    "dtype": "video", "shape": [int(height), int(width), 3], "names": ["height", "width", "channels"],
                    "info": {"video.height": int(height), "video.width": int(width), "video.codec": "h264",
                             "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                             "video.channels": 3, "has_audio": False},
                }
            for key, value in ((STATE_KEY, episode.state), (ACTION_KEY, episode.action)):
                if value is not None:
                    width = int(np.shape(value)[1])
                    features[key] = {"dtype": "float32", "shape": [width],
                                     "names": [f"{key.split('.')[-1]}_{i}" for i in range(width)]}
            features.update(INDEX_FEATURES)
        if sorted(episode.frames) != cameras:
            raise ValueError(f"{where}: cameras {sorted(episode.frames)}, the first episode had {cameras}")
        for key, value in ((STATE_KEY, episode.state), (ACTION_KEY, episode.action)):
            if (value is None) != (key not in features):
                raise ValueError(f"{where}: {key} present in some episodes and absent in others")
            if value is not None and np.shape(value) != (length, features[key]["shape"][0]):
                raise ValueError(f"{where}: {key} has shape {np.shape(value)}, expected ({length}, "
                                 f"{features[key]['shape'][0]})")
        for key in cameras:
            if tuple(np.shape(episode.frames[key])) != (length, *features[key]["shape"]):
                raise ValueError(f"{where}: camera {key!r} frames {np.shape(episode.frames[key])}, expected "
                                 f"({length}, {', '.join(map(str, features[key]['shape']))})")
        task_index = tasks.setdefault(episode.task, len(tasks))
        per_frame = {
            "timestamp": (np.arange(length) / fps).astype(np.float32).tolist(),
            "frame_index": list(range(length)),
            "episode_index": [episode_index] * length,
            "index": list(range(total, total + length)),
            "task_index": [task_index] * length,
        }
        if episode.state is not None:
            per_frame[STATE_KEY] = np.asarray(episode.state, np.float32).tolist()
        if episode.action is not None:
            per_frame[ACTION_KEY] = np.asarray(episode.action, np.float32).tolist()
        stats = {key: _image_stats(episode.frames[key]) for key in cameras}
        for key in (STATE_KEY, ACTION_KEY):
            if key in per_frame:
                stats[key] = _vector_stats(per_frame[key])
        for key in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
            stats[key] = _vector_stats(np.asarray(per_frame[key], np.float64)[:, None])
        episode_stats.append(stats)
        row = {"episode_index": episode_index, "tasks": [episode.task], "length": length}
        if version == "v2.1":
            fields = {"episode_chunk": episode_index // CHUNKS_SIZE, "episode_index": episode_index}
            pq.write_table(_table(per_frame, features), _mkdirs(os.path.join(out, V2_DATA_PATH.format(**fields))))
            for key in cameras:
                writer = _VideoWriter(os.path.join(out, V2_VIDEO_PATH.format(video_key=key, **fields)), fps,
                                      *features[key]["shape"][:2], codec, crf)
                writer.write(episode.frames[key])
                writer.close()
        else:
            for key, values in per_frame.items():
                columns.setdefault(key, []).extend(values)
            row.update({"data/chunk_index": 0, "data/file_index": 0, "dataset_from_index": total,
                        "dataset_to_index": total + length})
            for key in cameras:
                if key not in videos:
                    videos[key] = _VideoWriter(os.path.join(out, V3_VIDEO_PATH.format(
                        video_key=key, chunk_index=0, file_index=0)), fps, *features[key]["shape"][:2], codec, crf)
                start = videos[key].frames
                videos[key].write(episode.frames[key])
                row.update({f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": 0,
                            f"videos/{key}/from_timestamp": start / fps,
                            f"videos/{key}/to_timestamp": (start + length) / fps})
        episode_rows.append(row)
        total += length
    if features is None:
        raise ValueError("no episodes to write")
    meta = os.path.join(out, "meta")
    os.makedirs(meta, exist_ok=True)
    if version == "v2.1":
        with open(os.path.join(meta, "episodes.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in episode_rows)
        with open(os.path.join(meta, "tasks.jsonl"), "w") as f:
            f.writelines(json.dumps({"task_index": i, "task": t}) + "\n" for t, i in tasks.items())
        with open(os.path.join(meta, "episodes_stats.jsonl"), "w") as f:
            f.writelines(json.dumps({"episode_index": i, "stats": s}) + "\n" for i, s in enumerate(episode_stats))
        data_path, video_path = V2_DATA_PATH, V2_VIDEO_PATH
    else:
        import pyarrow as pa

        for writer in videos.values():
            writer.close()
        pq.write_table(_table(columns, features), _mkdirs(os.path.join(out, V3_DATA_PATH.format(chunk_index=0, file_index=0))))
        # LeRobot reads this with pandas and looks tasks up by the index: the pandas metadata makes
        # the "task" column the index.
        pandas_meta = {"index_columns": ["task"], "column_indexes": [], "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object",
             "metadata": None}]}
        task_table = pa.table({"task_index": pa.array(list(tasks.values()), pa.int64()),
                               "task": pa.array(list(tasks), pa.string())})
        task_table = task_table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})
        pq.write_table(task_table, os.path.join(meta, "tasks.parquet"))
        flat_rows = []
        for row, stats in zip(episode_rows, episode_stats):
            flat = dict(row)
            for key, values in stats.items():
                for name, value in values.items():
                    flat[f"stats/{key}/{name}"] = np.asarray(value, np.float64).reshape(-1).tolist()
            flat_rows.append(flat)
        pq.write_table(pa.Table.from_pylist(flat_rows),
                       _mkdirs(os.path.join(out, V3_EPISODES_PATH.format(chunk_index=0, file_index=0))))
        data_path, video_path = V3_DATA_PATH, V3_VIDEO_PATH
    merged = {key: _merge_stats([s[key] for s in episode_stats]) for key in episode_stats[0]}
    with open(os.path.join(meta, "stats.json"), "w") as f:
        json.dump(merged, f)
    info = {
        "codebase_version": version, "robot_type": robot_type, "total_episodes": len(episode_rows),
        "total_frames": total, "total_tasks": len(tasks), "chunks_size": CHUNKS_SIZE, "fps": fps,
        "splits": {"train": f"0:{len(episode_rows)}"}, "data_path": data_path, "video_path": video_path,
        "features": features,
    }
    if version == "v2.1":
        info.update({"total_videos": len(episode_rows) * len(cameras), "total_chunks": 1 + (len(episode_rows) - 1) // CHUNKS_SIZE})
    else:
        info.update({"data_files_size_in_mb": 100, "video_files_size_in_mb": 200})
    with open(os.path.join(meta, "info.json"), "w") as f:
        json.dump(info, f, indent=4)
    return read_info(out)


def _mkdirs(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


# --------------------------------------------------------------------------- the registry entry


def lerobot_spec(root: str | os.PathLike | None = None, name: str = "lerobot", *,
                 cameras: Mapping[str, str] | None = None, state_key: str = STATE_KEY, action_key: str = ACTION_KEY,
                 gripper_dims: Sequence[int] = (), kind: str = "robot") -> DatasetSpec:
    """A ``DatasetSpec`` (``jaxvla.data.spec``) reading the LeRobot dataset at ``root`` (None: the directory
    ``config.data.data_dir`` names) through ``LeRobotSource``. With a ``root`` the spec's
    ``control_hz`` is info.json's ``fps`` (so gaps in seconds become frames); without one the rate
    is unknown until read, and pairs / clips need ``config.data.gap_frames``. ``gripper_dims``: the
    binary action dims (left unnormalised; e.g. ``(3,)`` for exported Meta-World). One split: the
    validation split reads the same episodes."""
    source = LeRobotSource(None if root is None else os.fspath(root), name,
                           tuple(sorted((cameras or {}).items())), state_key, action_key)
    return DatasetSpec(
        name=name, kind=kind, control_hz=read_info(root).fps if root is not None else None,
        train_split="train", val_split="train", gripper_dims=tuple(int(d) for d in gripper_dims),
        trajectories_fn=source, fingerprint=repr(source),
    )

