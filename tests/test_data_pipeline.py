"""The tf.data pipeline: RLDS reading, trajectory / frame transforms, statistics, bins, mixtures,
determinism, per-process shards and bad inputs, on the real Meta-World fixture and tiny
synthetic RLDS datasets written here."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import struct

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from jaxvla.data import frame_transforms as ft
from jaxvla.data import stats as stats_lib
from jaxvla.data import traj_transforms as tt
from jaxvla.data.dataset import (
    CorruptDataError,
    FileShard,
    MissingFeatureError,
    TrajDataset,
    first_episodes_per_task,
    feature,
    shard_file_instructions,
)
from jaxvla.data.gaps import frame_gap
from jaxvla.data.latent_labels import LatentLabelWriter
from jaxvla.data.pipeline import (
    batch_samples,
    dataset_statistics,
    decode_samples,
    default_data_config,
    make_batches,
    make_trajectory_dataset,
    mix_samples,
    mixture_dims,
    mixture_entries,
    mixture_gaps,
    mixture_statistics,
    read_trajectories,
    trajectory_samples,
    with_defaults,
)
from jaxvla.data.registry import DatasetSpec, dataset_gap, get_dataset_spec

# The registry's Meta-World entry; its standardize_fn is the Meta-World raw layout (oxe.METAWORLD_LAYOUT).
METAWORLD = get_dataset_spec("metaworld")


# --------------------------------------------------------------------------- helpers


def synth_features(image_shape=(16, 16, 3), action_dim=2, with_state=True):
    observation = {"image": tfds.features.Image(shape=image_shape, dtype=np.uint8, encoding_format="png")}
    if with_state:
        observation["state"] = tfds.features.Tensor(shape=(3,), dtype=np.float32)
    return tfds.features.FeaturesDict(
        {
            "steps": tfds.features.Dataset(
                {
                    "observation": tfds.features.FeaturesDict(observation),
                    "action": tfds.features.Tensor(shape=(action_dim,), dtype=np.float32),
                    "language_instruction": tfds.features.Text(),
                    "is_first": tfds.features.Scalar(dtype=np.bool_),
                    "is_last": tfds.features.Scalar(dtype=np.bool_),
                }
            ),
            "episode_metadata": tfds.features.FeaturesDict(
                {"task": tfds.features.Text(), "episode_id": tfds.features.Scalar(dtype=np.int64)}
            ),
        }
    )


def synth_episode(rng, length, task="t0", episode_id=0, image_shape=(16, 16, 3), action_dim=2, with_state=True):
    steps = []
    for t in range(length):
        observation = {"image": rng.integers(0, 256, image_shape, dtype=np.uint8)}
        if with_state:
            observation["state"] = rng.normal(size=3).astype(np.float32)
        steps.append(
            {
                "observation": observation,
                "action": rng.normal(size=action_dim).astype(np.float32),
                "language_instruction": f"do {task}",
                "is_first": t == 0,
                "is_last": t == length - 1,
            }
        )
    return {"steps": steps, "episode_metadata": {"task": task, "episode_id": episode_id}}


def write_synth(root, name, splits, num_shards=1, features=None):
    """Writes {split: [episodes or raw bytes]} as a TFDS dataset with ``num_shards`` files per split."""
    features = features or synth_features()
    version_dir = os.path.join(str(root), name, "1.0.0")
    os.makedirs(version_dir, exist_ok=True)
    for split, episodes in splits.items():
        for shard, rows in enumerate(np.array_split(np.arange(len(episodes)), num_shards)):
            path = os.path.join(version_dir, f"{name}-{split}.tfrecord-{shard:05d}-of-{num_shards:05d}")
            with tf.io.TFRecordWriter(path) as writer:
                for row in rows:
                    episode = episodes[row]  # raw bytes are written as they are (a bad record)
                    writer.write(episode if isinstance(episode, bytes) else features.serialize_example(episode))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        tfds.folder_dataset.write_metadata(data_dir=version_dir, features=features, check_data=False)
    return version_dir


def standardize_synth(traj):
    steps = traj["steps"]
    length = tf.shape(steps["action"])[0]
    return {
        "observation/image_primary": steps["observation"]["image"],
        "observation/proprio": steps["observation"]["state"],
        "action": steps["action"],
        "has_action": tf.logical_not(steps["is_last"]),
        "task/language_instruction": steps["language_instruction"],
        "dataset_name": tf.fill([length], "synth"),
    }


def data_config(**overrides):
    cfg = default_data_config()
    cfg.shuffle_buffer = 64
    cfg.traj_shuffle_buffer = 2
    cfg.update(overrides)
    return cfg


def pil_decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def mw(metaworld_dataset):
    """Reference arrays of the fixture read with TFDS's own reader (file order = split index)."""
    version_dir = str(metaworld_dataset["version_dir"])
    builder = tfds.builder_from_directory(version_dir)
    ref = {}
    for split in ("train", "val"):
        ds = builder.as_dataset(split, decoders={"steps": tfds.decode.SkipDecoding()}, shuffle_files=False)
        for index, episode in enumerate(ds.as_numpy_iterator()):
            steps = episode["steps"]
            ref[f"metaworld/{split}/{index}"] = {
                "images": list(steps["observation"]["image"]),
                "state": steps["observation"]["state"],
                "action": steps["action"],
                "is_last": steps["is_last"],
                "instruction": steps["language_instruction"][0],
                "task": episode["episode_metadata"]["task"],
            }
    return {"version_dir": version_dir, "out": str(metaworld_dataset["out"]), "ref": ref, "builder": builder}


def read_metaworld(mw, split="train", **kwargs):
    kwargs.setdefault("shuffle", False)
    return TrajDataset.from_rlds(
        mw["version_dir"], split, process_index=0, process_count=1,
        standardize_fn=METAWORLD.standardize_fn, dataset_name="metaworld", **kwargs,
    )


# --------------------------------------------------------------------------- round trip


