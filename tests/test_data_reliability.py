"""Damaged or misconfigured datasets fail fast with errors that name what is wrong, and records
skipped under ``ignore_errors`` reach the trainer's metrics. Every test takes seconds; the one
whose old failure mode was a hang runs the pipeline in a subprocess with a timeout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxvla.data.pipeline import make_batches
from jaxvla.data.registry import DatasetSpec
from tests.test_data_pipeline import data_config, standardize_synth, synth_episode, write_synth

REPO = Path(__file__).resolve().parents[1]


def copy_metaworld(metaworld_dataset, root) -> Path:
    """A private copy of the fixture's version dir at ``root/metaworld/1.0.0`` (safe to damage)."""
    version_dir = Path(root) / "metaworld" / "1.0.0"
    shutil.copytree(metaworld_dataset["version_dir"], version_dir)
    return version_dir


def make(data_dir, **overrides):
    # A plain dict: a ConfigDict would refuse ill-typed values (e.g. image_size=64.5) itself.
    cfg = {**data_config(data_dir=str(data_dir)).to_dict(), **overrides}
    return make_batches(cfg, batch_size=2, process_index=0, process_count=1)


# --------------------------------------------------------------------------- missing files

_PROBE = textwrap.dedent(
    """
    import json, os, sys
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    from jaxvla.data.pipeline import default_data_config, make_batches
    from jaxvla.data.registry import DatasetSpec
    from tests.test_data_pipeline import standardize_synth

    out = []
    for data_dir, builder_dir in json.loads(sys.argv[1]):
        cfg = default_data_config()
        cfg.data_dir, cfg.shuffle_buffer = data_dir, 8
        mixture = None
        if builder_dir:
            mixture = [(DatasetSpec("synth", builder_dir=builder_dir, standardize_fn=standardize_synth,
                                    control_hz=10.0), 1.0)]
            cfg.image_size = 16
        try:
            next(iter(make_batches(cfg, batch_size=2, process_index=0, process_count=1, mixture=mixture)))
            out.append({"type": None, "message": "no error"})
        except Exception as e:
            out.append({"type": type(e).__name__, "bases": [c.__name__ for c in type(e).__mro__],
                        "message": str(e)})
    print("RESULT " + json.dumps(out))
    """
)


def test_missing_shard_fails_fast_naming_dataset_split_and_file(metaworld_dataset, tmp_path):
    # The fixture's only train shard, deleted.
    mw_dir = copy_metaworld(metaworld_dataset, tmp_path / "mw")
    (mw_dir / "metaworld-train.tfrecord-00000-of-00001").unlink()
    # One of a split's two shards, deleted.
    rng = np.random.default_rng(0)
    synth = write_synth(tmp_path / "synth", "synth", {"train": [synth_episode(rng, 4, episode_id=i) for i in range(4)]},
                        num_shards=2)
    os.remove(os.path.join(synth, "synth-train.tfrecord-00001-of-00002"))

    cases = [[str(tmp_path / "mw"), ""], ["", synth]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(cases)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("make_batches on a dataset with a missing shard did not return within 60 s (it hangs)")
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-2000:] + done.stderr[-4000:]
    (mw, partial) = json.loads(lines[-1][len("RESULT "):])

    assert mw["type"] == "DatasetFilesError" and "FileNotFoundError" in mw["bases"], mw
    assert "dataset 'metaworld' split 'train'" in mw["message"]
    assert "1 of the 1 shard file(s)" in mw["message"]
    assert "['metaworld-train.tfrecord-00000-of-00001']" in mw["message"]
    assert str(mw_dir / "dataset_info.json") in mw["message"]

    assert partial["type"] == "DatasetFilesError", partial
    assert "dataset 'synth' split 'train': 1 of the 2 shard file(s)" in partial["message"]
    assert "missing in " + synth + ": ['synth-train.tfrecord-00001-of-00002']" in partial["message"]
    assert "present: ['synth-train.tfrecord-00000-of-00002']" in partial["message"]


def test_missing_features_json_is_named(metaworld_dataset, tmp_path):
    version_dir = copy_metaworld(metaworld_dataset, tmp_path)
    (version_dir / "features.json").unlink()
    with pytest.raises(FileNotFoundError) as info:
        make(tmp_path)
    assert type(info.value).__name__ == "DatasetFilesError"
    text = str(info.value)
    assert text.startswith(f"dataset 'metaworld': {version_dir} has no features.json")
    assert "old TFDS version" not in text
    assert "found ['dataset_info.json', 'metadata.json', 'metaworld-train.tfrecord-00000-of-00001'" in text


# --------------------------------------------------------------------------- data_dir and image size


