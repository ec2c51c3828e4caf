"""``TrajDataset``: a small tf.data wrapper for trajectory datasets (dlimp's ideas, written here).

One element of a fresh ``TrajDataset`` is one trajectory (episode): a nested dict of tensors with
the trajectory length ``T`` first, images still ENCODED strings (decoding happens later, per
sample). Methods return new ``TrajDataset`` objects::

    ds = TrajDataset.from_rlds(version_dir, "train", shuffle=True, seed=0, deterministic=True,
                               standardize_fn=get_dataset_spec("metaworld").standardize_fn,
                               dataset_name="metaworld")    # jaxvla.data.registry
    ds = ds.traj_map(lambda t: frame_pairs(t, gap=8))     # trajectory -> samples [N, ...]
    ds = ds.flatten()                                      # one element per sample
    ds = ds.frame_map(decode_fn).shuffle(1000).batch(16)   # per sample (after flatten)
    for batch in ds.iterator(): ...                        # numpy dicts

Reading (``from_rlds``):

* The split's TFRecord files (``builder.info.splits[split].file_instructions``; slices like
  ``"train[:10]"`` work) are read with ``tf.data.TFRecordDataset`` inside a parallel
  ``interleave`` (``num_parallel_reads`` files at a time) and parsed with the builder's feature
  spec, decoding everything except the step images (``steps`` are read with
  ``tfds.decode.SkipDecoding``: step tensors come out stacked ``[T, ...]``, images as encoded
  strings; other step features with a non-trivial encoding are decoded per batch).
* Every trajectory gets ``traj_key = "<dataset_name>/<split>/<index>"`` where ``index`` is the
  episode's position in the full split (file order); it does not depend on shuffling, slicing or
  the process count.
* ``standardize_fn(raw) -> schema dict`` (``jaxvla/data/schema.py``) maps the raw trajectory
  ``{"steps": {...[T, ...]}, "episode_metadata": {...}}`` to the schema; the result may use nested
  or flat ("observation/proprio") keys. ``observation/timestep`` (0..T-1), ``dataset_name`` (the
  ``dataset_name`` argument) and ``traj_key`` are always set here; a missing ``has_action`` (all
  True), ``proprio`` ([T, 0]), instruction ("") and cameras (``""``) are filled in; then the
  schema is checked.
  Use ``feature(raw, "steps/observation/image", name)`` inside it so a missing feature raises a
  ``MissingFeatureError`` naming the dataset, the key and the keys that exist (a plain KeyError
  raised by the function is reported the same way; a ``MissingFeatureError`` built with a
  complete message and no ``key``, as ``jaxvla.data.oxe`` raises, is re-raised unchanged). ``standardize_fn=None`` returns the raw
  layout with the step keys at the top and ``episode_metadata`` broadcast to ``[T]``.

Multi-process sharding (``process_index`` / ``process_count``, default ``jax.process_index()`` /
``jax.process_count()``): with at least as many files as processes, process ``i`` of ``n`` reads
files ``i::n`` (whole files, in file order). With fewer files than processes, the split's
examples (in file order) are cut into ``n`` contiguous ranges of balanced size (``[i*N//n,
(i+1)*N//n)``) read with TFRecord skip/take. Either way the shares are disjoint and cover the
split (``shard_file_instructions``). A process whose share is empty raises ``ValueError``.

Determinism (``deterministic=True``): ``options.deterministic = True``, every parallel op
(interleave, map) order-preserving with a fixed parallelism, every shuffle seeded (file order,
buffers: seeds derived from ``seed``), so the same seed gives the same elements in the same order.
Without it, parallel ops may reorder elements for throughput (autotuned).

Corrupt data (``ignore_errors``): each file's records are parsed inside its own reader. A
record that is no valid tf.Example is dropped and reading goes on with the next one (later
episodes keep their split indices); a TFRecord CRC / framing error ends that file's reader (the
rest of the file cannot be located reliably). At the end of each file the number of episodes read
is compared with the number the split's metadata promises: with ``ignore_errors=False`` a
shortfall raises ``CorruptDataError`` (from ``iterator()``) naming the dataset, the file, the
first bad record and the count; with ``ignore_errors=True`` the missing records are skipped, one
warning line per affected file and pass goes to stderr, and they are counted in ``num_skipped``
(cumulative over passes; read it after iterating) and in ``num_unreadable`` (distinct bad records:
each file counted once, whatever the number of passes). A shard file that ``dataset_info.json``
declares but that is not on disk raises ``DatasetFilesError`` before anything is read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxvla.data.frame_transforms import BAD_IMAGE_MARKER, ImageFormatError
from jaxvla.data.schema import (
    IMAGE_CAMERAS,
    MissingFeatureError,
    check_standardized,
    flat_keys,
    missing_feature_error,
)

log = logging.getLogger("jaxvla")

AUTOTUNE = tf.data.AUTOTUNE
DETERMINISTIC_PARALLELISM = 4  # fixed parallel calls in deterministic mode (order is kept anyway)
_CORRUPT_MARKER = "JAXVLA_CORRUPT_DATA"


class CorruptDataError(RuntimeError):
    """A TFRecord file with corrupt or unparseable records (``ignore_errors=False``)."""


class DatasetFilesError(FileNotFoundError):
    """A TFDS dataset version directory lacks a file it needs: ``features.json``, or shard files
    that ``dataset_info.json`` declares for a split (raised before any record is read)."""


# --------------------------------------------------------------------------- nested dict helpers


def nest_dict(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Flat "a/b" keys (and already nested dicts) -> nested dicts."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        parts = str(key).split("/")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"key {key!r} collides with a non-dict entry")
        leaf = parts[-1]
        if isinstance(value, Mapping):
            existing = node.setdefault(leaf, {})
            existing.update(nest_dict(value))
        else:
            node[leaf] = value
    return out


def feature(traj: Mapping[str, Any], key: str, dataset_name: str = "dataset") -> Any:
    """``traj["a"]["b"]`` for ``key="a/b"``; raises ``MissingFeatureError`` naming the dataset, the
    key and every key that exists."""
    node: Any = traj
    for part in key.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            available = sorted(flat_keys(traj))
            raise missing_feature_error(
                f"dataset {dataset_name!r} has no feature {key!r}; its features are {available}",
                key=key,
                available=available,
            )
        node = node[part]
    return node


def _get_path(tree: Mapping[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("/"):
        node = node[part]
    return node


# --------------------------------------------------------------------------- builders and files


def abs_path(path: str | os.PathLike) -> str:
    """Absolute local path; remote paths (``gs://...``) unchanged."""
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(path)


def path_exists(path: str) -> bool:
    return tf.io.gfile.exists(path)


def is_dir(path: str) -> bool:
    return tf.io.gfile.isdir(path)


def load_builder(builder_or_dir: Any, dataset_name: str | None = None) -> tfds.core.DatasetBuilder:
    """A TFDS builder from a builder object or a dataset version directory (local or ``gs://``).

    A missing directory (or one without ``dataset_info.json``) raises ``FileNotFoundError`` naming
    the dataset and the path (and the version directories found below it, if any); one without
    ``features.json`` raises ``DatasetFilesError`` naming that file."""
    if not isinstance(builder_or_dir, (str, os.PathLike)):
        return builder_or_dir
    path = abs_path(builder_or_dir)
    label = f"dataset {dataset_name!r}: " if dataset_name else ""
    if not is_dir(path):
        raise FileNotFoundError(f"{label}data directory {path} does not exist")
    if not path_exists(os.path.join(path, "dataset_info.json")):
        found = []
        for root, _, files in tf.io.gfile.walk(path):
            if "dataset_info.json" in files:
                found.append(root)
            if len(found) >= 5:
                break
        hint = f"; dataset version directories below it: {found}" if found else ""
        raise FileNotFoundError(
            f"{label}{path} is not a TFDS dataset version directory (no dataset_info.json){hint}"
        )
    if not path_exists(os.path.join(path, "features.json")):
        present = sorted(tf.io.gfile.listdir(path))
        raise DatasetFilesError(
            f"{label}{path} has no features.json: a TFDS dataset version directory holds "
            f"dataset_info.json, features.json and the splits' *.tfrecord* shard files; found {present}"
        )
    return tfds.builder_from_directory(path)


def check_split_files(shards: Sequence["FileShard"], split: str, dataset_name: str = "dataset") -> None:
    """Raises ``DatasetFilesError`` naming the dataset, the split and every shard file of ``shards``
    (the files ``dataset_info.json`` declares for the split) that is not on disk. One directory
    listing per directory, so it is cheap on ``gs://`` too; without it a missing shard makes
    tf.data retry the unreadable file forever."""
    listings: dict[str, set[str]] = {}
    missing = []
    for shard in shards:
        directory, base = os.path.split(shard.filename)
        if directory not in listings:
            try:
                listings[directory] = {f.rstrip("/") for f in tf.io.gfile.listdir(directory)}
            except tf.errors.NotFoundError:
                listings[directory] = set()
        if base not in listings[directory] and shard.filename not in missing:
            missing.append(shard.filename)
    if not missing:
        return
    declared = sorted({os.path.basename(s.filename) for s in shards})
    directory = os.path.dirname(missing[0])
    present = sorted(f for f in listings.get(directory, ()) if ".tfrecord" in f)
    names = [os.path.basename(m) for m in missing]
    shown = names if len(names) <= 10 else names[:10] + [f"... ({len(names) - 10} more)"]
    raise DatasetFilesError(
        f"dataset {dataset_name!r} split {split!r}: {len(missing)} of the {len(declared)} shard file(s) that "
        f"{os.path.join(directory, 'dataset_info.json')} declares for the split are missing in {directory}: "
        f"{shown}; *.tfrecord* files present: {present if len(present) <= 10 else present[:10] + ['...']}"
    )


@dataclasses.dataclass(frozen=True)
class FileShard:
    """Read records ``[skip, skip + take)`` of ``filename``; the first has split index ``start``."""

    filename: str
    skip: int
    take: int
    start: int


def split_file_shards(builder: tfds.core.DatasetBuilder, split: str, dataset_name: str = "dataset") -> list[FileShard]:
    """The split's files (in order) with each one's first global episode index in the split."""
    try:
        info = builder.info.splits[split]
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"dataset {dataset_name!r}: no split {split!r}; splits: {list(builder.info.splits.keys())}"
        ) from e
    base = split.split("[")[0]
    offsets: dict[str, int] = {}
    position = 0
    for instruction in builder.info.splits[base].file_instructions:
        offsets[os.path.basename(instruction.filename)] = position
        position += int(instruction.examples_in_shard)
    data_dir = builder.data_dir
    shards = []
    for instruction in info.file_instructions:
        filename = instruction.filename
        if not os.path.isabs(filename) and "://" not in filename:
            filename = os.path.join(abs_path(data_dir), os.path.basename(filename))
        skip = int(instruction.skip)
        take = int(instruction.take)
        if take < 0:
            take = int(instruction.examples_in_shard) - skip
        if take <= 0:
            continue
        start = offsets.get(os.path.basename(filename), 0) + skip
        shards.append(FileShard(filename, skip, take, start))
    return shards