def test_round_trip_trajectories_and_frames(mw):
    ref = mw["ref"]
    seen = set()
    for traj in read_metaworld(mw).iterator():
        key = traj["traj_key"][0].decode()
        seen.add(key)
        r = ref[key]
        length = len(r["images"])
        assert (traj["traj_key"] == traj["traj_key"][0]).all()
        np.testing.assert_array_equal(traj["action"], r["action"])  # exact
        np.testing.assert_array_equal(traj["observation"]["proprio"], r["state"])
        np.testing.assert_array_equal(traj["observation"]["timestep"], np.arange(length))
        np.testing.assert_array_equal(traj["has_action"], ~r["is_last"])
        assert list(traj["observation"]["image_primary"]) == r["images"]  # encoded bytes, untouched
        assert set(traj["observation"]["image_secondary"]) == {b""}
        assert traj["task"]["language_instruction"][0] == r["instruction"]
        assert (traj["dataset_name"] == b"metaworld").all()
    assert seen == {k for k in ref if "/train/" in k}

    # Decoding: our decoder vs TFDS's image decoder (same bytes) exactly, vs PIL within JPEG tolerance.
    key = sorted(seen)[0]
    image_feature = mw["builder"].info.features["steps"]["observation"]["image"]
    for data in ref[key]["images"][:5]:
        ours = ft.decode_image(tf.constant(data)).numpy()
        tfds_image = image_feature.decode_example(tf.constant(data)).numpy()
        np.testing.assert_array_equal(ours, tfds_image)
        # tf's JPEG decoder uses libjpeg's fast integer IDCT: a few levels off an accurate decode.
        diff = np.abs(ours.astype(int) - pil_decode(data).astype(int))
        assert diff.mean() < 3 and diff.max() <= 24
    assert ft.decode_image(tf.constant(b""), empty_shape=(4, 4)).numpy().tolist() == np.zeros((4, 4, 3)).tolist()

    # frame_map on trajectories maps every frame (here: decode), keeping [T, ...].
    def decode_frame(frame):
        observation = dict(frame["observation"], image_primary=ft.decode_image(frame["observation"]["image_primary"]))
        return dict(frame, observation=observation)

    traj = next(read_metaworld(mw).frame_map(decode_frame).iterator())
    r = ref[traj["traj_key"][0].decode()]
    assert traj["observation"]["image_primary"].shape == (len(r["images"]), 64, 64, 3)
    np.testing.assert_array_equal(traj["observation"]["image_primary"][3], ft.decode_image(r["images"][3]).numpy())

    # Whole pipeline (frames): every row equals the reference frame / action / state at its timestep.
    cfg = data_config(data_dir=mw["out"], sample="frames", image_size=64)
    batches = iter(make_batches(cfg, batch_size=16, train=True, seed=0, process_index=0, process_count=1))
    for _ in range(3):
        batch = next(batches)
        assert batch["observation"]["image_primary"].shape == (16, 64, 64, 3)
        for row in range(16):
            r = ref[batch["traj_key"][row].decode()]
            t = int(batch["observation"]["timestep"][row])
            decoded = ft.decode_image(tf.constant(r["images"][t])).numpy()
            np.testing.assert_array_equal(batch["observation"]["image_primary"][row], decoded)
            np.testing.assert_array_equal(batch["action"][row], r["action"][t])
            np.testing.assert_array_equal(batch["observation"]["proprio"][row], r["state"][t])


def test_pairs_clips_chunks_through_pipeline(mw):
    ref = mw["ref"]
    cfg = data_config(data_dir=mw["out"], sample="pairs", gap_frames=5)
    batch = next(iter(make_batches(cfg, batch_size=8, train=True, seed=1, process_index=0, process_count=1)))
    assert batch["observation"]["image_primary"].shape == (8, 2, 64, 64, 3)
    for row in range(8):
        r = ref[batch["traj_key"][row].decode()]
        t0, t1 = batch["observation"]["timestep"][row]
        assert t1 - t0 == 5 == batch["gap"][row] and t1 <= len(r["images"]) - 1
        for j, t in enumerate((t0, t1)):
            np.testing.assert_array_equal(
                batch["observation"]["image_primary"][row, j], ft.decode_image(tf.constant(r["images"][t])).numpy()
            )
        np.testing.assert_array_equal(batch["action"][row], r["action"][t0:t1])
        assert batch["has_action"][row].all()

    cfg = data_config(data_dir=mw["out"], sample="clips", clip_length=3, image_size=32)
    batch = next(iter(make_batches(cfg, batch_size=4, train=False, seed=0, process_index=0, process_count=1)))
    assert batch["observation"]["image_primary"].shape == (4, 4, 32, 32, 3)
    assert batch["action"].shape == (4, 3, 4)
    np.testing.assert_array_equal(np.diff(batch["observation"]["timestep"], axis=1), 1)
    assert all(k.startswith("metaworld/val/") for k in batch["traj_key"].astype(str))

    cfg = data_config(data_dir=mw["out"], sample="chunks", chunk_size=14, history=2)
    batch = next(iter(make_batches(cfg, batch_size=8, train=True, seed=0, process_index=0, process_count=1)))
    assert batch["action"].shape == (8, 14, 4) and batch["action_pad_mask"].shape == (8, 14)
    assert batch["observation"]["image_primary"].shape == (8, 2, 64, 64, 3)
    assert batch["action_pad_mask"][:, 0].all()
    for row in range(8):
        r = ref[batch["traj_key"][row].decode()]
        t = int(batch["observation"]["timestep"][row, -1])
        valid = min(14, len(r["images"]) - 1 - t)  # the terminal step has no action
        np.testing.assert_array_equal(batch["action_pad_mask"][row], np.arange(14) < valid)
        np.testing.assert_array_equal(batch["action"][row, :valid], r["action"][t : t + valid])
        assert not batch["action"][row, valid:].any()


def test_pipeline_options(mw, tmp_path):
    ref = mw["ref"]
    cfg = data_config(
        data_dir=mw["out"], sample="chunks", chunk_size=4, action_normalization="q01q99",
        proprio_normalization="mean_std", num_bins=8, stats_dir=str(tmp_path), few_demos_per_task=1,
        goal_relabel=True, max_samples_per_traj=5,
    )
    batches = make_batches(cfg, batch_size=6, train=True, seed=0, process_index=0, process_count=1)
    stats = batches.statistics["metaworld"]
    assert stats["action"]["bin_edges"].shape == (4, 9) and stats["action"]["binary_dims"] == (3,)
    batch = next(iter(batches))
    for row in range(6):
        r = ref[batch["traj_key"][row].decode()]
        t = int(batch["observation"]["timestep"][row])
        valid = batch["action_pad_mask"][row]
        raw = r["action"][t : t + 4][: valid.sum()]
        want = stats_lib.normalize(raw, stats["action"], "q01q99", mask=[True, True, True, False])
        np.testing.assert_allclose(batch["action"][row][valid], want, atol=1e-6)
        np.testing.assert_array_equal(batch["action"][row][valid][:, 3], raw[:, 3])  # gripper untouched
        np.testing.assert_allclose(
            batch["observation"]["proprio"][row],
            stats_lib.normalize(r["state"][t], stats["observation/proprio"], "mean_std"), atol=1e-5,
        )
        goal = int(batch["task"]["goal_timestep"][row])
        assert t <= goal < len(r["images"])
        np.testing.assert_array_equal(batch["task"]["image_primary"][row], ft.decode_image(r["images"][goal]).numpy())

    cfg = data_config(data_dir=mw["out"], sample="frames", drop_actions=True)
    batch = next(iter(make_batches(cfg, batch_size=8, train=False, seed=0, process_index=0, process_count=1)))
    assert not batch["action"].any() and not batch["has_action"].any()


# --------------------------------------------------------------------------- windows vs numpy


def _traj_tensors(traj_np):
    return tf.nest.map_structure(tf.constant, traj_np)


