"""Latent action labels: the on-disk format, atomic + resumable writing, and the join."""

import gc
import json
import os

import numpy as np
import pytest

import tensorflow as tf

from jaxvla.data import latent_labels as ll  # noqa: E402
from jaxvla.data.video import trajectory_signature, video_trajectory  # noqa: E402

CODE_SHAPE = (2, 2)
CODEBOOK = 8
HASH = "laq-1234"


def make_labels(num, gap=2, seed=0):
    """{traj_key: (length, frame_indices, codes)}: pair labelling of frames 0..T-1-gap, listed in
    shuffled order; trajectory 1 labels only every other frame; the last is too short to label."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(num):
        length = 5 + 2 * i
        frames = np.arange(max(length - gap, 0))
        if i == 1:
            frames = frames[::2]
        if i == num - 1:
            length, frames = gap, np.zeros(0, np.int64)
        frames = rng.permutation(frames)
        codes = rng.integers(0, CODEBOOK, (len(frames), *CODE_SHAPE))
        out[f"toy/train/{i}"] = (length, frames, codes)
    return out


def trajectories(lengths):
    """A tf.data.Dataset of standardised trajectories {traj_key: length} (empty images)."""

    def generate():
        for key, length in lengths.items():
            yield video_trajectory(np.array([b""] * length, dtype=object), "do it", key, "toy", action_dim=7)

    return tf.data.Dataset.from_generator(generate, output_signature=trajectory_signature(7))


def write(out_dir, labels, **kwargs):
    with ll.LatentLabelWriter(out_dir, HASH, CODE_SHAPE, CODEBOOK, {"gap": 2}, **kwargs) as writer:
        for key, (_, frames, codes) in labels.items():
            writer.add(key, frames, codes)
    return str(out_dir)


def label_contents(label_dir):
    info, labels = ll.load_latent_labels(label_dir)
    return info, {key: (f.tolist(), c.tolist()) for key, (f, c) in labels.items()}


def test_join_gives_each_frame_its_codes(tmp_path):
    labels = make_labels(5)
    label_dir = write(tmp_path / "labels", labels, shard_size=2)
    info, lookup = ll.load_latent_labels(label_dir)
    assert info["laq_config_hash"] == HASH and info["code_shape"] == list(CODE_SHAPE)
    assert info["codebook_size"] == CODEBOOK and info["count"] == 5 and info["meta"] == {"gap": 2}
    assert info["num_frames"] == sum(len(f) for _, f, _ in labels.values())
    assert len(info["shards"]) == 3 and "created" in info

    joined = ll.join_latent_labels(trajectories({k: v[0] for k, v in labels.items()}), label_dir, expected_hash=HASH)
    assert joined.element_spec["latent_action"] == tf.TensorSpec([None, *CODE_SHAPE], tf.int32)
    assert joined.element_spec["has_latent"] == tf.TensorSpec([None], tf.bool)
    seen = 0
    for traj in joined.as_numpy_iterator():
        key = traj["traj_key"][0].decode()
        length, frames, codes = labels[key]
        assert traj["latent_action"].shape == (length, *CODE_SHAPE)
        expected = np.zeros((length, *CODE_SHAPE), np.int64)
        expected[frames] = codes
        has = np.zeros(length, bool)
        has[frames] = True
        np.testing.assert_array_equal(traj["has_latent"], has)
        np.testing.assert_array_equal(traj["latent_action"], expected)
        assert list(traj["observation"]["timestep"]) == list(range(length))  # the rest is untouched
        seen += 1
    assert seen == 5
    # Unlabelled tails: the pair labelling of trajectory 0 (length 5, gap 2) leaves frames 3, 4.
    first = next(iter(joined.as_numpy_iterator()))
    assert list(first["has_latent"]) == [True, True, True, False, False]
    # The python-side lookup agrees.
    frames, codes = lookup["toy/train/1"]
    order = np.argsort(labels["toy/train/1"][1])
    np.testing.assert_array_equal(frames, labels["toy/train/1"][1][order])
    np.testing.assert_array_equal(codes, labels["toy/train/1"][2][order])
    assert "toy/train/4" in lookup and len(lookup["toy/train/4"][0]) == 0


def test_join_on_flat_keyed_trajectories(tmp_path):
    labels = make_labels(2)
    label_dir = write(tmp_path / "labels", labels)
    flat = trajectories({"toy/train/0": 5}).map(
        lambda t: {"observation/timestep": t["observation"]["timestep"], "traj_key": t["traj_key"]}
    )
    (traj,) = ll.join_latent_labels(flat, label_dir).as_numpy_iterator()
    assert list(traj["has_latent"]) == [True, True, True, False, False]
    with pytest.raises(KeyError, match="observation/timestep"):
        ll.join_latent_labels(flat.map(lambda t: {"traj_key": t["traj_key"]}), label_dir)


def test_hash_mismatch_names_both(tmp_path):
    label_dir = write(tmp_path / "labels", make_labels(2))
    with pytest.raises(ValueError, match="LAQ config hash 'laq-1234', expected 'other-hash'"):
        ll.join_latent_labels(trajectories({"toy/train/0": 5}), label_dir, expected_hash="other-hash")


def test_missing_trajectory_error_or_skip(tmp_path):
    labels = make_labels(3)
    label_dir = write(tmp_path / "labels", labels)
    lengths = {"toy/train/0": 5, "toy/train/unlabelled": 4, "toy/train/2": 9}
    with pytest.raises(tf.errors.InvalidArgumentError, match="no latent labels in.*toy/train/unlabelled"):
        list(ll.join_latent_labels(trajectories(lengths), label_dir).as_numpy_iterator())
    stats = ll.JoinStats()
    joined = ll.join_latent_labels(trajectories(lengths), label_dir, missing="skip", stats=stats)
    keys = [t["traj_key"][0].decode() for t in joined.as_numpy_iterator()]
    assert keys == ["toy/train/0", "toy/train/2"] and stats.skipped == 1
    with pytest.raises(ValueError, match="missing must be"):
        ll.join_latent_labels(trajectories(lengths), label_dir, missing="ignore")


def test_labels_beyond_the_trajectory(tmp_path):
    label_dir = write(tmp_path / "labels", {"toy/train/0": (0, np.array([0, 20]), np.ones((2, *CODE_SHAPE), int))})
    with pytest.raises(tf.errors.InvalidArgumentError, match="toy/train/0.*frame indices the trajectory lacks"):
        list(ll.join_latent_labels(trajectories({"toy/train/0": 5}), label_dir).as_numpy_iterator())
    (traj,) = ll.join_latent_labels(trajectories({"toy/train/0": 5}), label_dir, check_frames=False).as_numpy_iterator()
    assert list(traj["has_latent"]) == [True, False, False, False, False]


def test_missing_label_dir_and_bad_records(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no latent label directory"):
        ll.load_latent_labels(tmp_path / "nowhere")
    writer = ll.LatentLabelWriter(tmp_path / "labels", HASH, CODE_SHAPE, CODEBOOK)
    with pytest.raises(ValueError, match=r"codes must be int \[3, 2, 2\]"):
        writer.add("a", [0, 1, 2], np.zeros((3, 4), int))
    with pytest.raises(ValueError, match=r"codes must be in \[0, 8\)"):
        writer.add("a", [0], np.full((1, 2, 2), 8))
    with pytest.raises(ValueError, match="frame index 1 appears twice"):
        writer.add("a", [1, 1], np.zeros((2, 2, 2), int))
    writer.add("a", [0], np.zeros((1, 2, 2), int))
    with pytest.raises(ValueError, match="'a' is already labelled"):
        writer.add("a", [1], np.zeros((1, 2, 2), int))
    writer.close()
    with pytest.raises(FileExistsError, match="already holds finished latent labels"):
        ll.LatentLabelWriter(tmp_path / "labels", HASH, CODE_SHAPE, CODEBOOK)
    # overwrite=True replaces the old labels, atomically at close.
    with ll.LatentLabelWriter(tmp_path / "labels", "new-hash", CODE_SHAPE, CODEBOOK, overwrite=True) as writer:
        writer.add("b", [0], np.ones((1, 2, 2), int))
    info, contents = label_contents(tmp_path / "labels")
    assert info["laq_config_hash"] == "new-hash" and list(contents) == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["labels"]
    # A record whose codes do not fit its frame count is refused when loading.
    shard = tmp_path / "labels" / "labels-00000.tfrecord"
    example = tf.train.Example(features=tf.train.Features(feature={
        "traj_key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"b"])),
        "frame_index": tf.train.Feature(int64_list=tf.train.Int64List(value=[0, 1])),
        "codes": tf.train.Feature(int64_list=tf.train.Int64List(value=[1, 1, 1, 1])),
    }))
    with tf.io.TFRecordWriter(str(shard)) as f:
        f.write(example.SerializeToString())
    with pytest.raises(ValueError, match="codes are not"):
        ll.load_latent_labels(tmp_path / "labels")


def test_interrupted_writer_resumes_to_the_same_labels(tmp_path):
    labels = make_labels(7)
    keys = list(labels)
    reference = label_contents(write(tmp_path / "reference", labels, shard_size=2))

    out = tmp_path / "labels"
    staging = ll.staging_dir(out)
    # Run 1 dies by an exception after 5 trajectories: shards {0,1}, {2,3} complete, 4 in flight.
    with pytest.raises(RuntimeError, match="labeller crashed"):
        with ll.LatentLabelWriter(out, HASH, CODE_SHAPE, CODEBOOK, {"gap": 2}, shard_size=2) as writer:
            for key in keys[:5]:
                writer.add(key, *labels[key][1:])
            raise RuntimeError("labeller crashed")
    assert not out.exists()  # nothing visible under the final name
    with pytest.raises(FileNotFoundError, match="unfinished labelling run"):
        ll.load_latent_labels(out)
    with pytest.raises(FileExistsError, match="resume=True"):
        ll.LatentLabelWriter(out, HASH, CODE_SHAPE, CODEBOOK)
    with pytest.raises(ValueError, match="'other' .*'laq-1234'|'laq-1234'.*'other'"):
        ll.LatentLabelWriter(out, "other", CODE_SHAPE, CODEBOOK, resume=True)

    # Run 2 resumes, labels one more trajectory and is never closed (the process "dies"); its open
    # shard file stays behind half-written.
    writer = ll.LatentLabelWriter(out, HASH, CODE_SHAPE, CODEBOOK, {"gap": 2}, resume=True, shard_size=2)
    assert writer.done_keys() == frozenset(keys[:4]) and writer.resumed_count == 4
    writer.add(keys[4], *labels[keys[4]][1:])
    writer._writer.flush()
    del writer
    gc.collect()
    assert any(name.endswith(".tmp") for name in os.listdir(staging)) and not out.exists()

    # An aborted writer cannot be closed into a partial result.
    writer = ll.LatentLabelWriter(out, HASH, CODE_SHAPE, CODEBOOK, {"gap": 2}, resume=True, shard_size=2)
    writer.abort()
    with pytest.raises(RuntimeError, match="aborted"):
        writer.close()
    assert not out.exists()

    # A shard renamed into place whose manifest never got written is not complete either.
    os.remove(os.path.join(staging, "labels-00001.json"))

    # Run 3 resumes and finishes.
    writer = ll.LatentLabelWriter(out, HASH, CODE_SHAPE, CODEBOOK, {"gap": 2}, resume=True, shard_size=2)
    assert writer.done_keys() == frozenset(keys[:2])
    assert sorted(os.listdir(staging)) == ["labels-00000.json", "labels-00000.tfrecord", ll.WRITER_STATE_FILE]
    for key in keys:
        if key not in writer.done_keys():
            writer.add(key, *labels[key][1:])
    writer.close()
    assert not os.path.exists(staging)
    assert ll.WRITER_STATE_FILE not in os.listdir(out)

    info, contents = label_contents(out)
    ref_info, ref_contents = reference
    assert contents == ref_contents
    for field in ("laq_config_hash", "code_shape", "codebook_size", "count", "num_frames", "meta"):
        assert info[field] == ref_info[field]
    # Joining either gives the same trajectories.
    lengths = {k: v[0] for k, v in labels.items()}
    for a, b in zip(
        ll.join_latent_labels(trajectories(lengths), out).as_numpy_iterator(),
        ll.join_latent_labels(trajectories(lengths), tmp_path / "reference").as_numpy_iterator(),
    ):
        np.testing.assert_array_equal(a["latent_action"], b["latent_action"])
        np.testing.assert_array_equal(a["has_latent"], b["has_latent"])


def test_close_is_atomic(tmp_path, monkeypatch):
    """A crash inside close() before the rename leaves no visible output; resuming completes it."""
    labels = make_labels(3)
    out = tmp_path / "labels"
    writer = ll.LatentLabelWriter(out, HASH, CODE_SHAPE, CODEBOOK, {"gap": 2})
    for key, (_, frames, codes) in labels.items():
        writer.add(key, frames, codes)
    real_replace = os.replace

    def failing_replace(src, dst):
        if os.fspath(dst) == os.fspath(out):
            raise OSError("disk died")
        return real_replace(src, dst)

    monkeypatch.setattr(ll.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk died"):
        writer.close()
    monkeypatch.setattr(ll.os, "replace", real_replace)
    assert not out.exists()
    writer = ll.LatentLabelWriter(out, HASH, CODE_SHAPE, CODEBOOK, {"gap": 2}, resume=True)
    assert writer.done_keys() == frozenset(labels)
    writer.close()
    assert label_contents(out)[1] == label_contents(write(tmp_path / "reference", labels))[1]
    with open(out / ll.INFO_FILE) as f:
        assert json.load(f)["count"] == 3


def test_join_on_metaworld_trajectories(metaworld_dataset, tmp_path):
    """Real RLDS episodes, stacked into standardised trajectories here, get their labels."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(metaworld_dataset["version_dir"]))

    def standardize(index, episode):
        steps = next(iter(episode["steps"].batch(10_000)))
        length = tf.shape(steps["action"])[0]
        empty = tf.fill([length], "")
        key = tf.strings.join(["metaworld/train/", tf.strings.as_string(index)])
        return {
            "observation": {
                "image_primary": tf.map_fn(tf.io.encode_jpeg, steps["observation"]["image"], fn_output_signature=tf.string),
                "image_secondary": empty,
                "image_wrist": empty,
                "proprio": steps["observation"]["state"],
                "timestep": tf.range(length, dtype=tf.int32),
            },
            "action": tf.pad(steps["action"], [[0, 0], [0, 3]]),
            "has_action": tf.ones([length], tf.bool),
            "task": {"language_instruction": steps["language_instruction"]},
            "dataset_name": tf.fill([length], "metaworld"),
            "traj_key": tf.fill([length], key),
        }

    dataset = builder.as_dataset(split="train", shuffle_files=False).enumerate().map(
        lambda i, e: standardize(i, e)
    )
    lengths = {t["traj_key"][0].decode(): len(t["traj_key"]) for t in dataset.as_numpy_iterator()}
    assert len(lengths) >= 2
    rng = np.random.default_rng(1)
    gap = 3
    codes = {k: rng.integers(0, CODEBOOK, (n - gap, *CODE_SHAPE)) for k, n in lengths.items()}
    with ll.LatentLabelWriter(tmp_path / "labels", HASH, CODE_SHAPE, CODEBOOK, {"gap": gap}) as writer:
        for key in sorted(lengths, reverse=True):
            writer.add(key, np.arange(lengths[key] - gap), codes[key])
    for traj in ll.join_latent_labels(dataset, tmp_path / "labels", expected_hash=HASH).as_numpy_iterator():
        key = traj["traj_key"][0].decode()
        n = lengths[key]
        assert traj["has_latent"].sum() == n - gap and not traj["has_latent"][n - gap :].any()
        np.testing.assert_array_equal(traj["latent_action"][: n - gap], codes[key])
        assert traj["has_action"].all() and traj["observation"]["proprio"].shape[0] == n