@pytest.mark.parametrize("case", ["empty", "missing", "file", "not_a_dataset", "one_level_too_high"])
def test_bad_data_dir_names_key_and_expectation(case, metaworld_dataset, tmp_path):
    expected = "expected the directory holding the TFDS datasets"
    if case == "empty":
        data_dir, error = "", ValueError
        message = r"^dataset 'metaworld': config.data.data_dir is empty; set it to the directory holding the TFDS"
    elif case == "missing":
        data_dir, error = str(tmp_path / "nowhere"), FileNotFoundError
        message = rf"^dataset 'metaworld': config.data.data_dir={data_dir} does not exist; {expected}"
    elif case == "file":
        data_dir, error = str(tmp_path / "notes.txt"), NotADirectoryError
        Path(data_dir).write_text("not a dataset")
        message = rf"^dataset 'metaworld': config.data.data_dir={data_dir} is a file; {expected}"
    elif case == "not_a_dataset":
        data_dir, error = str(tmp_path / "random"), FileNotFoundError
        (tmp_path / "random" / "metaworld").mkdir(parents=True)
        (tmp_path / "random" / "readme.txt").write_text("x")
        message = (rf"^dataset 'metaworld': no TFDS dataset \(dataset_info.json\) at \['{data_dir}', "
                   rf"'{data_dir}/metaworld/1.0.0', '{data_dir}/metaworld'\] \(config.data.data_dir={data_dir}; "
                   rf"{expected}.*\)$")
    else:  # the dataset sits one level below data_dir/<name>/<version>
        data_dir, error = str(tmp_path / "runs"), FileNotFoundError
        version_dir = copy_metaworld(metaworld_dataset, tmp_path / "runs" / "mt10")
        message = rf"no TFDS dataset .*{expected}.*; dataset version directories found below it: \['{version_dir}'\]$"
    with pytest.raises(error, match=message):
        make(data_dir)


@pytest.mark.parametrize("size", [0, -8, 64.5, "64px"])
def test_bad_image_size_names_key_and_dataset_frames(size, metaworld_dataset):
    with pytest.raises(ValueError) as info:
        next(iter(make(metaworld_dataset["out"], image_size=size)))
    assert str(info.value) == (
        f"config.data.image_size={size!r}: expected a positive integer S (every camera's frames are decoded and "
        "resized to S x S pixels, e.g. the datasets' own frame size); the datasets' image features: "
        "{'metaworld': {'steps/observation/image': (64, 64, 3)}}"
    )


# --------------------------------------------------------------------------- skipped records in the trainer

BAD_RECORDS = (b"\x01 not a tf.Example", b"\x02 nor this", b"\x03 nor this one")


def test_skipped_records_reach_trainer_metrics(tmp_path):
    from jaxvla.stages import DataStream, Stage
    from jaxvla.trainer import train
    from tests.toy import ToyMLP, toy_config

    rng = np.random.default_rng(0)
    episodes = [synth_episode(rng, 4, episode_id=i) for i in range(4)]
    # Two shards: [ep0, bad, ep1, bad] and [ep2, ep3, bad]; parse errors, so each bad record is
    # skipped alone (the episodes behind it are still read).
    records = [episodes[0], BAD_RECORDS[0], episodes[1], BAD_RECORDS[1], episodes[2], episodes[3], BAD_RECORDS[2]]
    path = write_synth(tmp_path / "data", "junky", {"train": records}, num_shards=2)
    spec = DatasetSpec("junky", builder_dir=path, standardize_fn=standardize_synth, control_hz=10.0)
    # 16 frames per pass and a 64-sample shuffle buffer: every file is read to its end before the
    # first batch, so every log sees all bad records, counted once however many passes ran.
    cfg = data_config(sample="frames", image_size=16, ignore_errors=True, shuffle_buffer=64)
    model = ToyMLP(hidden=8, out_dim=3)

    def batches(start):
        source = make_batches(cfg, batch_size=4, seed=0, start_step=start, process_index=0, process_count=1,
                              mixture=[(spec, 1.0)])
        return DataStream(source, lambda b: {"x": b["action"], "y": b["observation"]["proprio"]})

    def loss_fn(params, batch, rng):
        loss = ((model.apply({"params": params}, batch["x"]) - batch["y"]) ** 2).mean()
        return loss, {}

    stage = Stage(init_variables=lambda rng: model.init(rng, np.zeros((1, 2), np.float32)), loss_fn=loss_fn,
                  batches=batches)
    result = train(toy_config(num_steps=3, log_every=1), str(tmp_path / "run"), stage=stage,
                   devices=jax.devices()[:1])

    assert [step for step, _ in result.history] == [1, 2, 3]
    for _, metrics in result.history:
        assert metrics["data/skipped/junky"] == len(BAD_RECORDS)
    assert result.metrics["data/skipped/junky"] == len(BAD_RECORDS)

    # Without ignore_errors the stream has no such metric (the bad records raise instead).
    clean = DataStream(make_batches(data_config(sample="frames", image_size=16), batch_size=4, process_index=0,
                                    process_count=1, mixture=[(spec, 1.0)]))
    assert clean.data_metrics() == {}