def test_window_indices_at_episode_boundaries(mw):
    trajs = list(read_metaworld(mw).iterator())
    for traj_np in trajs:
        traj = _traj_tensors(traj_np)
        length = len(traj_np["action"])
        images = traj_np["observation"]["image_primary"]
        actions, has = traj_np["action"], traj_np["has_action"]
        ts = np.arange(length)

        for gap in (1, 5, length - 1, length, length + 3):
            out = tf.nest.map_structure(np.asarray, tt.frame_pairs(traj, gap))
            n = max(length - gap, 0)
            assert out["observation"]["timestep"].shape == (n, 2)
            want = np.stack([ts[:n], ts[:n] + gap], 1)
            np.testing.assert_array_equal(out["observation"]["timestep"], want)
            np.testing.assert_array_equal(out["observation"]["image_primary"], images[want])
            assert out["action"].shape == (n, gap, 4)
            for i in range(n):
                np.testing.assert_array_equal(out["action"][i], actions[i : i + gap])
                np.testing.assert_array_equal(out["has_action"][i], has[i : i + gap])
            if n:
                assert out["observation"]["timestep"][-1, 1] == length - 1

        # Action window padded beyond the gap (mixtures with several gaps).
        out = tf.nest.map_structure(np.asarray, tt.frame_pairs(traj, 3, action_window=6))
        assert out["action"].shape == (length - 3, 6, 4)
        assert not out["action"][:, 3:].any() and not out["has_action"][:, 3:].any()

        for length_l, stride in ((3, 1), (2, 3)):
            out = tf.nest.map_structure(np.asarray, tt.clips(traj, length_l, stride))
            n = max(length - length_l * stride, 0)
            want = ts[:n, None] + stride * np.arange(length_l + 1)[None]
            np.testing.assert_array_equal(out["observation"]["timestep"], want)
            np.testing.assert_array_equal(out["observation"]["proprio"], traj_np["observation"]["proprio"][want])
            for i in range(n):
                np.testing.assert_array_equal(out["action"][i], actions[i : i + length_l * stride])
            assert want.max() == length - 1

        window = 4
        out = tf.nest.map_structure(np.asarray, tt.history_windows(traj, window))
        raw = ts[:, None] + np.arange(-window + 1, 1)[None]
        np.testing.assert_array_equal(out["observation"]["timestep"], np.maximum(raw, 0))
        np.testing.assert_array_equal(out["observation"]["pad_mask"], raw >= 0)
        np.testing.assert_array_equal(out["observation"]["image_primary"], images[np.maximum(raw, 0)])
        np.testing.assert_array_equal(out["action"], actions)  # untouched

        chunk = 6
        for pad in ("zero", "last"):
            out = tf.nest.map_structure(np.asarray, tt.action_chunks(traj, chunk, pad))
            for t in range(length):
                mask = np.array([t + k < length and has[t + k] for k in range(chunk)])
                np.testing.assert_array_equal(out["action_pad_mask"][t], mask)
                for k in range(chunk):
                    if mask[k]:
                        want_action = actions[t + k]
                    elif pad == "last" and mask[: k + 1].any():
                        want_action = actions[t + np.flatnonzero(mask[: k + 1])[-1]]
                    else:
                        want_action = np.zeros(4, np.float32)
                    np.testing.assert_array_equal(out["action"][t, k], want_action)
            assert not out["action_pad_mask"][-1].any()  # the terminal step has no action

        seed = tf.constant([3, 4], tf.int64)
        out = tf.nest.map_structure(np.asarray, tt.goal_relabel_uniform(traj, seed))
        goal = out["task"]["goal_timestep"]
        assert (goal >= ts).all() and (goal <= length - 1).all()
        np.testing.assert_array_equal(out["task"]["image_primary"], images[goal])
        again = tt.goal_relabel_uniform(traj, seed)["task"]["goal_timestep"].numpy()
        np.testing.assert_array_equal(goal, again)

        out = tf.nest.map_structure(np.asarray, tt.subsample(traj, 10, seed))
        kept = out["observation"]["timestep"]
        assert len(kept) == min(10, length) and (np.diff(kept) > 0).all()
        np.testing.assert_array_equal(out["action"], actions[kept])

        out = tf.nest.map_structure(np.asarray, tt.drop_actions(traj))
        assert not out["action"].any() and not out["has_action"].any()

    assert frame_gap(80, 0.6) == 48 and frame_gap(12, 2.4) == 29
    assert frame_gap(5, 0.05) == 1 and frame_gap(10, 0.25) == 3
    assert dataset_gap(DatasetSpec("x", control_hz=12.0, kind="human")) == 29
    assert dataset_gap(DatasetSpec("x", control_hz=5.0, gap_frames=3)) == 3
    with pytest.raises(ValueError, match="control_hz"):
        dataset_gap(DatasetSpec("nohz"))


def test_history_stride_windows_vs_numpy(mw):
    """Frame history k steps apart in every window kind, against index arithmetic in numpy: the
    history frames of anchor t are t-(W-1)k, ..., t-k, clamped to frame 0 (pad_mask False there);
    the sample's own frames, actions, anchor keys and sample count are those without history."""
    for traj_np in list(read_metaworld(mw).iterator())[:2]:
        traj = _traj_tensors(traj_np)
        length = len(traj_np["action"])
        images, ts = traj_np["observation"]["image_primary"], np.arange(length)
        for window, k in ((2, 7), (3, 2)):
            past = ts[:, None] + k * np.arange(-(window - 1), 0)[None]  # [T, W-1], may be < 0

            out = tf.nest.map_structure(np.asarray, tt.history_windows(traj, window, k))
            raw = np.concatenate([past, ts[:, None]], 1)
            np.testing.assert_array_equal(out["observation"]["timestep"], np.maximum(raw, 0))
            np.testing.assert_array_equal(out["observation"]["pad_mask"], raw >= 0)
            np.testing.assert_array_equal(out["observation"]["image_primary"], images[np.maximum(raw, 0)])

            plain = tf.nest.map_structure(np.asarray, tt.frame_pairs(traj, 5))
            out = tf.nest.map_structure(np.asarray, tt.frame_pairs(traj, 5, history=window, history_stride=k))
            n = length - 5
            raw = np.concatenate([past[:n], ts[:n, None], ts[:n, None] + 5], 1)
            np.testing.assert_array_equal(out["observation"]["timestep"], np.maximum(raw, 0))
            np.testing.assert_array_equal(out["observation"]["pad_mask"], raw >= 0)
            np.testing.assert_array_equal(out["observation"]["image_primary"], images[np.maximum(raw, 0)])
            np.testing.assert_array_equal(out["observation"]["proprio"],
                                          traj_np["observation"]["proprio"][np.maximum(raw, 0)])
            for key in ("action", "has_action", "gap", "traj_key"):
                np.testing.assert_array_equal(out[key], plain[key])

            plain = tf.nest.map_structure(np.asarray, tt.clips(traj, 2, 3))
            out = tf.nest.map_structure(np.asarray, tt.clips(traj, 2, 3, history=window, history_stride=k))
            n = length - 6
            raw = np.concatenate([past[:n], ts[:n, None] + np.array([0, 3, 6])[None]], 1)
            np.testing.assert_array_equal(out["observation"]["timestep"], np.maximum(raw, 0))
            np.testing.assert_array_equal(out["observation"]["pad_mask"], raw >= 0)
            np.testing.assert_array_equal(out["observation"]["image_primary"], images[np.maximum(raw, 0)])
            np.testing.assert_array_equal(out["action"], plain["action"])
    # history 1 adds nothing (no pad_mask), as before
    assert "pad_mask" not in tt.frame_pairs(traj, 5, history=1, history_stride=7)["observation"]
    with pytest.raises(ValueError, match="history window and stride must be >= 1"):
        tt.history_windows(traj, 2, 0)


