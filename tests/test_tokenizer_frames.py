"""The image tokenizer's frames: read through the data pipeline's one RLDS reader
(``jaxvla.data.pipeline.trajectory_frames``), checked against a direct read of the TFRecords."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from jaxvla.config import apply_overrides, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tokenizer_data(**overrides):
    config = load_config(os.path.join(REPO, "configs", "tokenizer.py:small"))
    return apply_overrides(config, {f"data.{k}": v for k, v in overrides.items()}).data


def direct_frames(version_dir, split: str) -> np.ndarray:
    """Every frame of ``split`` in file order, straight from TFDS (no jaxvla reader)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(version_dir))
    frames = [
        step["observation"]["image"]
        for episode in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
        for step in episode["steps"]
    ]
    return np.stack(frames).astype(np.uint8)


def test_metaworld_frames_equal_a_direct_read_of_the_tfrecords(metaworld_dataset):
    from jaxvla.stages.tokenizer import load_frames

    data = tokenizer_data(data_dir=str(metaworld_dataset["out"]), tasks="reach,button-press", episodes_per_task=2)
    assert data.source == "metaworld"
    train, held_out = load_frames(data, 64)
    np.testing.assert_array_equal(train.frames, direct_frames(metaworld_dataset["version_dir"], "train"))
    np.testing.assert_array_equal(held_out.frames, direct_frames(metaworld_dataset["version_dir"], "val"))
    assert train.frames.dtype == np.uint8 and train.frames.shape[1:] == (64, 64, 3)

    capped, capped_eval = load_frames(tokenizer_data(data_dir=str(metaworld_dataset["out"]), max_frames=50), 64)
    np.testing.assert_array_equal(capped.frames, train.frames[:50])
    np.testing.assert_array_equal(capped_eval.frames, held_out.frames[:50])

    # rlds (a version directory) and dataset read the same frames.
    for source in ("rlds", "dataset"):
        same, same_eval = load_frames(tokenizer_data(source=source, data_dir=str(metaworld_dataset["version_dir"])), 64)
        np.testing.assert_array_equal(same.frames, train.frames)
        np.testing.assert_array_equal(same_eval.frames, held_out.frames)


def test_missing_eval_split_holds_out_a_tenth_of_train(metaworld_dataset):
    from jaxvla.stages.tokenizer import load_frames

    data = tokenizer_data(source="dataset", data_dir=str(metaworld_dataset["version_dir"]))
    train, _ = load_frames(data, 64)
    rest, held_out = load_frames(tokenizer_data(source="dataset", data_dir=str(metaworld_dataset["version_dir"]),
                                                eval_split="test"), 64)
    cut = len(train) // 10
    np.testing.assert_array_equal(held_out.frames, train.frames[:cut])
    np.testing.assert_array_equal(rest.frames, train.frames[cut:])


def test_reads_a_two_dataset_mixture(metaworld_dataset):
    from jaxvla.data import pipeline
    from jaxvla.stages.tokenizer import load_frames

    try:
        from jaxvla.data.registry import register_dataset
    except ImportError:
        register_dataset = pipeline.register_dataset
    spec = pipeline.get_dataset_spec("metaworld")
    for name in ("tokenizer_mix_a", "tokenizer_mix_b"):
        register_dataset(dataclasses.replace(spec, name=name))
    data = tokenizer_data(source="dataset", data_dir=str(metaworld_dataset["version_dir"]),
                          mixture="tokenizer_mix_a:1,tokenizer_mix_b:2")
    train, held_out = load_frames(data, 64)
    one = direct_frames(metaworld_dataset["version_dir"], "train")
    np.testing.assert_array_equal(train.frames, np.concatenate([one, one]))
    assert len(held_out) == 2 * len(direct_frames(metaworld_dataset["version_dir"], "val"))

    # Resized by the pipeline when the variant's resolution differs from the stored frames.
    small, _ = load_frames(apply_overrides(data, {"max_frames": 3}), 32)
    assert small.frames.shape == (3, 32, 32, 3) and small.frames.dtype == np.uint8


def test_trajectory_frames_yields_each_trajectory_in_file_order(metaworld_dataset):
    from jaxvla.data.pipeline import trajectory_frames

    data = {"dataset": "metaworld", "data_dir": str(metaworld_dataset["version_dir"]), "cameras": "primary"}
    items = list(trajectory_frames(data, "train", image_size=64))
    assert [key for key, _ in items] == [f"metaworld/train/{i}" for i in range(len(items))]
    np.testing.assert_array_equal(np.concatenate([f for _, f in items]),
                                  direct_frames(metaworld_dataset["version_dir"], "train"))
    with pytest.raises(KeyError, match="no camera 'thermal'"):
        next(trajectory_frames(data, "train", image_size=64, camera="thermal"))


def test_unknown_source_is_named():
    from jaxvla.stages.tokenizer import load_frames

    with pytest.raises(ValueError, match="config.data.source='video'"):
        load_frames(tokenizer_data(source="video"), 64)
