"""Latent action labels on disk, and their join onto standardised trajectories.

The LAQ labeller (stage 1) gives frames of trajectories latent action codes; later stages read them
back by (``traj_key``, ``observation/timestep``). Not every frame has a label: with pairs
``(x_t, x_{t+H})`` the last ``H`` frames of a trajectory have none.

On-disk format (one directory)::

    label_dir/
        labels_info.json          {"format": "jaxvla.latent_labels", "version": 1,
                                   "laq_config_hash": str, "laq_weights": str | null,
                                   "code_shape": [..], "codebook_size": int,
                                   "count": trajectories, "num_frames": labelled frames,
                                   "created": ISO-8601 UTC, "meta": {...},
                                   "shards": [{"file", "count", "num_frames", "bytes"}, ...]}
        labels-00000.tfrecord     one tf.train.Example per trajectory:
                                      traj_key     bytes      the trajectory's schema traj_key
                                      frame_index  int64 [N]  labelled frame indices, ascending, unique
                                      codes        int64 [N * prod(code_shape)]  row-major codes
        labels-00000.json         the shard's manifest: {"file", "count", "num_frames", "bytes",
                                   "keys": [traj_key, ...]}
        ...

Writing is atomic and resumable. ``LatentLabelWriter`` works in the sibling directory
``<label_dir>.incomplete`` and renames it to ``label_dir`` in ``close()``, so ``label_dir`` never
holds a partial result. Shards are the units of completion: records stream into
``labels-NNNNN.tfrecord.tmp``; after ``shard_size`` trajectories the file is flushed, synced and
renamed, and its manifest is written (temp file + rename). A shard is complete iff its manifest
exists and names the tfrecord's byte size. The staging directory also holds ``writer_state.json``
(hash, weights fingerprint, code shape, codebook size, meta) so a resumed run with another LAQ
config, or the same config trained again (``laq_weights``: the SHA-256 fingerprint of the LAQ
checkpoint's digest manifest), is refused with ``LabelResumeError``: codes of two different LAQs
never end up in one label directory. ``LatentLabelWriter(..., resume=True)`` after a crash keeps
the complete shards, deletes everything else in the staging directory and reports the labelled
keys in ``done_keys()``; the labeller skips those and carries on. The staging directory and the
final directory must be on one local file system (``os.replace`` of a directory).

Several labelling processes each write ``label_dir/part-<i>`` (a label directory of its own);
``merge_label_parts`` then writes ``label_dir/labels_info.json`` listing every part's shards by
relative path (``part-00000/labels-00000.tfrecord``), so readers see one directory.

The join (``join_latent_labels``) is pure TensorFlow: a ``tf.lookup.StaticHashTable`` maps
``traj_key`` to a row; each row's frames are a slice of one flat, per-row sorted ``frame_index``
array (``row_splits`` as in a ragged tensor) and ``tf.searchsorted`` finds each timestep in it, so
the join runs inside tf.data's parallel map without the GIL. All labels are held in memory (4 bytes
per code plus 8 per labelled frame: SSv2's 220k clips at ~40 frames x 4 codes is ~180 MB).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "jaxvla.latent_labels"
FORMAT_VERSION = 1
INFO_FILE = "labels_info.json"
STAGING_SUFFIX = ".incomplete"
WRITER_STATE_FILE = "writer_state.json"
_SHARD_RE = re.compile(r"^labels-(\d{5})\.(tfrecord|json)$")
# What makes two label directories the same LAQ's codes: a finished part is resumed, and parts are
# merged, only when these agree.
IDENTITY_KEYS = ("laq_config_hash", "laq_weights", "code_shape", "codebook_size")


class LabelResumeError(ValueError):
    """An unfinished or finished labelling run cannot be continued: it was labelled by another LAQ
    (config hash or weights fingerprint) or with another code shape. Start over with
    ``overwrite=True`` (without ``resume``)."""


def config_hash(config: Any) -> str:
    """A stable 16-hex-digit hash of a config (ml_collections ConfigDict, mapping or JSON-able)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def staging_dir(label_dir: str | os.PathLike) -> str:
    """Where an unfinished labelling run of ``label_dir`` lives."""
    return os.fspath(label_dir).rstrip("/\\") + STAGING_SUFFIX


def is_complete(label_dir: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(label_dir), INFO_FILE))


def _shard_name(index: int) -> str:
    return f"labels-{index:05d}.tfrecord"