@pytest.mark.parametrize("sample", ["chunks", "frames", "pairs", "clips"])
def test_history_frame_is_k_steps_earlier_through_pipeline(mw, sample):
    """Every sample kind with ``history=2, history_stride=7``: the window's first frame is exactly
    the raw episode's frame t-7 of the sample's anchor t (its first frame while t < 7, both cases
    in the batch: the eval stream runs in order from t = 0), decoded from the stored bytes, and so
    is its proprio; the anchor's frames follow unchanged."""
    k = 7
    extra = {"chunks": dict(chunk_size=4), "frames": {}, "pairs": dict(gap_frames=5),
             "clips": dict(clip_length=2, clip_stride=3)}[sample]
    cfg = data_config(data_dir=mw["out"], sample=sample, history=2, history_stride=k, shuffle_buffer=0, **extra)
    batch = next(iter(make_batches(cfg, batch_size=12, train=False, seed=0, process_index=0, process_count=1)))
    own = {"chunks": [0], "frames": [0], "pairs": [0, 5], "clips": [0, 3, 6]}[sample]
    images, timestep = batch["observation"]["image_primary"], batch["observation"]["timestep"]
    assert images.shape == (12, 1 + len(own), 64, 64, 3) and timestep.shape == (12, 1 + len(own))
    anchors = timestep[:, 1]
    assert anchors.min() < k <= anchors.max()  # the clamped start and the plain case
    for row in range(12):
        r = mw["ref"][batch["traj_key"][row].decode()]
        t = int(anchors[row])
        want = [max(t - k, 0)] + [t + o for o in own]
        np.testing.assert_array_equal(timestep[row], want)
        np.testing.assert_array_equal(batch["observation"]["pad_mask"][row], [t >= k] + [True] * len(own))
        for j, step in enumerate(want):
            decoded = ft.decode_image(tf.constant(r["images"][step])).numpy()
            np.testing.assert_array_equal(images[row, j], decoded)
        np.testing.assert_array_equal(batch["observation"]["proprio"][row, 0], r["state"][max(t - k, 0)])


# --------------------------------------------------------------------------- augmentation


def test_augmentation_seeded_and_consistent_across_frames():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    frames = tf.constant(np.stack([frame, frame, frame]))
    config = ft.AugmentConfig(crop_scale=(0.5, 0.9), brightness=0.2, contrast=(0.7, 1.3), saturation=(0.7, 1.3), hue=0.1)
    a = ft.augment_frames(frames, tf.constant([1, 2]), config).numpy()
    b = ft.augment_frames(frames, tf.constant([1, 2]), config).numpy()
    c = ft.augment_frames(frames, tf.constant([1, 3]), config).numpy()
    np.testing.assert_array_equal(a, b)
    assert (a[0] == a[1]).all() and (a[0] == a[2]).all()  # one set of parameters for the sample
    assert not (a == c).all() and not (a[0] == frame).all()
    assert a.dtype == np.uint8 and a.shape == (3, 32, 32, 3)
    small = ft.resize(tf.constant(frame), 16).numpy()
    assert small.shape == (16, 16, 3) and small.dtype == np.uint8
    assert ft.resize(tf.constant(frame), 32).numpy().tolist() == frame.tolist()


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_batches_and_resume(mw):
    cfg = data_config(data_dir=mw["out"], sample="pairs", gap_frames=4, augment=True, image_size=48)

    def first(seed, n=3, start_step=0):
        it = iter(make_batches(cfg, batch_size=8, train=True, seed=seed, process_index=0, process_count=1,
                               start_step=start_step))
        return [next(it) for _ in range(n)]

    a, b, c = first(0), first(0), first(1)
    for x, y in zip(a, b):
        tf.nest.map_structure(np.testing.assert_array_equal, x, y)
    assert not all(
        np.array_equal(x["observation"]["image_primary"], y["observation"]["image_primary"]) for x, y in zip(a, c)
    )
    resumed = first(0, n=1, start_step=2)[0]
    tf.nest.map_structure(np.testing.assert_array_equal, resumed, a[2])


def test_public_steps_composed_by_hand_equal_make_batches(mw, tmp_path):
    """make_batches is its public steps: read -> trajectory transforms + samples -> mix -> decode ->
    batches, composed here by hand, give the same first batch (a 2-dataset mixture with
    normalisation, augmentation, history and a resume skip)."""
    copy = dataclasses.replace(METAWORLD, name="metaworld_copy")
    mixture = [(METAWORLD, 1.0), (copy, 0.5)]
    cfg = data_config(data_dir=mw["out"], sample="pairs", gap_frames=3, augment=True, history=2, image_size=32,
                      action_normalization="q01q99", stats_dir=str(tmp_path / "stats"))
    kwargs = dict(train=True, seed=3, process_index=0, process_count=1)
    batch_size, start_step = 4, 1
    expected = next(iter(make_batches(cfg, batch_size=batch_size, start_step=start_step, mixture=mixture, **kwargs)))

    full = with_defaults(cfg)
    entries = mixture_entries(full, mixture)
    statistics = mixture_statistics(full, entries)
    gaps = mixture_gaps(full, entries)
    assert gaps == {"metaworld": 3, "metaworld_copy": 3} and set(statistics) == set(gaps)
    trajectories = read_trajectories(full, entries, **kwargs)
    action_dim, proprio_dim = mixture_dims(trajectories.children)
    streams = [
        trajectory_samples(traj, spec, full, train=True, statistics=statistics[spec.name], action_dim=action_dim,
                           proprio_dim=proprio_dim, gap=gaps[spec.name], max_gap=max(gaps.values()))
        for spec, _, traj in trajectories.children
    ]
    ds = mix_samples(streams, [w for _, w, _ in trajectories.children], full, train=True, seed=3)
    ds = decode_samples(ds, full, image_size=32, train=True, seed=3, skip=start_step * batch_size)
    got = next(batch_samples(ds, batch_size, full).iterator())

    tf.nest.assert_same_structure(got, expected)
    for x, y in zip(tf.nest.flatten(got), tf.nest.flatten(expected)):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert got["observation"]["image_primary"].shape == (batch_size, 3, 32, 32, 3)


# --------------------------------------------------------------------------- statistics and bins