def test_parts_of_several_processes_merge_into_one_label_directory(tmp_path):
    labels = make_labels(6)
    keys = sorted(labels)
    out = tmp_path / "labels"
    for part, share in enumerate((keys[:4], keys[4:])):  # two labelling processes
        with ll.LatentLabelWriter(out / f"part-{part:05d}", HASH, CODE_SHAPE, CODEBOOK, shard_size=2) as writer:
            for key in share:
                _, frames, codes = labels[key]
                writer.add(key, frames, codes)
    assert not ll.is_complete(out)
    ll.merge_label_parts(out, [out / "part-00000", out / "part-00001"])
    info, loaded = ll.load_latent_labels(out)
    assert info["parts"] == ["part-00000", "part-00001"] and info["count"] == 6
    assert sorted(loaded.keys) == keys
    for key in keys:
        _, frames, codes = labels[key]
        order = np.argsort(frames)
        got_frames, got_codes = loaded[key]
        np.testing.assert_array_equal(got_frames, frames[order])
        np.testing.assert_array_equal(got_codes, codes[order])

    other = tmp_path / "other"
    with ll.LatentLabelWriter(other / "part-00000", HASH, CODE_SHAPE, CODEBOOK) as writer:
        writer.add("a", [0], np.zeros((1, *CODE_SHAPE), np.int64))
    with ll.LatentLabelWriter(other / "part-00001", "another-laq", CODE_SHAPE, CODEBOOK) as writer:
        writer.add("b", [0], np.zeros((1, *CODE_SHAPE), np.int64))
    with pytest.raises(ValueError, match="part-00001 has laq_config_hash='another-laq'"):
        ll.merge_label_parts(other, [other / "part-00000", other / "part-00001"])
    assert not ll.is_complete(other)
    with pytest.raises(ValueError, match="not directly inside"):
        ll.merge_label_parts(other, [out / "part-00000"])