def _manifest_name(index: int) -> str:
    return f"labels-{index:05d}.json"


def _write_json_atomic(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_path(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LatentLabelWriter:
    """Writes latent action labels, one record per trajectory, atomically and resumably.

    ``add(traj_key, frame_indices [N], codes [N, *code_shape])`` once per trajectory (N may be 0: a
    trajectory too short to label is still recorded as labelled), then ``close()``. As a context
    manager an exception aborts the unfinished shard and keeps the completed ones for a resumed run;
    a clean exit closes.

    ``resume=True`` continues ``<out_dir>.incomplete`` if it exists (the config hash, the weights
    fingerprint ``laq_weights``, code shape and codebook size must match, else ``LabelResumeError``);
    ``overwrite=True`` discards a previous run (finished or not). Without
    either, an existing output or staging directory is an error that says which flag to pass.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        laq_config_hash: str,
        code_shape: Sequence[int],
        codebook_size: int,
        meta: Mapping[str, Any] | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        shard_size: int = 1024,
        laq_weights: str | None = None,
    ):
        self.out_dir = os.fspath(out_dir).rstrip("/\\")
        self.staging = staging_dir(self.out_dir)
        self.laq_config_hash = str(laq_config_hash)
        self.laq_weights = None if laq_weights is None else str(laq_weights)
        self.code_shape = tuple(int(d) for d in code_shape)
        self.code_size = int(np.prod(self.code_shape)) if self.code_shape else 1
        self.codebook_size = int(codebook_size)
        self.meta = dict(meta or {})
        self.overwrite = overwrite
        self.shard_size = int(shard_size)
        if any(d <= 0 for d in self.code_shape) or self.codebook_size <= 0 or self.shard_size <= 0:
            raise ValueError(
                f"need positive code_shape, codebook_size and shard_size; got {self.code_shape}, "
                f"{self.codebook_size}, {self.shard_size}"
            )
        try:
            json.dumps(self.meta)
        except TypeError as error:
            raise ValueError(f"meta must be JSON-serialisable: {error}") from error

        if os.path.exists(self.out_dir) and not overwrite:
            if is_complete(self.out_dir):
                raise FileExistsError(
                    f"{self.out_dir} already holds finished latent labels (nothing to resume); "
                    "pass overwrite=True to replace them"
                )
            if not (os.path.isdir(self.out_dir) and not os.listdir(self.out_dir)):
                raise FileExistsError(f"{self.out_dir} exists and is not a latent label directory; pass overwrite=True to replace it")
        if os.path.exists(self.staging):
            if overwrite and not resume:
                shutil.rmtree(self.staging)
            elif not resume:
                raise FileExistsError(
                    f"an interrupted labelling run left {self.staging}; pass resume=True to continue it "
                    "or overwrite=True to discard it"
                )
        self._shards: list[dict[str, Any]] = []  # manifests of the completed shards
        self._done: set[str] = set()
        self._pending_keys: list[str] = []
        self._pending_set: set[str] = set()
        self._pending_frames = 0
        if os.path.isdir(self.staging):
            self._recover()
        else:
            os.makedirs(self.staging)
        self._write_state()
        self._next_shard = 1 + max((int(_SHARD_RE.match(s["file"]).group(1)) for s in self._shards), default=-1)
        self._writer = None
        self._closed = False
        self._aborted = False
        self.resumed_count = len(self._done)
        if self.resumed_count:
            log.info("%s: resuming, %d trajectories already labelled in %d shards", self.staging, self.resumed_count, len(self._shards))

    # -- state -------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "laq_config_hash": self.laq_config_hash,
            "laq_weights": self.laq_weights,
            "code_shape": list(self.code_shape),
            "codebook_size": self.codebook_size,
            "meta": self.meta,
        }

    def _write_state(self) -> None:
        _write_json_atomic(os.path.join(self.staging, WRITER_STATE_FILE), self._state())

    def _recover(self) -> None:
        """Keeps the complete shards of an interrupted run and deletes everything else."""
        state_path = os.path.join(self.staging, WRITER_STATE_FILE)
        if os.path.isfile(state_path):
            with open(state_path, encoding="utf-8") as f:
                state = json.load(f)
            if state["laq_config_hash"] != self.laq_config_hash:
                raise LabelResumeError(
                    f"{self.staging}: the interrupted run labelled with LAQ config hash "
                    f"{state['laq_config_hash']!r}, this writer has {self.laq_config_hash!r}; "
                    "pass overwrite=True (without resume) to start over"
                )
            if state.get("laq_weights") != self.laq_weights:
                raise LabelResumeError(
                    f"{self.staging}: the interrupted run labelled with LAQ weights {state.get('laq_weights')!r}, "
                    f"this writer has {self.laq_weights!r} (the same config trained again); pass overwrite=True "
                    "(without resume) to start over"
                )
            if tuple(state["code_shape"]) != self.code_shape or state["codebook_size"] != self.codebook_size:
                raise LabelResumeError(
                    f"{self.staging}: the interrupted run wrote code_shape {tuple(state['code_shape'])}, "
                    f"codebook_size {state['codebook_size']}; this writer has {self.code_shape}, {self.codebook_size}"
                )
            if state.get("meta", {}) != self.meta:
                log.warning("%s: meta differs from the interrupted run's; keeping the new one", self.staging)
        names = set(os.listdir(self.staging))
        keep = {WRITER_STATE_FILE}
        for name in sorted(names):
            match = _SHARD_RE.match(name)
            if not match or match.group(2) != "json":
                continue
            index = int(match.group(1))
            try:
                with open(os.path.join(self.staging, name), encoding="utf-8") as f:
                    manifest = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            shard = _shard_name(index)
            shard_path = os.path.join(self.staging, shard)
            if manifest.get("file") != shard or not os.path.isfile(shard_path) or os.path.getsize(shard_path) != manifest.get("bytes"):
                continue
            overlap = self._done.intersection(manifest["keys"])
            if overlap:
                raise ValueError(f"{self.staging}: shard {shard} repeats keys of another shard: {sorted(overlap)[:5]}")
            self._done.update(manifest["keys"])
            self._shards.append(manifest)
            keep.update({name, shard})
        for name in names - keep:
            path = os.path.join(self.staging, name)
            log.info("%s: removing unfinished %s", self.staging, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)

    # -- writing -----------------------------------------------------------------------------

    def done_keys(self) -> frozenset[str]:
        """Every traj_key labelled so far: in completed shards (also those of a resumed run) or added
        in this session."""
        return frozenset(self._done) | frozenset(self._pending_keys)

    def __len__(self) -> int:
        return len(self._done) + len(self._pending_keys)

    def add(self, traj_key: str, frame_indices, codes) -> None:
        """Records one trajectory's labels: ``frame_indices`` int [N], ``codes`` int [N, *code_shape]."""
        import tensorflow as tf

        if self._closed:
            raise RuntimeError(f"{self.out_dir}: writer is closed")
        if isinstance(traj_key, bytes):
            traj_key = traj_key.decode("utf-8")
        if not isinstance(traj_key, str) or not traj_key:
            raise ValueError(f"traj_key must be a non-empty string, got {traj_key!r}")
        if traj_key in self._done or traj_key in self._pending_set:
            raise ValueError(f"{traj_key!r} is already labelled (see done_keys())")
        frames = np.asarray(frame_indices)
        codes = np.asarray(codes)
        if frames.ndim != 1 or (frames.size and not np.issubdtype(frames.dtype, np.integer)):
            raise ValueError(f"{traj_key}: frame_indices must be int [N], got {frames.dtype} {frames.shape}")
        expected = (len(frames), *self.code_shape)
        if codes.shape != expected or (codes.size and not np.issubdtype(codes.dtype, np.integer)):
            raise ValueError(f"{traj_key}: codes must be int {list(expected)}, got {codes.dtype} {list(codes.shape)}")
        frames = frames.astype(np.int64)
        codes = codes.astype(np.int64).reshape(len(frames), self.code_size)
        if frames.size and frames.min() < 0:
            raise ValueError(f"{traj_key}: negative frame index {frames.min()}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"{traj_key}: codes must be in [0, {self.codebook_size}), got range [{codes.min()}, {codes.max()}]"
            )
        order = np.argsort(frames, kind="stable")
        frames, codes = frames[order], codes[order]
        if frames.size > 1 and np.any(np.diff(frames) == 0):
            raise ValueError(f"{traj_key}: frame index {frames[np.argmax(np.diff(frames) == 0)]} appears twice")

        example = tf.train.Example(
            features=tf.train.Features(
                feature={
                    "traj_key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[traj_key.encode("utf-8")])),
                    "frame_index": tf.train.Feature(int64_list=tf.train.Int64List(value=frames.tolist())),
                    "codes": tf.train.Feature(int64_list=tf.train.Int64List(value=codes.reshape(-1).tolist())),
                }
            )
        )
        if self._writer is None:
            self._writer = tf.io.TFRecordWriter(self._tmp_path())
        self._writer.write(example.SerializeToString())
        self._pending_keys.append(traj_key)
        self._pending_set.add(traj_key)
        self._pending_frames += len(frames)
        if len(self._pending_keys) >= self.shard_size:
            self._commit_shard()

    def _tmp_path(self) -> str:
        return os.path.join(self.staging, _shard_name(self._next_shard) + ".tmp")

    def _commit_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        shard = _shard_name(self._next_shard)
        path = os.path.join(self.staging, shard)
        _fsync_path(self._tmp_path())
        os.replace(self._tmp_path(), path)
        manifest = {
            "file": shard,
            "count": len(self._pending_keys),
            "num_frames": self._pending_frames,
            "bytes": os.path.getsize(path),
            "keys": list(self._pending_keys),
        }
        _write_json_atomic(os.path.join(self.staging, _manifest_name(self._next_shard)), manifest)
        _fsync_dir(self.staging)
        self._shards.append(manifest)
        self._done.update(self._pending_keys)
        self._pending_keys = []
        self._pending_set.clear()
        self._pending_frames = 0
        self._next_shard += 1

    def abort(self) -> None:
        """Drops the unfinished shard; completed shards stay for ``resume=True``."""
        if self._closed:
            return
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            if os.path.exists(self._tmp_path()):
                os.remove(self._tmp_path())
        self._pending_keys = []
        self._pending_set.clear()
        self._pending_frames = 0
        self._closed = self._aborted = True

    def close(self) -> str:
        """Completes the last shard, writes ``labels_info.json`` and moves the directory into place.
        Returns the label directory."""
        if self._aborted:
            raise RuntimeError(f"{self.out_dir}: writer was aborted; resume with resume=True to finish")
        if self._closed:
            return self.out_dir
        self._commit_shard()
        shards = sorted(self._shards, key=lambda s: s["file"])
        info = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            **self._state(),
            "count": sum(s["count"] for s in shards),
            "num_frames": sum(s["num_frames"] for s in shards),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "shards": [{k: s[k] for k in ("file", "count", "num_frames", "bytes")} for s in shards],
        }
        _write_json_atomic(os.path.join(self.staging, INFO_FILE), info)
        old = None
        if os.path.exists(self.out_dir):
            if os.path.isdir(self.out_dir) and not os.listdir(self.out_dir):
                os.rmdir(self.out_dir)
            else:
                old = f"{self.out_dir}.replaced-{os.getpid()}"
                os.replace(self.out_dir, old)
        os.replace(self.staging, self.out_dir)
        _fsync_dir(os.path.dirname(os.path.abspath(self.out_dir)))
        try:
            os.remove(os.path.join(self.out_dir, WRITER_STATE_FILE))
        except OSError:
            pass
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
        self._closed = True
        log.info("%s: %d trajectories, %d labelled frames", self.out_dir, info["count"], info["num_frames"])
        return self.out_dir

    def __enter__(self) -> "LatentLabelWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# -- reading -------------------------------------------------------------------------------------


class LatentLabels:
    """All labels of one label directory in memory.

    ``keys`` [K] (str), ``row_splits`` int64 [K + 1], ``frame_index`` int64 [F] (ascending within
    each row), ``codes`` int32 [F, *code_shape]: trajectory ``keys[r]`` has frames
    ``frame_index[row_splits[r]:row_splits[r + 1]]``. ``labels[key] -> (frame_index, codes)``.
    """

    def __init__(self, info: Mapping[str, Any], keys: Sequence[str], row_splits: np.ndarray, frame_index: np.ndarray, codes: np.ndarray):
        self.info = dict(info)
        self.code_shape = tuple(info["code_shape"])
        self.keys = list(keys)
        self.row_splits = np.asarray(row_splits, np.int64)
        self.frame_index = np.asarray(frame_index, np.int64)
        self.codes = np.asarray(codes, np.int32).reshape((-1, *self.code_shape))
        self.rows = {key: row for row, key in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key) -> bool:
        return (key.decode("utf-8") if isinstance(key, bytes) else key) in self.rows

    def __getitem__(self, key) -> tuple[np.ndarray, np.ndarray]:
        key = key.decode("utf-8") if isinstance(key, bytes) else key
        if key not in self.rows:
            raise KeyError(f"no latent labels for trajectory {key!r}")
        row = self.rows[key]
        start, end = self.row_splits[row], self.row_splits[row + 1]
        return self.frame_index[start:end], self.codes[start:end]

    def items(self) -> Iterable[tuple[str, tuple[np.ndarray, np.ndarray]]]:
        for key in self.keys:
            yield key, self[key]


def check_finished_part(label_dir: str | os.PathLike, laq_config_hash: str, laq_weights: str | None,
                        code_shape: Sequence[int], codebook_size: int) -> None:
    """Raises ``LabelResumeError`` unless the finished label directory ``label_dir`` was labelled by
    this LAQ (config hash and weights fingerprint) with this code shape and codebook size: a
    resumed labelling keeps a finished part only when it is what labelling again would write."""
    info = _read_info(os.fspath(label_dir))
    expected = (str(laq_config_hash), laq_weights, [int(d) for d in code_shape], int(codebook_size))
    for key, value in zip(IDENTITY_KEYS, expected):
        if info.get(key) != value:
            raise LabelResumeError(
                f"{label_dir}: this finished part was labelled with {key}={info.get(key)!r}, this run has "
                f"{value!r}; pass overwrite=True (without resume) to label it again"
            )


def _read_info(label_dir: str) -> dict[str, Any]:
    info_path = os.path.join(label_dir, INFO_FILE)
    if not os.path.isfile(info_path):
        hint = ""
        if os.path.isdir(staging_dir(label_dir)):
            hint = f"; an unfinished labelling run is in {staging_dir(label_dir)} (resume the labeller)"
        what = "no latent label directory" if not os.path.isdir(label_dir) else f"no {INFO_FILE} in latent label directory"
        raise FileNotFoundError(f"{label_dir}: {what}{hint}")
    with open(info_path, encoding="utf-8") as f:
        info = json.load(f)
    if info.get("format") != FORMAT or info.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{info_path}: format {info.get('format')!r} version {info.get('version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    return info


def load_latent_labels(label_dir: str | os.PathLike) -> tuple[dict[str, Any], LatentLabels]:
    """Reads a label directory -> (info dict of ``labels_info.json``, ``LatentLabels``)."""
    import tensorflow as tf

    label_dir = os.fspath(label_dir)
    info = _read_info(label_dir)
    code_shape = tuple(info["code_shape"])
    code_size = int(np.prod(code_shape)) if code_shape else 1
    files = []
    for shard in info["shards"]:
        path = os.path.join(label_dir, shard["file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{label_dir}: shard {shard['file']} listed in {INFO_FILE} is missing")
        files.append(path)

    keys: list[str] = []
    lengths: list[np.ndarray] = []
    frames: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    if files:
        features = {
            "traj_key": tf.io.FixedLenFeature([], tf.string),
            "frame_index": tf.io.RaggedFeature(tf.int64, row_splits_dtype=tf.int64),
            "codes": tf.io.RaggedFeature(tf.int64, row_splits_dtype=tf.int64),
        }
        dataset = tf.data.TFRecordDataset(files).batch(4096).map(lambda s: tf.io.parse_example(s, features))
        for batch in dataset:
            frame_rt, code_rt = batch["frame_index"], batch["codes"]
            n = frame_rt.row_lengths().numpy()
            if not np.array_equal(code_rt.row_lengths().numpy(), n * code_size):
                raise ValueError(f"{label_dir}: a record's codes are not [N, {list(code_shape)}] for its N frames")
            keys.extend(k.decode("utf-8") for k in batch["traj_key"].numpy())
            lengths.append(n)
            frames.append(frame_rt.flat_values.numpy())
            codes.append(code_rt.flat_values.numpy())
    if len(keys) != info["count"]:
        raise ValueError(f"{label_dir}: {INFO_FILE} says {info['count']} trajectories, the shards hold {len(keys)}")
    if len(set(keys)) != len(keys):
        seen, repeated = set(), []
        for key in keys:
            (repeated.append(key) if key in seen else seen.add(key))
        raise ValueError(f"{label_dir}: trajectories labelled twice: {repeated[:5]}")
    lengths_all = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    row_splits = np.concatenate([[0], np.cumsum(lengths_all)]).astype(np.int64)
    frame_index = np.concatenate(frames) if frames else np.zeros(0, np.int64)
    flat_codes = np.concatenate(codes) if codes else np.zeros(0, np.int64)
    # Ascending within each row (the writer sorts): a drop is allowed only where a row starts.
    drops = np.nonzero(np.diff(frame_index) <= 0)[0] + 1
    if not np.all(np.isin(drops, row_splits)):
        raise ValueError(f"{label_dir}: frame indices are not ascending and unique within a trajectory")
    labels = LatentLabels(info, keys, row_splits, frame_index, flat_codes.reshape(-1, code_size))
    return info, labels


# -- the join ------------------------------------------------------------------------------------


class JoinStats:
    """Counts of a ``join_latent_labels(..., missing="skip")`` dataset (a tf.Variable, so it counts
    inside tf.data's graph): ``stats.skipped`` is the number of trajectories dropped for lack of
    labels so far (over all passes)."""

    def __init__(self):
        import tensorflow as tf

        self._skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="latent_join_skipped")

    @property
    def skipped(self) -> int:
        return int(self._skipped.numpy())


def join_latent_labels(
    trajectory_dataset,
    label_dir: str | os.PathLike | LatentLabels,
    expected_hash: str | None = None,
    missing: str = "error",
    *,
    check_frames: bool = True,
    stats: JoinStats | None = None,
    num_parallel_calls: int | None = None,
):
    """Adds ``latent_action`` int32 [T, *code_shape] and ``has_latent`` bool [T] to each
    standardised trajectory of ``trajectory_dataset``, matching labels by ``traj_key`` and
    ``observation/timestep``; frames without a label get ``has_latent`` False and zero codes.

    ``label_dir`` is a label directory or an already loaded ``LatentLabels``. ``expected_hash``:
    labels made with another LAQ config hash raise ValueError naming both. ``missing``: a
    trajectory with no labels raises ``tf.errors.InvalidArgumentError`` naming its traj_key
    ("error") or is dropped and counted in ``stats`` ("skip"). ``check_frames``: labels naming a
    frame index the trajectory lacks (labelled at another frame rate or length) raise the same
    error. Apply it to whole trajectories, before trajectory transforms (pairs, chunks, ...).
    Trajectories may be nested (``trajectory["observation"]["timestep"]``) or flat
    (``trajectory["observation/timestep"]``); the new keys are added at the top level.
    ``num_parallel_calls`` defaults to ``tf.data.AUTOTUNE`` (order is kept).
    """
    import tensorflow as tf

    if missing not in ("error", "skip"):
        raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
    if isinstance(label_dir, LatentLabels):
        labels, where = label_dir, "latent labels"
    else:
        where = os.fspath(label_dir)
        _, labels = load_latent_labels(where)
    info = labels.info
    if expected_hash is not None and info["laq_config_hash"] != expected_hash:
        raise ValueError(
            f"{where}: latent labels were made with LAQ config hash {info['laq_config_hash']!r}, "
            f"expected {expected_hash!r} (relabel with the current LAQ or point at the matching labels)"
        )
    spec = trajectory_dataset.element_spec
    nested = isinstance(spec.get("observation"), Mapping) and "timestep" in spec["observation"]
    if "traj_key" not in spec or not (nested or "observation/timestep" in spec):
        raise KeyError(
            "join_latent_labels needs standardised trajectories with 'traj_key' and 'observation/timestep'; "
            f"got keys {sorted(spec)}"
        )
    if "latent_action" in spec or "has_latent" in spec:
        raise KeyError("trajectories already have latent_action / has_latent")

    code_shape = tuple(labels.code_shape)
    code_size = int(np.prod(code_shape)) if code_shape else 1
    num_frames = len(labels.frame_index)
    keys = labels.keys if labels.keys else ["\x00 no labels \x00"]
    rows = np.arange(len(labels.keys), dtype=np.int64) if labels.keys else np.full(1, -1, np.int64)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(keys, tf.string), tf.constant(rows, tf.int64)),
        default_value=-1,
    )
    row_splits = tf.constant(labels.row_splits, tf.int64)
    # One sentinel entry at index F (frame -1, codes 0): every gather index stays in range.
    frame_index = tf.constant(np.concatenate([labels.frame_index, [-1]]).astype(np.int64))
    codes = tf.constant(np.concatenate([labels.codes.reshape(-1, code_size), np.zeros((1, code_size), np.int32)]))

    def row_of(trajectory):
        return table.lookup(trajectory["traj_key"][0])

    if missing == "skip":
        counter = (stats or JoinStats())._skipped

        def has_labels(trajectory):
            found = row_of(trajectory) >= 0
            with tf.control_dependencies([counter.assign_add(tf.cast(tf.logical_not(found), tf.int64))]):
                return tf.identity(found)

        trajectory_dataset = trajectory_dataset.filter(has_labels)

    def attach(trajectory):
        key = trajectory["traj_key"][0]
        row = row_of(trajectory)
        checks = []
        if missing == "error":
            checks.append(
                tf.debugging.Assert(row >= 0, ["no latent labels in", where, "for trajectory", key], summarize=1)
            )
        with tf.control_dependencies(checks):
            row = tf.maximum(row, 0)
        start, end = row_splits[row], row_splits[row + 1]
        row_frames = frame_index[start:end]
        timestep = trajectory["observation"]["timestep"] if nested else trajectory["observation/timestep"]
        timestep = tf.cast(timestep, tf.int64)
        position = tf.searchsorted(row_frames, timestep, side="left", out_type=tf.int64)
        index = tf.minimum(start + position, num_frames)
        has_latent = (position < end - start) & (tf.gather(frame_index, index) == timestep)
        latent = tf.where(has_latent[:, None], tf.gather(codes, index), tf.zeros_like(codes[:1]))
        if check_frames:
            matched = tf.reduce_sum(tf.cast(has_latent, tf.int64))
            checks = [
                tf.debugging.Assert(
                    tf.equal(matched, end - start),
                    ["latent labels for", key, "name", end - start - matched,
                     "frame indices the trajectory lacks (labelled at another frame rate or length?)"],
                    summarize=1,
                )
            ]
            with tf.control_dependencies(checks):
                latent = tf.identity(latent)
        out = dict(trajectory)
        out["latent_action"] = tf.reshape(latent, [-1, *code_shape])
        out["has_latent"] = has_latent
        return out

    parallel = tf.data.AUTOTUNE if num_parallel_calls is None else num_parallel_calls
    return trajectory_dataset.map(attach, num_parallel_calls=parallel, deterministic=True)


def merge_label_parts(out_dir: str | os.PathLike, part_dirs: Sequence[str | os.PathLike]) -> str:
    """Makes ``out_dir`` one label directory over finished part directories inside it (one per
    labelling process): its ``labels_info.json`` lists every part's shards by relative path. The
    parts must share the LAQ config hash, weights fingerprint, code shape and codebook size. The info file is written
    last and atomically, so ``out_dir`` reads as complete only once every part is in it."""
    out_dir = os.fspath(out_dir).rstrip("/\\")
    infos = []
    for part in part_dirs:
        part = os.fspath(part)
        if os.path.dirname(os.path.abspath(part)) != os.path.abspath(out_dir):
            raise ValueError(f"label part {part} is not directly inside {out_dir}")
        infos.append((os.path.basename(part), _read_info(part)))
    if not infos:
        raise ValueError(f"{out_dir}: no label parts to merge")
    first_name, first = infos[0]
    for name, info in infos[1:]:
        for key in IDENTITY_KEYS:
            # .get: parts written before "laq_weights" existed lack it (None).
            if info.get(key) != first.get(key):
                raise ValueError(f"{out_dir}: part {name} has {key}={info.get(key)!r}, part {first_name} has "
                                 f"{first.get(key)!r}")
    shards = [
        {**{k: s[k] for k in ("count", "num_frames", "bytes")}, "file": f"{name}/{s['file']}"}
        for name, info in infos
        for s in info["shards"]
    ]
    merged = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **{k: first.get(k) for k in IDENTITY_KEYS},
        "meta": first.get("meta", {}),
        "parts": [name for name, _ in infos],
        "count": sum(s["count"] for s in shards),
        "num_frames": sum(s["num_frames"] for s in shards),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shards": shards,
    }
    _write_json_atomic(os.path.join(out_dir, INFO_FILE), merged)
    _fsync_dir(out_dir)
    log.info("%s: %d trajectories, %d labelled frames in %d part(s)", out_dir, merged["count"], merged["num_frames"], len(infos))
    return out_dir