def test_statistics_equal_numpy_and_cache(mw, tmp_path):
    ref = mw["ref"]
    train = [r for k, r in ref.items() if "/train/" in k]
    actions = np.concatenate([r["action"][~r["is_last"]] for r in train]).astype(np.float64)
    states = np.concatenate([r["state"] for r in train]).astype(np.float64)

    stats = stats_lib.compute_statistics(
        read_metaworld(mw), cache_dir=tmp_path, cache_key={"name": "metaworld", "v": 1}, name="metaworld",
        progress=False, num_bins=16, binary_dims=(3,),
    )
    for key, rows in (("action", actions), ("observation/proprio", states)):
        s = stats[key]
        assert s["count"] == len(rows)
        np.testing.assert_allclose(s["mean"], rows.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s["std"], rows.std(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(s["min"], rows.min(0).astype(np.float32))
        np.testing.assert_array_equal(s["max"], rows.max(0).astype(np.float32))
        np.testing.assert_allclose(s["q01"], np.quantile(rows, 0.01, axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s["q99"], np.quantile(rows, 0.99, axis=0), rtol=1e-5, atol=1e-6)
    assert stats["action"]["bin_edges"].shape == (4, 17)

    def exploding():
        raise AssertionError("the dataset was read although the statistics are cached")
        yield  # pragma: no cover

    cached = stats_lib.compute_statistics(
        exploding(), cache_dir=tmp_path, cache_key={"name": "metaworld", "v": 1}, name="metaworld",
        progress=False, num_bins=16, binary_dims=(3,),
    )
    for key in ("action", "observation/proprio"):
        for name in ("mean", "std", "min", "max", "q01", "q99"):
            np.testing.assert_array_equal(cached[key][name], stats[key][name])
        assert cached[key]["count"] == stats[key]["count"]
    assert len(os.listdir(tmp_path)) == 1

    # The pipeline's cache key holds the builder dir and its fingerprint: a second call reads it.
    spec = DatasetSpec("metaworld", standardize_fn=METAWORLD.standardize_fn, control_hz=80.0, gripper_dims=(3,))
    first = dataset_statistics(spec, mw["out"], stats_dir=str(tmp_path / "p"), progress=False)
    np.testing.assert_array_equal(first["action"]["q99"], stats["action"]["q99"])
    files = os.listdir(tmp_path / "p")
    assert len(files) == 1 and files[0].startswith("metaworld_")
    mtime = os.path.getmtime(tmp_path / "p" / files[0])
    dataset_statistics(spec, mw["out"], stats_dir=str(tmp_path / "p"), progress=False)
    assert os.path.getmtime(tmp_path / "p" / files[0]) == mtime


def test_quantile_bins_equal_frequency_and_round_trip(mw):
    rng = np.random.default_rng(0)
    num_bins, per_bin = 256, 40
    n = num_bins * per_bin
    x = np.concatenate(
        [rng.normal(size=(n, 2)), rng.exponential(size=(n, 1)), rng.choice([-1.0, 1.0], size=(n, 1))], axis=1
    ).astype(np.float32)
    edges = stats_lib.quantile_bin_edges(x, num_bins, binary_dims=(3,))
    assert edges.shape == (4, num_bins + 1) and edges.dtype == np.float32
    bins = stats_lib.bin_actions(x, edges, binary_dims=(3,))
    for d in range(3):
        counts = np.bincount(bins[:, d], minlength=num_bins)
        assert len(counts) == num_bins and np.abs(counts - per_bin).max() <= 1, counts
    assert set(np.unique(bins[:, 3])) == {0, 1}
    back = stats_lib.unbin_actions(bins, edges, binary_dims=(3,))
    np.testing.assert_array_equal(back[:, 3], x[:, 3])  # binary: exact
    half_width = 0.5 * (edges[np.arange(3)[None], bins[:, :3] + 1] - edges[np.arange(3)[None], bins[:, :3]])
    assert (np.abs(back[:, :3] - x[:, :3]) <= half_width + 1e-6).all()

    # Meta-World actions (clipped at +-1: ties) round trip within half a bin width too.
    actions = np.concatenate([r["action"][~r["is_last"]] for r in mw["ref"].values()])
    edges = stats_lib.quantile_bin_edges(actions, num_bins, binary_dims=(3,))
    bins = stats_lib.bin_actions(actions, edges, binary_dims=(3,))
    back = stats_lib.unbin_actions(bins, edges, binary_dims=(3,))
    width = edges[np.arange(3)[None], bins[:, :3] + 1] - edges[np.arange(3)[None], bins[:, :3]]
    assert (np.abs(back[:, :3] - actions[:, :3]) <= 0.5 * width + 1e-6).all()
    assert set(np.unique(back[:, 3])) <= {actions[:, 3].min(), actions[:, 3].max()}


def test_normalize_round_trip():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(1000, 3)) * [1.0, 5.0, 0.1] + [0.0, 2.0, -1.0]).astype(np.float32)
    stats = stats_lib.array_statistics(x)
    y = stats_lib.normalize(x, stats, "q01q99")
    assert y.min() >= -1 and y.max() <= 1
    inside = ((x >= stats["q01"]) & (x <= stats["q99"])).all(1)
    np.testing.assert_allclose(stats_lib.unnormalize(y, stats, "q01q99")[inside], x[inside], atol=1e-5)
    np.testing.assert_allclose(stats_lib.normalize(stats["q01"], stats, "q01q99"), -1, atol=1e-6)
    z = stats_lib.normalize(x, stats, "mean_std")
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(stats_lib.unnormalize(z, stats, "mean_std"), x, atol=1e-5)
    masked = stats_lib.normalize(x, stats, "q01q99", mask=[True, True, False])
    np.testing.assert_array_equal(masked[:, 2], x[:, 2])
    np.testing.assert_allclose(stats_lib.normalize(tf.constant(x), stats, "q01q99").numpy(), y, atol=1e-6)


# --------------------------------------------------------------------------- mixtures and shards


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    rng = np.random.default_rng(0)
    a = write_synth(root, "synth_a", {"train": [synth_episode(rng, 6 + i, f"t{i % 2}", i) for i in range(7)]},
                    num_shards=3)
    feats3 = synth_features(action_dim=3)
    b = write_synth(root, "synth_b", {"train": [synth_episode(rng, 5, "t0", i, action_dim=3) for i in range(3)]},
                    features=feats3)
    return {"root": root, "a": a, "b": b}


def test_mixture_frequencies_match_weights(mw, synth):
    spec_a = DatasetSpec("synth_a", builder_dir=synth["a"], standardize_fn=standardize_synth, control_hz=10.0)
    spec_b = DatasetSpec("synth_b", builder_dir=synth["b"], standardize_fn=standardize_synth, control_hz=10.0)
    spec_mw = DatasetSpec("metaworld", builder_dir=mw["version_dir"], standardize_fn=METAWORLD.standardize_fn,
                          control_hz=80.0, gripper_dims=(3,))
    cfg = data_config(sample="frames", image_size=16, shuffle_buffer=16)
    batches = make_batches(cfg, batch_size=100, train=True, seed=0, process_index=0, process_count=1,
                           mixture=[(spec_a, 3.0), (spec_b, 1.0), (spec_mw, 4.0)])
    it = iter(batches)
    names = []
    for _ in range(30):
        batch = next(it)
        name = batch["dataset_name"].astype(str)
        names.extend(name)
        assert all(k.startswith(n + "/") for k, n in zip(batch["traj_key"].astype(str), name))
        # Action / proprio zero-padded to the mixture's largest dims (4 and 39).
        assert batch["action"].shape == (100, 4) and batch["observation"]["proprio"].shape == (100, 39)
        assert batch["observation"]["image_primary"].shape == (100, 16, 16, 3)
        assert not batch["action"][name == "synth_a", 2:].any()
        assert not batch["action"][name == "synth_b", 3:].any()
        assert not batch["observation"]["proprio"][name != "metaworld", 3:].any()
    names = np.asarray(names)
    # 3000 draws: binomial std <= 0.0092; tolerance 0.035.
    for name, weight in (("synth_a", 3 / 8), ("synth_b", 1 / 8), ("metaworld", 4 / 8)):
        assert abs(np.mean(names == name) - weight) < 0.035, (name, np.mean(names == name))


def test_action_free_video_source_mixed_with_robot_pairs(mw, tmp_path):
    """A non-RLDS source (``trajectories_fn``, as the human-video reader provides): action-free
    schema trajectories from a generator, mixed with Meta-World pairs; gaps from each rate."""
    rng = np.random.default_rng(0)
    frames = [tf.io.encode_jpeg(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).numpy() for _ in range(40)]

    def generate():
        for index in range(3):
            length = 30 + 5 * index
            empty = np.array([b""] * length, dtype=object)
            yield {
                "observation": {"image_primary": np.array(frames[:length], dtype=object), "image_secondary": empty,
                                "image_wrist": empty, "proprio": np.zeros((length, 0), np.float32),
                                "timestep": np.arange(length, dtype=np.int32)},
                "action": np.zeros((length, 7), np.float32),
                "has_action": np.zeros((length,), bool),
                "task": {"language_instruction": np.array([b"push something"] * length, dtype=object)},
                "dataset_name": np.array([b"video"] * length, dtype=object),
                "traj_key": np.array([f"video/train/{index}".encode()] * length, dtype=object),
            }

    string = tf.TensorSpec([None], tf.string)
    signature = {
        "observation": {"image_primary": string, "image_secondary": string, "image_wrist": string,
                        "proprio": tf.TensorSpec([None, 0], tf.float32), "timestep": tf.TensorSpec([None], tf.int32)},
        "action": tf.TensorSpec([None, 7], tf.float32), "has_action": tf.TensorSpec([None], tf.bool),
        "task": {"language_instruction": string}, "dataset_name": string, "traj_key": string,
    }

    def trajectories(split, train, seed, process_index, process_count, data_dir=None):
        return tf.data.Dataset.from_generator(generate, output_signature=signature)

    video = DatasetSpec("video", kind="human", control_hz=5.0, trajectories_fn=trajectories)  # H = 12
    robot = DatasetSpec("metaworld", builder_dir=mw["version_dir"], standardize_fn=METAWORLD.standardize_fn,
                        control_hz=80.0, gripper_dims=(3,))
    cfg = data_config(sample="pairs", image_size=24)
    batches = make_batches(cfg, batch_size=32, train=True, seed=0, process_index=0, process_count=1,
                           mixture=[(video, 1.0), (robot, 1.0)])
    assert batches.gaps == {"video": 12, "metaworld": 48}
    batch = next(iter(batches))
    is_video = batch["dataset_name"] == b"video"
    assert 0 < is_video.sum() < 32
    assert batch["action"].shape == (32, 48, 7) and batch["observation"]["proprio"].shape == (32, 2, 39)
    np.testing.assert_array_equal(batch["gap"], np.where(is_video, 12, 48))
    assert not batch["has_action"][is_video].any() and not batch["action"][is_video].any()
    robot_mask = batch["has_action"][~is_video]
    assert robot_mask.all()
    np.testing.assert_array_equal(np.diff(batch["observation"]["timestep"], axis=1)[:, 0], batch["gap"])
    stats = stats_lib.compute_statistics(trajectories("train", False, 0, 0, 1), name="video", progress=False)
    assert stats["action"]["count"] == 0 and stats["observation/proprio"]["mean"].shape == (0,)


def test_metaworld_names_read_alike(mw, tmp_path):
    """The Meta-World registry entry named as a spec in a mixture, by the ``metaworld_mt10`` mixture
    (an alias of the same entry) and as ``config.data.dataset`` gives the same batches."""
    cfg = data_config(data_dir=mw["out"], sample="chunks", chunk_size=4, action_normalization="q01q99",
                      stats_dir=str(tmp_path))
    theirs = make_batches(cfg, batch_size=8, seed=0, process_index=0, process_count=1,
                          mixture=[(get_dataset_spec("metaworld_mt10"), 1.0)])
    ours = make_batches(cfg, batch_size=8, seed=0, process_index=0, process_count=1)
    named = make_batches(data_config(data_dir=mw["out"], sample="chunks", chunk_size=4, mixture="metaworld_mt10",
                                     action_normalization="q01q99", stats_dir=str(tmp_path)),
                         batch_size=8, seed=0, process_index=0, process_count=1)
    assert [s.name for s, _ in named.specs] == ["metaworld"]
    a, b, c = next(iter(theirs)), next(iter(ours)), next(iter(named))
    for other in (a, c):
        for key in ("action", "action_pad_mask", "has_action"):
            np.testing.assert_array_equal(other[key], b[key])
        np.testing.assert_array_equal(other["observation"]["image_primary"], b["observation"]["image_primary"])
        np.testing.assert_array_equal(other["traj_key"], b["traj_key"])
    np.testing.assert_array_equal(theirs.statistics["metaworld"]["action"]["q01"],
                                  ours.statistics["metaworld"]["action"]["q01"])


def test_sample_from_datasets_on_trajectory_datasets(synth):
    a = TrajDataset.from_rlds(synth["a"], "train", process_index=0, process_count=1, seed=0, deterministic=True,
                              standardize_fn=standardize_synth, dataset_name="synth_a")
    b = TrajDataset.from_rlds(synth["b"], "train", process_index=0, process_count=1, seed=0, deterministic=True,
                              standardize_fn=standardize_synth, dataset_name="synth_b")
    pick = lambda t: {"traj_key": t["traj_key"], "action": t["action"][:, :2]}  # noqa: E731
    a = a.traj_map(pick).flatten().repeat()
    b = b.traj_map(pick).flatten().repeat()
    mixed = TrajDataset.sample_from_datasets([a, b], [0.8, 0.2], seed=3).batch(500)
    keys = next(mixed.iterator())["traj_key"].astype(str)
    frac_a = np.mean([k.startswith("synth_a/") for k in keys])
    assert abs(frac_a - 0.8) < 0.06  # binomial std 0.018


def test_process_shards_disjoint_and_covering(synth):
    # Pure assignment: files i::n, or balanced contiguous example ranges with fewer files.
    # f2 holds 5 records from split index 5; the (sliced) split starts at its second one.
    shards = [FileShard("f0", 0, 3, 0), FileShard("f1", 0, 2, 3), FileShard("f2", 1, 4, 6)]
    every_index = [0, 1, 2, 3, 4, 6, 7, 8, 9]
    for count in range(1, 12):
        covered = []
        for index in range(count):
            for s in shard_file_instructions(shards, index, count):
                covered.extend(range(s.start, s.start + s.take))
        assert sorted(covered) == every_index, count  # disjoint and covering
    assert [s.filename for s in shard_file_instructions(shards, 1, 2)] == ["f1"]

    # Real reads: 7 episodes in 3 files; 2 processes (files), 4 processes (example ranges).
    every = {f"synth_a/train/{i}" for i in range(7)}
    for count in (2, 4):
        seen = []
        for index in range(count):
            ds = TrajDataset.from_rlds(synth["a"], "train", shuffle=True, seed=0, process_index=index,
                                       process_count=count, standardize_fn=standardize_synth, dataset_name="synth_a")
            keys = [t["traj_key"][0].decode() for t in ds.iterator()]
            assert len(keys) == ds.num_trajectories
            seen.extend(keys)
        assert len(seen) == len(set(seen)) and set(seen) == every
    # 8 processes, 7 episodes: process 0's range [0, 7 * 0 // 8) is empty.
    with pytest.raises(ValueError, match="process 0 of 8 gets none"):
        TrajDataset.from_rlds(synth["a"], "train", process_index=0, process_count=8, standardize_fn=standardize_synth)


def test_few_demos_per_task(mw):
    indices = first_episodes_per_task(mw["version_dir"], "train", 1, task_key="episode_metadata/task",
                                      order_key="episode_metadata/episode_id")
    assert len(indices) == 2  # one per task
    tasks = {mw["ref"][f"metaworld/train/{i}"]["task"] for i in indices}
    assert tasks == {b"reach", b"button-press"}
    ds = read_metaworld(mw, traj_indices=indices[:1])
    assert [t["traj_key"][0].decode() for t in ds.iterator()] == [f"metaworld/train/{indices[0]}"]


# --------------------------------------------------------------------------- bad inputs


def test_missing_data_dir_and_empty_datasets(mw, tmp_path):
    with pytest.raises(ValueError, match=r"dataset 'metaworld'.*data_dir is empty"):
        make_batches(data_config(data_dir=""), batch_size=2, process_index=0, process_count=1)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"dataset 'metaworld'.*nowhere.*does not exist"):
        make_batches(data_config(data_dir=missing), batch_size=2, process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match=r"not a TFDS dataset version directory"):
        TrajDataset.from_rlds(str(tmp_path), "train", process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"no split 'test'; splits: \['train', 'val'\]"):
        read_metaworld(mw, split="test")

    # A dataset whose split has no episode.
    empty = write_synth(tmp_path, "hollow", {"train": []})
    with pytest.raises(ValueError, match=r"dataset 'hollow'.*split 'train' is empty"):
        TrajDataset.from_rlds(empty, "train", process_index=0, process_count=1, dataset_name="hollow")

    # Trajectories too short for any pair.
    with pytest.raises(ValueError, match=r"dataset 'metaworld': no pairs samples.*gap \+ 1 = 1001"):
        make_batches(data_config(data_dir=mw["out"], sample="pairs", gap_frames=1000), batch_size=2,
                     process_index=0, process_count=1)
    with pytest.raises(ValueError, match="config.data.sample='triples' is unknown"):
        make_batches(data_config(data_dir=mw["out"], sample="triples"), batch_size=2)
    with pytest.raises(KeyError, match=r"dataset 'metaworld': no camera\(s\) \['wrist2'\]"):
        make_batches(data_config(data_dir=mw["out"], cameras="wrist2"), batch_size=2, process_index=0,
                     process_count=1)