def shard_file_instructions(shards: Sequence[FileShard], process_index: int, process_count: int) -> list[FileShard]:
    """Process ``process_index``'s disjoint share of ``shards`` (see the module docstring)."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
    shards = list(shards)
    if process_count == 1:
        return shards
    if len(shards) >= process_count:
        return shards[process_index::process_count]
    total = sum(s.take for s in shards)
    lo = total * process_index // process_count
    hi = total * (process_index + 1) // process_count
    out = []
    position = 0
    for s in shards:
        begin, end = max(lo, position), min(hi, position + s.take)
        if begin < end:
            offset = begin - position
            out.append(FileShard(s.filename, s.skip + offset, end - begin, s.start + offset))
        position += s.take
    return out


def _default_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


def _zeros_like_spec(spec: Any) -> Any:
    def zero(s: tf.TensorSpec) -> tf.Tensor:
        shape = [0 if d is None else d for d in s.shape.as_list()]
        if s.dtype == tf.string:
            return tf.fill(shape, "")
        return tf.zeros(shape, s.dtype)

    return tf.nest.map_structure(zero, spec)


def _step_decoders(features: tfds.features.FeaturesDict) -> dict | None:
    if "steps" in features:
        return {"steps": tfds.decode.SkipDecoding()}
    return None


def _decode_steps(steps_feature: Any, steps: dict) -> dict:
    """Decodes step features that SkipDecoding left encoded, except images (kept as strings)."""
    out = {}
    for key, value in steps.items():
        sub = steps_feature[key] if key in steps_feature else None
        if isinstance(value, dict):
            out[key] = _decode_steps(sub, value) if sub is not None else value
        elif sub is None or isinstance(sub, (tfds.features.Image, tfds.features.Video)):
            out[key] = value
        elif isinstance(sub, tfds.features.Tensor) and getattr(sub, "_encoding", None) not in (
            None,
            tfds.features.Encoding.NONE,
        ):
            out[key] = sub.decode_batch_example(value)
        else:
            out[key] = value
    return out


def _broadcast(value: tf.Tensor, length: tf.Tensor) -> tf.Tensor:
    value = tf.convert_to_tensor(value)
    return tf.broadcast_to(value, tf.concat([[length], tf.shape(value)], 0))


def _standardize_defaults(traj: dict, length: tf.Tensor, traj_key: tf.Tensor, dataset_name: str) -> dict:
    traj = nest_dict(traj)
    observation = traj.setdefault("observation", {})
    for camera in IMAGE_CAMERAS:
        observation.setdefault(f"image_{camera}", tf.fill([length], ""))
    if "proprio" not in observation:
        observation["proprio"] = tf.zeros([length, 0], tf.float32)
    observation["timestep"] = tf.range(length, dtype=tf.int32)
    if "action" in traj and "has_action" not in traj:
        traj["has_action"] = tf.ones([length], tf.bool)
    traj.setdefault("task", {}).setdefault("language_instruction", tf.fill([length], ""))
    traj["dataset_name"] = tf.fill([length], dataset_name)
    traj["traj_key"] = _broadcast(traj_key, length)
    return traj


# --------------------------------------------------------------------------- the dataset


class TrajDataset:
    """A ``tf.data.Dataset`` of trajectories (or samples, after ``flatten``) plus read settings.

    Attributes:
      dataset: the wrapped ``tf.data.Dataset``.
      name: dataset name (errors, logs, traj keys).
      deterministic, seed: see the module docstring.
      flat: True after ``flatten()`` (elements are samples, ``frame_map`` maps each element).
      num_trajectories: trajectories in this process's share (``from_rlds``), else None.
    """

    def __init__(
        self,
        dataset: tf.data.Dataset,
        *,
        name: str = "dataset",
        deterministic: bool = False,
        seed: int | None = None,
        flat: bool = False,
        num_trajectories: int | None = None,
        skip_counters: Sequence["_SkipCounters"] = (),
        num_parallel_calls: int | None = None,
    ):
        self.dataset = dataset
        self.name = name
        self.deterministic = bool(deterministic)
        self.seed = seed
        self.flat = flat
        self.num_trajectories = num_trajectories
        self._skip_counters = tuple(skip_counters)
        self._parallel = num_parallel_calls
        self._salt = 0

    # ------------------------------------------------------------------ construction

    def _derive(self, dataset: tf.data.Dataset, **changes) -> "TrajDataset":
        kwargs = dict(
            name=self.name,
            deterministic=self.deterministic,
            seed=self.seed,
            flat=self.flat,
            num_trajectories=self.num_trajectories,
            skip_counters=self._skip_counters,
            num_parallel_calls=self._parallel,
        )
        kwargs.update(changes)
        out = TrajDataset(dataset, **kwargs)
        out._salt = self._salt
        return out

    @classmethod
    def from_tf(
        cls,
        dataset: tf.data.Dataset,
        name: str = "dataset",
        *,
        deterministic: bool = False,
        seed: int | None = None,
        check_schema: bool = True,
        num_trajectories: int | None = None,
    ) -> "TrajDataset":
        """Wraps a ``tf.data.Dataset`` of standardised trajectories (e.g. from ``from_generator``)."""
        if check_schema:
            check_standardized(dataset.element_spec, name)
        return cls(dataset, name=name, deterministic=deterministic, seed=seed, num_trajectories=num_trajectories)

    @classmethod
    def from_rlds(
        cls,
        builder_or_dir: Any,
        split: str = "train",
        shuffle: bool = True,
        num_parallel_reads: int = AUTOTUNE,
        process_index: int | None = None,
        process_count: int | None = None,
        seed: int | None = None,
        standardize_fn: Callable[[dict], dict] | None = None,
        dataset_name: str | None = None,
        *,
        deterministic: bool = False,
        ignore_errors: bool = False,
        traj_indices: Iterable[int] | None = None,
        num_parallel_calls: int = AUTOTUNE,
    ) -> "TrajDataset":
        """Trajectories of an RLDS TFDS dataset (builder object or version directory).

        Args:
          builder_or_dir: ``tfds`` builder, or its version directory (with dataset_info.json).
          split: a split name or TFDS slice (``"train[:50%]"``).
          shuffle: shuffle the file order every pass (seeded when ``seed`` is given).
          num_parallel_reads: files read at once (AUTOTUNE: up to 16).
          process_index, process_count: this process's share (module docstring).
          seed: seed for the file shuffle and for everything derived from this dataset.
          standardize_fn: raw trajectory -> schema dict (None: raw layout, no schema check).
          dataset_name: name for keys and errors (default: the builder's name).
          deterministic: order-preserving, fixed-parallelism, seeded (seed defaults to 0).
          ignore_errors: skip corrupt records and count them (``num_skipped``).
          traj_indices: keep only these episode indices of the split (e.g. ``first_per_task``).
          num_parallel_calls: parallelism of the parse / standardize map.
        """
        builder = load_builder(builder_or_dir, dataset_name)
        name = dataset_name or builder.info.name
        process_index, process_count = _default_process(process_index, process_count)
        if deterministic and seed is None:
            seed = 0
        all_shards = split_file_shards(builder, split, name)
        total = sum(s.take for s in all_shards)
        if total == 0:
            raise ValueError(f"dataset {name!r}: split {split!r} is empty (0 episodes)")
        check_split_files(all_shards, split, name)
        shards = shard_file_instructions(all_shards, process_index, process_count)
        selected = None
        if traj_indices is not None:
            selected = sorted({int(i) for i in traj_indices})
            keep = set(selected)
            shards = [s for s in shards if any(s.start <= i < s.start + s.take for i in keep)]
        num = sum(s.take for s in shards)
        if selected is not None:
            num = sum(1 for s in shards for i in selected if s.start <= i < s.start + s.take)
        if num == 0:
            what = "the selected episodes" if selected is not None else f"the {total} episodes"
            raise ValueError(
                f"dataset {name!r} split {split!r}: process {process_index} of {process_count} gets none of "
                f"{what} (more processes than episodes or files?)"
            )

        split_name = split.split("[")[0]
        features = builder.info.features
        decoders = _step_decoders(features)
        steps_feature = features["steps"].feature if "steps" in features else None
        skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{name}_skipped_records")
        # Per file of this share: records found unreadable (the same on every pass).
        unreadable = tf.Variable(
            tf.zeros([len(shards)], tf.int64), trainable=False, name=f"{name}_unreadable_records"
        )
        strict = not ignore_errors

        def parse(serialized: tf.Tensor) -> dict:
            example = features.deserialize_example(serialized, decoders=decoders)
            if steps_feature is not None:
                example = dict(example)
                example["steps"] = _decode_steps(steps_feature, dict(example["steps"]))
            return example

        # The parsed structure, for the end-of-file sentinel element.
        probe = tf.function(parse).get_concrete_function(tf.TensorSpec([], tf.string))
        parsed_spec = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), probe.structured_outputs)

        def read_file(
            filename: tf.Tensor, skip: tf.Tensor, take: tf.Tensor, start: tf.Tensor, file_index: tf.Tensor
        ) -> tf.data.Dataset:
            # (position in this share of the file, parsed episode, is-end-sentinel); a record that
            # fails (framing or parse) is dropped here and noticed at the sentinel.
            records = tf.data.TFRecordDataset(filename).skip(skip).take(take).enumerate()
            parsed = records.map(lambda i, r: (i, parse(r))).ignore_errors()
            items = parsed.map(lambda i, x: (i, x, tf.constant(False)))
            sentinel = (tf.constant(-1, tf.int64), _zeros_like_spec(parsed_spec), tf.constant(True))
            items = items.concatenate(tf.data.Dataset.from_tensors(sentinel))

            def count(state, item):
                # state: (records parsed so far, position of the first failed record or -1)
                n, first_bad = state
                position, x, is_end = item
                gap = tf.logical_and(first_bad < 0, tf.logical_or(is_end, tf.not_equal(position, n)))
                first_bad = tf.where(gap, n, first_bad)
                n_after = n + tf.cast(tf.logical_not(is_end), tf.int64)
                return (n_after, first_bad), (start + position, x, is_end, n, first_bad)

            items = items.scan((tf.constant(0, tf.int64), tf.constant(-1, tf.int64)), count)

            def check(index, x, is_end, n, first_bad):
                missing = tf.where(is_end, take - n, tf.constant(0, tf.int64))
                if strict:
                    message = tf.strings.join(
                        [
                            _CORRUPT_MARKER + "dataset '" + name + "' split '" + split_name + "': file ",
                            filename,
                            " has a corrupt or unparseable record at record ",
                            tf.strings.as_string(skip + first_bad),
                            " of the file (TFRecord CRC / framing error or a tf.Example that does not "
                            "parse); ",
                            tf.strings.as_string(missing),
                            " of its ",
                            tf.strings.as_string(take),
                            " records in this share could not be read. Pass ignore_errors=True "
                            "(config.data.ignore_errors) to skip corrupt records, counted in num_skipped."
                            + _CORRUPT_MARKER,
                        ]
                    )
                    check_op = tf.debugging.Assert(tf.equal(missing, 0), [message])
                    with tf.control_dependencies([check_op]):
                        index = tf.identity(index)
                else:

                    def report() -> tf.Tensor:
                        message = tf.strings.join(
                            [
                                "jaxvla.data WARNING: dataset '" + name + "' split '" + split_name + "': skipped ",
                                tf.strings.as_string(missing),
                                " corrupt/unreadable record(s) of file ",
                                filename,
                                " (the first at record ",
                                tf.strings.as_string(skip + first_bad),
                                ")",
                            ]
                        )
                        print_op = tf.print(message, output_stream=sys.stderr)
                        per_file = unreadable.scatter_max(
                            tf.IndexedSlices(tf.reshape(missing, [1]), tf.reshape(file_index, [1]))
                        )
                        with tf.control_dependencies([print_op, per_file]):
                            return skipped.assign_add(missing)

                    done = tf.cond(missing > 0, report, lambda: tf.identity(skipped.read_value()))
                    with tf.control_dependencies([done]):
                        index = tf.identity(index)
                return index, x, is_end

            items = items.map(check)
            items = items.filter(lambda index, x, is_end: tf.logical_not(is_end))
            return items.map(lambda index, x, is_end: (index, x))

        files = tf.data.Dataset.from_tensor_slices(
            (
                [s.filename for s in shards],
                np.asarray([s.skip for s in shards], np.int64),
                np.asarray([s.take for s in shards], np.int64),
                np.asarray([s.start for s in shards], np.int64),
                np.arange(len(shards), dtype=np.int64),
            )
        )
        if shuffle and len(shards) > 1:
            files = files.shuffle(len(shards), seed=_derive_seed(seed, 1), reshuffle_each_iteration=True)
        if deterministic:
            cycle = min(len(shards), 16 if num_parallel_reads in (None, AUTOTUNE) else int(num_parallel_reads))
            calls = min(cycle, DETERMINISTIC_PARALLELISM)
            map_calls = DETERMINISTIC_PARALLELISM
        else:
            cycle = min(len(shards), 16) if num_parallel_reads in (None, AUTOTUNE) else int(num_parallel_reads)
            calls = AUTOTUNE
            map_calls = num_parallel_calls
        cycle = max(int(cycle), 1)
        dataset = files.interleave(
            read_file, cycle_length=cycle, block_length=1, num_parallel_calls=calls, deterministic=deterministic
        )
        if selected is not None:
            keep_table = tf.constant(np.asarray(selected, np.int64))
            dataset = dataset.filter(lambda index, x: tf.reduce_any(tf.equal(keep_table, index)))

        def standardize(index: tf.Tensor, raw: dict) -> dict:
            traj_key = tf.strings.join([name, "/", split_name, "/", tf.strings.as_string(index)])
            raw = dict(raw)
            if "steps" in raw:
                steps = raw.pop("steps")
                length = tf.shape(tf.nest.flatten(steps)[0])[0]
            else:
                steps, length = None, None
            if standardize_fn is None:
                if steps is None:
                    raise ValueError(f"dataset {name!r}: not an RLDS dataset (no 'steps' feature)")
                out = dict(steps)
                for key, value in raw.items():
                    out[key] = tf.nest.map_structure(lambda v: _broadcast(v, length), value)
                out["traj_key"] = _broadcast(traj_key, length)
                return out
            rlds = {"steps": steps, **raw} if steps is not None else raw
            try:
                traj = standardize_fn(rlds)
            except KeyError as e:
                if isinstance(e, MissingFeatureError) and e.key is None:
                    # Already a complete message (e.g. from jaxvla.data.oxe): unchanged.
                    tracing_errors.append(e)
                    raise
                missing = e.key if isinstance(e, MissingFeatureError) else (e.args[0] if e.args else "?")
                available = sorted(flat_keys(rlds))
                error = missing_feature_error(
                    f"dataset {name!r}: standardize function "
                    f"{getattr(standardize_fn, '__name__', standardize_fn)!r} needs feature {missing!r}, "
                    f"which the dataset lacks; its features are {available}",
                    key=missing,
                    available=available,
                )
                tracing_errors.append(error)
                raise error from None
            traj = nest_dict(traj)
            if length is None:
                length = tf.shape(traj["action"])[0]
            return _standardize_defaults(traj, length, traj_key, name)

        tracing_errors: list[Exception] = []
        try:
            dataset = dataset.map(standardize, num_parallel_calls=map_calls, deterministic=deterministic)
        except Exception:
            if tracing_errors:  # raised while tracing; tf wraps it, re-raise it plainly
                raise tracing_errors[0] from None
            raise
        if standardize_fn is not None:
            check_standardized(dataset.element_spec, name)
        return cls(
            dataset,
            name=name,
            deterministic=deterministic,
            seed=seed,
            num_trajectories=num,
            skip_counters=(_SkipCounters(skipped, unreadable),),
            num_parallel_calls=None if not deterministic else DETERMINISTIC_PARALLELISM,
        )

    # ------------------------------------------------------------------ transforms

    @property
    def element_spec(self) -> Any:
        return self.dataset.element_spec

    def _calls(self, num_parallel_calls: int | None) -> int:
        if self.deterministic:
            return DETERMINISTIC_PARALLELISM if num_parallel_calls in (None, AUTOTUNE) else int(num_parallel_calls)
        return AUTOTUNE if num_parallel_calls is None else num_parallel_calls

    def _next_seed(self) -> int | None:
        self._salt += 1
        return _derive_seed(self.seed, 100 + self._salt)

    def traj_map(self, fn: Callable[[dict], dict], num_parallel_calls: int | None = None) -> "TrajDataset":
        """Maps ``fn`` over every element (a trajectory, or a sample after ``flatten``)."""
        return self._derive(
            self.dataset.map(fn, num_parallel_calls=self._calls(num_parallel_calls), deterministic=self.deterministic)
        )

    def map(self, fn: Callable[[dict], dict], num_parallel_calls: int | None = None) -> "TrajDataset":
        return self.traj_map(fn, num_parallel_calls)

    def traj_map_seeded(
        self, fn: Callable[[dict, tf.Tensor], dict], seed: int | None = None, num_parallel_calls: int | None = None
    ) -> "TrajDataset":
        """``fn(element, seed)`` with a per-element stateless seed [2] = (seed, r) where r is the
        element's entry of ``tf.data.Dataset.random(seed, rerandomize_each_iteration=True)``: new
        values on every pass of a repeated pipeline, the same values for the same seed (so
        reproducible whenever the element order is, i.e. in deterministic mode)."""
        base = self._next_seed() if seed is None else int(seed)
        base = 0 if base is None else base
        randoms = tf.data.Dataset.random(seed=base, rerandomize_each_iteration=True)

        def apply(element, value):
            return fn(element, tf.stack([tf.constant(base, tf.int64), value]))

        dataset = tf.data.Dataset.zip((self.dataset, randoms)).map(
            apply, num_parallel_calls=self._calls(num_parallel_calls), deterministic=self.deterministic
        )
        return self._derive(dataset)

    def frame_map(self, fn: Callable[[dict], dict], num_parallel_calls: int | None = None) -> "TrajDataset":
        """Maps ``fn`` over every frame: on trajectories, over each of the T frames (``tf.map_fn``);
        after ``flatten``, over each element (a sample is one frame / window)."""
        if self.flat:
            return self.traj_map(fn, num_parallel_calls)

        def per_frame(traj):
            frame_spec = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape[1:], t.dtype), traj)
            outputs = tf.function(fn).get_concrete_function(frame_spec).structured_outputs
            signature = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), outputs)
            return tf.map_fn(fn, traj, fn_output_signature=signature)

        return self.traj_map(per_frame, num_parallel_calls)

    def flatten(self, num_parallel_calls: int | None = None, cycle_length: int = 1) -> "TrajDataset":
        """Trajectories (or per-trajectory samples ``[N, ...]``) -> one element per row.

        ``cycle_length > 1`` interleaves rows of that many trajectories (deterministically in
        deterministic mode); 1 keeps each trajectory's rows together (``unbatch``)."""
        if cycle_length <= 1:
            dataset = self.dataset.unbatch()
        else:
            dataset = self.dataset.interleave(
                tf.data.Dataset.from_tensor_slices,
                cycle_length=cycle_length,
                num_parallel_calls=self._calls(num_parallel_calls),
                deterministic=self.deterministic,
            )
        return self._derive(dataset, flat=True)

    def filter(self, predicate: Callable[[dict], tf.Tensor]) -> "TrajDataset":
        return self._derive(self.dataset.filter(predicate))

    def shuffle(self, buffer_size: int, seed: int | None = None, reshuffle_each_iteration: bool = True) -> "TrajDataset":
        """Shuffle buffer; seeded from the dataset seed when ``seed`` is None."""
        seed = self._next_seed() if seed is None else seed
        return self._derive(
            self.dataset.shuffle(int(buffer_size), seed=seed, reshuffle_each_iteration=reshuffle_each_iteration)
        )

    def repeat(self, count: int | None = None) -> "TrajDataset":
        return self._derive(self.dataset.repeat(count))

    def take(self, count: int) -> "TrajDataset":
        return self._derive(self.dataset.take(count))

    def skip(self, count: int) -> "TrajDataset":
        return self._derive(self.dataset.skip(count))

    def batch(self, batch_size: int, drop_remainder: bool = True, num_parallel_calls: int | None = None) -> "TrajDataset":
        return self._derive(
            self.dataset.batch(
                int(batch_size),
                drop_remainder=drop_remainder,
                num_parallel_calls=self._calls(num_parallel_calls),
                deterministic=self.deterministic,
            )
        )

    def prefetch(self, buffer_size: int = AUTOTUNE) -> "TrajDataset":
        return self._derive(self.dataset.prefetch(buffer_size))

    @staticmethod
    def sample_from_datasets(
        datasets: Sequence["TrajDataset"],
        weights: Sequence[float] | None = None,
        seed: int | None = None,
        stop_on_empty_dataset: bool = False,
    ) -> "TrajDataset":
        """Draws each element from dataset ``i`` with probability ``weights[i] / sum(weights)``.

        The datasets must have identical element structures (same keys, dtypes and compatible
        shapes); otherwise a ValueError names the datasets and the differing keys. Deterministic
        when every input is deterministic and a seed is given (or the inputs have one)."""
        datasets = list(datasets)
        if not datasets:
            raise ValueError("sample_from_datasets: no datasets")
        if weights is None:
            weights = [1.0] * len(datasets)
        weights = [float(w) for w in weights]
        if len(weights) != len(datasets):
            raise ValueError(f"sample_from_datasets: {len(datasets)} datasets but {len(weights)} weights")
        if any(w < 0 or not np.isfinite(w) for w in weights) or sum(weights) <= 0:
            raise ValueError(f"sample_from_datasets: weights must be >= 0 with a positive sum, got {weights}")
        _check_same_structure(datasets)
        deterministic = all(d.deterministic for d in datasets)
        if seed is None:
            seed = datasets[0].seed
            seed = None if seed is None else _derive_seed(seed, 7)
        if deterministic and seed is None:
            seed = 0
        total = sum(weights)
        mixed = tf.data.Dataset.sample_from_datasets(
            [d.dataset for d in datasets],
            weights=[w / total for w in weights],
            seed=seed,
            stop_on_empty_dataset=stop_on_empty_dataset,
        )
        counters = tuple(c for d in datasets for c in d._skip_counters)
        return TrajDataset(
            mixed,
            name="+".join(d.name for d in datasets),
            deterministic=deterministic,
            seed=seed,
            flat=all(d.flat for d in datasets),
            skip_counters=counters,
        )

    # ------------------------------------------------------------------ iteration

    def with_options(self) -> tf.data.Dataset:
        """The wrapped dataset with this wrapper's tf.data options applied."""
        options = tf.data.Options()
        options.deterministic = self.deterministic
        options.autotune.enabled = True
        options.experimental_optimization.map_parallelization = not self.deterministic
        return self.dataset.with_options(options)

    def iterator(self) -> Iterator[Any]:
        """Numpy elements; corrupt-data failures raise ``CorruptDataError`` with a clear message."""
        return _ErrorTranslatingIterator(self.with_options().as_numpy_iterator(), self)

    as_numpy_iterator = iterator

    def __iter__(self) -> Iterator[Any]:
        return self.iterator()

    @property
    def num_skipped(self) -> int:
        """Corrupt / unreadable records skipped so far (``ignore_errors=True``), over all passes."""
        return int(sum(int(c.total.numpy()) for c in self._skip_counters))

    @property
    def num_unreadable(self) -> int:
        """Distinct records of this process's share found corrupt / unreadable so far
        (``ignore_errors=True``): each file counts once however many passes read it, so after one
        full pass this is the number of bad records in the share."""
        return int(sum(int(c.per_file.numpy().sum()) for c in self._skip_counters))


@dataclasses.dataclass(frozen=True)
class _SkipCounters:
    """One ``from_rlds`` reader's counters: ``total`` skipped records over all passes and
    ``per_file`` [files of the share] unreadable records of each file."""

    total: tf.Variable
    per_file: tf.Variable


class _ErrorTranslatingIterator:
    def __init__(self, iterator: Iterator[Any], owner: TrajDataset):
        self._iterator = iterator
        self._owner = owner

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._iterator)
        except tf.errors.InvalidArgumentError as e:
            translate_error(e)
            raise