def test_labels_of_another_laq_training_are_never_resumed_or_merged(tmp_path):
    """The same LAQ config trained again (another weights fingerprint) writes other codes: its
    interrupted run, its finished part and its parts are refused, naming both fingerprints."""
    labels = make_labels(4)
    keys = list(labels)
    out = tmp_path / "labels"
    with pytest.raises(RuntimeError, match="crash"):
        with ll.LatentLabelWriter(out, HASH, CODE_SHAPE, CODEBOOK, shard_size=1, laq_weights="weights-a") as writer:
            for key in keys[:2]:
                writer.add(key, *labels[key][1:])
            raise RuntimeError("crash")
    with pytest.raises(ll.LabelResumeError, match="'weights-a'.*'weights-b'"):
        ll.LatentLabelWriter(out, HASH, CODE_SHAPE, CODEBOOK, resume=True, laq_weights="weights-b")
    # A run without a fingerprint cannot vouch for these shards either.
    with pytest.raises(ll.LabelResumeError, match="'weights-a'.*None"):
        ll.LatentLabelWriter(out, HASH, CODE_SHAPE, CODEBOOK, resume=True)
    # The refusals changed nothing: the same weights resume both finished shards.
    writer = ll.LatentLabelWriter(out, HASH, CODE_SHAPE, CODEBOOK, resume=True, laq_weights="weights-a")
    assert writer.done_keys() == frozenset(keys[:2])
    for key in keys[2:]:
        writer.add(key, *labels[key][1:])
    writer.close()
    with open(out / ll.INFO_FILE) as f:
        assert json.load(f)["laq_weights"] == "weights-a"

    ll.check_finished_part(out, HASH, "weights-a", CODE_SHAPE, CODEBOOK)  # what labelling again would write
    for args, wrong in ((("other", "weights-a", CODE_SHAPE, CODEBOOK), "laq_config_hash"),
                        ((HASH, "weights-b", CODE_SHAPE, CODEBOOK), "laq_weights"),
                        ((HASH, "weights-a", (1, 4), CODEBOOK), "code_shape"),
                        ((HASH, "weights-a", CODE_SHAPE, 16), "codebook_size")):
        with pytest.raises(ll.LabelResumeError, match=f"{wrong}="):
            ll.check_finished_part(out, *args)

    parts = tmp_path / "parts"
    for part, weights in enumerate(("weights-a", "weights-b")):
        with ll.LatentLabelWriter(parts / f"part-{part:05d}", HASH, CODE_SHAPE, CODEBOOK, laq_weights=weights) as w:
            w.add(keys[part], *labels[keys[part]][1:])
    with pytest.raises(ValueError, match="part-00001 has laq_weights='weights-b'"):
        ll.merge_label_parts(parts, [parts / "part-00000", parts / "part-00001"])
    assert not ll.is_complete(parts)
    # A part written before weights were recorded has none: refused by name, not by a KeyError.
    info_path = parts / "part-00001" / ll.INFO_FILE
    info = json.loads(info_path.read_text())
    del info["laq_weights"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="part-00001 has laq_weights=None, part part-00000 has 'weights-a'"):
        ll.merge_label_parts(parts, [parts / "part-00000", parts / "part-00001"])