def test_missing_feature_key_names_dataset_and_keys(tmp_path):
    rng = np.random.default_rng(0)
    features = synth_features(with_state=False)
    path = write_synth(tmp_path, "stateless", {"train": [synth_episode(rng, 4, with_state=False)]}, features=features)

    def standardize_with_feature(traj):  # reads through dataset.feature, as a standardize_fn should
        return {"observation": {"proprio": feature(traj, "steps/observation/state", "stateless")},
                "action": feature(traj, "steps/action", "stateless")}

    with pytest.raises(MissingFeatureError) as info:
        TrajDataset.from_rlds(path, "train", process_index=0, process_count=1, standardize_fn=standardize_with_feature,
                              dataset_name="stateless")
    text = str(info.value)
    assert "dataset 'stateless'" in text and "'steps/observation/state'" in text
    assert "steps/observation/image" in text and "steps/action" in text  # the keys that exist
    # A raw layout (here Meta-World's) names the dataset, every missing key and the keys that exist.
    with pytest.raises(MissingFeatureError) as info:
        TrajDataset.from_rlds(path, "train", process_index=0, process_count=1, standardize_fn=METAWORLD.standardize_fn,
                              dataset_name="stateless")
    text = str(info.value)
    assert "dataset 'metaworld'" in text and "'observation/state'" in text and "observation/image" in text
    with pytest.raises(MissingFeatureError, match=r"dataset 'stateless'.*needs feature 'state'"):
        TrajDataset.from_rlds(path, "train", process_index=0, process_count=1, standardize_fn=standardize_synth,
                              dataset_name="stateless")