def translate_error(error: Exception) -> None:
    """Re-raises a tf error carrying one of our markers as ``CorruptDataError`` (corrupt records)
    or ``ImageFormatError`` (bad decoded image); returns for any other error."""
    text = str(error)
    for marker, kind in ((_CORRUPT_MARKER, CorruptDataError), (BAD_IMAGE_MARKER, ImageFormatError)):
        if marker in text:
            message = text.split(marker)[1]
            message = message.replace("\\'", "'").replace('\\"', '"')
            raise kind(message.strip()) from None


def _derive_seed(seed: int | None, salt: int) -> int | None:
    if seed is None:
        return None
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(salt)]).generate_state(1)[0] & 0x7FFFFFFF)


def _check_same_structure(datasets: Sequence[TrajDataset]) -> None:
    first = datasets[0]
    first_keys = dict(_spec_items(first.element_spec))
    for other in datasets[1:]:
        keys = dict(_spec_items(other.element_spec))
        if keys.keys() != first_keys.keys():
            raise ValueError(
                f"sample_from_datasets: {first.name!r} and {other.name!r} have different keys: only in "
                f"{first.name!r}: {sorted(set(first_keys) - set(keys))}; only in {other.name!r}: "
                f"{sorted(set(keys) - set(first_keys))}"
            )
        bad = []
        for key, spec in first_keys.items():
            o = keys[key]
            if spec.dtype != o.dtype or not spec.shape.is_compatible_with(o.shape):
                bad.append(f"{key}: {spec.dtype.name}{spec.shape.as_list()} vs {o.dtype.name}{o.shape.as_list()}")
        if bad:
            raise ValueError(
                f"sample_from_datasets: {first.name!r} and {other.name!r} differ in dtype/shape: {bad} "
                "(pad actions / proprio to a common size first)"
            )