def test_wrong_image_shape_or_channels(tmp_path):
    rng = np.random.default_rng(0)
    gray_features = synth_features(image_shape=(16, 16, 1))
    gray = write_synth(tmp_path, "gray", {"train": [synth_episode(rng, 4, image_shape=(16, 16, 1))]},
                       features=gray_features)
    spec = DatasetSpec("gray", builder_dir=gray, standardize_fn=standardize_synth, control_hz=10.0)
    batches = make_batches(data_config(image_size=16), batch_size=2, process_index=0, process_count=1,
                           mixture=[(spec, 1.0)])
    with pytest.raises(ft.ImageFormatError, match=r"dataset 'gray' key observation/image_primary: expected an RGB "
                                                  r"image \[H, W, 3\].*got decoded shape \[16, 16, 1\]"):
        next(iter(batches))

    rgb = write_synth(tmp_path, "rgb", {"train": [synth_episode(rng, 4)]})
    spec = DatasetSpec("rgb", builder_dir=rgb, standardize_fn=standardize_synth, control_hz=10.0, image_shape=(32, 32))
    batches = make_batches(data_config(image_size=16), batch_size=2, process_index=0, process_count=1,
                           mixture=[(spec, 1.0)])
    with pytest.raises(ft.ImageFormatError, match=r"dataset 'rgb'.*expected image shape \[32, 32, 3\], got decoded "
                                                  r"shape \[16, 16, 3\]"):
        next(iter(batches))


def test_corrupt_tfrecord_clear_error_or_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    path = write_synth(tmp_path, "broken", {"train": [synth_episode(rng, 4, episode_id=i) for i in range(6)]},
                       num_shards=2)
    bad_file = os.path.join(path, "broken-train.tfrecord-00001-of-00002")
    data = bytearray(open(bad_file, "rb").read())
    first_len = struct.unpack("<Q", data[:8])[0]
    second = 8 + 4 + first_len + 4  # the second record of the file: its payload gets a flipped byte
    data[second + 12 + 40] ^= 0xFF
    open(bad_file, "wb").write(bytes(data))

    def read(**kwargs):
        return TrajDataset.from_rlds(path, "train", shuffle=False, process_index=0, process_count=1,
                                     standardize_fn=standardize_synth, dataset_name="broken", **kwargs)

    with pytest.raises(CorruptDataError, match=r"dataset 'broken' split 'train': file .*broken-train.tfrecord-00001"
                                               r"-of-00002 has a corrupt or unparseable record at record 1.*"
                                               r"ignore_errors=True"):
        list(read().iterator())

    ds = read(ignore_errors=True)
    keys = sorted(t["traj_key"][0].decode() for t in ds.iterator())
    # File 1 holds episodes 3, 4, 5: episode 3 is read, 4 is corrupt and 5 sits behind it.
    assert keys == ["broken/train/0", "broken/train/1", "broken/train/2", "broken/train/3"]
    assert ds.num_skipped == 2
    list(ds.iterator())
    assert ds.num_skipped == 4  # cumulative over passes

    # A well-framed record that is no tf.Example (parse error): only that record is skipped, and
    # the episodes after it keep their split indices.
    episodes = [synth_episode(rng, 3, episode_id=i) for i in range(4)]
    path = write_synth(tmp_path, "garbled", {"train": episodes[:2] + [b"\x01 not a tf.Example"] + episodes[2:]})
    ds = TrajDataset.from_rlds(path, "train", shuffle=False, process_index=0, process_count=1,
                               standardize_fn=standardize_synth, dataset_name="garbled", ignore_errors=True)
    # Sorted: without deterministic=True the parallel parse may reorder episodes.
    keys = sorted(t["traj_key"][0].decode() for t in ds.iterator())
    assert keys == ["garbled/train/0", "garbled/train/1", "garbled/train/3", "garbled/train/4"]
    assert ds.num_skipped == 1
    with pytest.raises(CorruptDataError, match=r"garbled-train.tfrecord-00000-of-00001 has a corrupt or unparseable "
                                               r"record at record 2 of the file.*1 of its 5 records"):
        list(TrajDataset.from_rlds(path, "train", process_index=0, process_count=1,
                                   standardize_fn=standardize_synth, dataset_name="garbled").iterator())


# --------------------------------------------------------------------------- latent action labels

LATENT_HASH = "laq-test-hash"
LATENT_CODE_SHAPE = (2,)


def latent_code(traj_index, frame):
    """The test labels: a deterministic function of (trajectory index, frame) -> [2] codes in [0, 8)."""
    return np.asarray([(frame * 3 + k + traj_index) % 8 for k in range(LATENT_CODE_SHAPE[0])], np.int64)


@pytest.fixture(scope="module")
def mw_train_trajs(mw):
    """[(traj_key, length)] of the fixture's train split, as the pipeline reads them."""
    ds = make_trajectory_dataset(get_dataset_spec("metaworld"), "train", False, 0, 0, 1, data_dir=mw["out"])
    trajs = [(t["traj_key"][0].decode(), len(t["observation"]["timestep"])) for t in ds.iterator()]
    assert len(trajs) >= 2
    return trajs


def write_mw_labels(out_dir, trajs, window, skip=()):
    """Labels frames 0..T-1-window of every trajectory (a full LAQ window ahead) but ``skip``'s.
    -> {traj_key: trajectory index}, labelled frames."""
    index, labelled = {}, 0
    with LatentLabelWriter(out_dir, LATENT_HASH, LATENT_CODE_SHAPE, 8, {"gap": window}) as writer:
        for i, (key, length) in enumerate(trajs):
            index[key] = i
            if key in skip:
                continue
            frames = np.arange(max(length - window, 0))
            writer.add(key, frames, np.stack([latent_code(i, f) for f in frames]).reshape(-1, *LATENT_CODE_SHAPE))
            labelled += len(frames)
    return index, labelled


def all_rows(cfg):
    rows = []
    batches = make_batches(cfg, batch_size=1, train=False, seed=0, process_index=0, process_count=1)
    for batch in batches:
        rows.append(batch)
    return batches, rows


def test_latent_labels_joined_at_sample_start_frame(mw, mw_train_trajs, tmp_path):
    gap = 3
    label_dir = str(tmp_path / "labels")
    index, labelled = write_mw_labels(label_dir, mw_train_trajs, gap)
    assert labelled == sum(length - gap for _, length in mw_train_trajs)
    base = dict(data_dir=mw["out"], eval_split="train", eval_repeat=False, shuffle_buffer=4, image_size=16,
                latent_labels=label_dir, latent_labels_hash=LATENT_HASH)

    # pairs (x_t, x_{t+gap}): every start frame with a pair has a label; the label is frame t's.
    batches, rows = all_rows(data_config(sample="pairs", gap_frames=gap, **base))
    assert batches.latent_labels is not None and batches.latent_labels.code_shape == LATENT_CODE_SHAPE
    assert len(rows) == labelled
    seen = set()
    for batch in rows:
        assert batch["latent_action"].shape == (1, *LATENT_CODE_SHAPE) and batch["latent_action"].dtype == np.int32
        assert batch["has_latent"].shape == (1,) and batch["has_latent"].all()
        key = batch["traj_key"][0].decode()
        t0, t1 = batch["observation"]["timestep"][0]
        assert t1 - t0 == gap
        np.testing.assert_array_equal(batch["latent_action"][0], latent_code(index[key], int(t0)))
        seen.add((key, int(t0)))
    assert len(seen) == labelled

    # frames: the last `gap` frames of every trajectory have no label and are dropped by the filter.
    _, rows = all_rows(data_config(sample="frames", **base))
    assert len(rows) == labelled
    for batch in rows:
        assert batch["has_latent"].all()
        key, t = batch["traj_key"][0].decode(), int(batch["observation"]["timestep"][0])
        assert t < dict(mw_train_trajs)[key] - gap
        np.testing.assert_array_equal(batch["latent_action"][0], latent_code(index[key], t))

    # A trajectory without labels: "skip" drops it (and counts it), "error" names it.
    skipped_key, skipped_length = mw_train_trajs[0]
    partial = str(tmp_path / "partial")
    _, partial_labelled = write_mw_labels(partial, mw_train_trajs, gap, skip={skipped_key})
    # (check_nonempty off: its probe is a pass of its own, which the skip counter counts too.)
    cfg = data_config(sample="pairs", gap_frames=gap, check_nonempty=False,
                      **dict(base, latent_labels=partial, latent_labels_missing="skip"))
    batches, rows = all_rows(cfg)
    assert len(rows) == partial_labelled == labelled - (skipped_length - gap)
    assert skipped_key not in {b["traj_key"][0].decode() for b in rows}
    assert batches.latent_join_stats["metaworld"].skipped == 1
    cfg = data_config(sample="pairs", gap_frames=gap, **dict(base, latent_labels=partial))
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"no latent labels in.*{skipped_key}"):
        all_rows(cfg)
    with pytest.raises(ValueError, match="latent_labels_missing='maybe' is unknown"):
        all_rows(data_config(sample="pairs", **dict(base, latent_labels_missing="maybe")))


def test_latent_labels_wrong_hash_or_missing_dir(mw, mw_train_trajs, tmp_path):
    label_dir = str(tmp_path / "labels")
    write_mw_labels(label_dir, mw_train_trajs, 3)
    cfg = data_config(data_dir=mw["out"], sample="pairs", gap_frames=3, latent_labels=label_dir,
                      latent_labels_hash="other-hash")
    with pytest.raises(ValueError, match=f"{LATENT_HASH}.*other-hash"):
        make_batches(cfg, batch_size=2, train=False, process_index=0, process_count=1)
    missing = str(tmp_path / "no_labels_here")
    cfg = data_config(data_dir=mw["out"], sample="pairs", gap_frames=3, latent_labels=missing)
    with pytest.raises(FileNotFoundError, match=f"{missing}: no latent label directory"):
        make_batches(cfg, batch_size=2, train=False, process_index=0, process_count=1)


def test_clip_stride_in_seconds_per_dataset(metaworld_dataset):
    """config.data.clip_stride_seconds becomes frames at each dataset's rate (registry.clip_stride):
    a mixture of the 80 Hz Meta-World data and the same data registered at 40 Hz gets strides 8 and
    4 for 0.1 s; the 40 Hz clips' actions are zero-padded to the longer span."""
    from jaxvla.data.registry import clip_stride, register_dataset

    metaworld = dataclasses.replace(get_dataset_spec("metaworld"), builder_dir=str(metaworld_dataset["version_dir"]))
    register_dataset(dataclasses.replace(metaworld, name="mw_80hz"))
    register_dataset(dataclasses.replace(metaworld, name="mw_40hz", control_hz=40.0))
    assert clip_stride("mw_80hz", 0.1, 3) == 8 and clip_stride("mw_40hz", 0.1, 3) == 4
    assert clip_stride("mw_80hz", 0.0, 3) == 3  # no seconds: the frames, for every dataset
    with pytest.raises(ValueError, match="no control_hz"):
        clip_stride(dataclasses.replace(metaworld, control_hz=None), 0.1)

    data = {"mixture": "mw_80hz:1,mw_40hz:1", "sample": "clips", "clip_length": 2, "clip_stride_seconds": 0.1,
            "shuffle_buffer": 16}
    batches = make_batches(data, batch_size=16, train=True, seed=0)
    assert batches.gaps == {"mw_80hz": 8, "mw_40hz": 4}
    batch = next(iter(batches))
    assert batch["action"].shape == (16, 16, 4)
    names = [n.decode() for n in batch["dataset_name"]]
    for row, name in enumerate(names):
        stride = 8 if name == "mw_80hz" else 4
        timesteps = batch["observation"]["timestep"][row]
        np.testing.assert_array_equal(timesteps, timesteps[0] + stride * np.arange(3))
        if name == "mw_40hz":
            assert not batch["has_action"][row, 8:].any()
    assert set(names) == {"mw_80hz", "mw_40hz"}