def _spec_items(spec: Any, prefix: str = "") -> list[tuple[str, tf.TensorSpec]]:
    if isinstance(spec, Mapping):
        out = []
        for key, value in spec.items():
            out.extend(_spec_items(value, f"{prefix}/{key}" if prefix else str(key)))
        return out
    if isinstance(spec, (tuple, list)):
        out = []
        for i, value in enumerate(spec):
            out.extend(_spec_items(value, f"{prefix}/{i}" if prefix else str(i)))
        return out
    return [(prefix, spec)]


# --------------------------------------------------------------------------- few-demo subsets


def first_episodes_per_task(
    builder_or_dir: Any,
    split: str,
    num_per_task: int,
    standardize_fn: Callable[[dict], dict] | None = None,
    task_key: str = "task/language_instruction",
    dataset_name: str | None = None,
    order_key: str | None = None,
) -> list[int]:
    """Split indices of the first ``num_per_task`` episodes (file order) of every task.

    The task of an episode is ``task_key`` at its first step, read from the standardised
    trajectory (``standardize_fn``) or, without one, from the raw layout (e.g.
    ``"episode_metadata/task"``). ``order_key`` (e.g. ``"episode_metadata/episode_id"``) orders the
    episodes of a task by that value instead of by file position (TFDS writes examples in a hashed
    order). One pass over the split (no image decoding); pass the result as ``traj_indices`` to
    ``from_rlds`` (every process then filters its own share)."""
    if num_per_task < 1:
        raise ValueError(f"num_per_task must be >= 1, got {num_per_task}")
    ds = TrajDataset.from_rlds(
        builder_or_dir, split, shuffle=False, process_index=0, process_count=1,
        standardize_fn=standardize_fn, dataset_name=dataset_name, deterministic=True,
    )
    spec_keys = flat_keys(ds.element_spec)
    for key in (task_key, order_key):
        if key is not None and key not in spec_keys:
            raise missing_feature_error(
                f"dataset {ds.name!r}: key {key!r} not in the trajectory; keys: {sorted(spec_keys)}",
                key=key,
                available=sorted(spec_keys),
            )

    def pick(traj):
        out = {"key": traj["traj_key"][0], "task": _get_path(traj, task_key)[0]}
        if order_key is not None:
            out["order"] = _get_path(traj, order_key)[0]
        return out

    episodes = []
    for position, item in enumerate(ds.dataset.map(pick).as_numpy_iterator()):
        index = int(item["key"].decode().rsplit("/", 1)[1])
        episodes.append((item["task"], item.get("order", position), index))
    episodes.sort(key=lambda e: (e[1], e[2]))
    counts: dict[Any, int] = {}
    chosen = []
    for task, _, index in episodes:
        if counts.get(task, 0) < num_per_task:
            counts[task] = counts.get(task, 0) + 1
            chosen.append(index)
    return sorted(chosen)
