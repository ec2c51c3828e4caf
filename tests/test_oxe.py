"""Open-X raw layouts, the registry and mixtures: tiny real TFDS RLDS datasets with each dataset's
feature names, dtypes and nesting (small images), read back the way real ones are and standardised
by the layout of their registry entry."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest

import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath  # noqa: E402

from jaxvla.data import dataset, mixtures, oxe, registry, video  # noqa: E402
from jaxvla.data.registry import DatasetSpec, dataset_gap  # noqa: E402
from jaxvla.data.schema import IMAGE_CAMERAS, check_standardized  # noqa: E402

F = tfds.features


def layout(name):
    """The raw layout of the registry entry ``name`` (aliases allowed)."""
    return registry.get_dataset_spec(name).layout


# Every registry entry backed by a raw layout: the Open-X datasets and Meta-World.
LAYOUTS = {
    spec.name: spec.layout
    for spec in map(registry.get_dataset_spec, registry.dataset_names())
    if spec.layout is not None
}


# --------------------------------------------------------------------------- writing / reading


def write_rlds(data_dir, name, step_features, episodes, metadata_features=None):
    """Write ``episodes`` (list of {"steps": [...], "episode_metadata": {...}}) as the TFDS
    dataset ``name`` 0.1.0 under ``data_dir``; returns its version directory."""
    features = {"steps": F.Dataset(step_features)}
    if metadata_features is not None:
        features["episode_metadata"] = F.FeaturesDict(metadata_features)
    dataset_name = name

    class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name
        VERSION = tfds.core.Version("0.1.0")
        RELEASE_NOTES = {"0.1.0": "synthetic test data"}

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):  # TFDS 4.9.10 needs importlib_resources for the default
            return epath.Path(__file__)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=F.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, episode in enumerate(episodes):
                yield i, episode

    builder = Builder(data_dir=str(data_dir))
    builder.download_and_prepare()
    return str(builder.data_dir)


def _skip_image_decoding(features):
    """Decoders reading every Image feature as its encoded bytes (as the pipeline does)."""
    out = {}
    for key, feature in features.items():
        if isinstance(feature, F.Image):
            out[key] = tfds.decode.SkipDecoding()
        elif isinstance(feature, F.Dataset):
            inner = _skip_image_decoding(feature.feature)
            if inner:
                out[key] = inner
        elif isinstance(feature, F.FeaturesDict):
            inner = _skip_image_decoding(feature)
            if inner:
                out[key] = inner
    return out


def read_trajectories(version_dir, dataset_name, split="train"):
    """Episodes -> stacked trajectories: the step dict with leading T, plus episode_metadata and
    traj_key (what the core reader hands to ``standardize``)."""
    builder = tfds.builder_from_directory(version_dir)
    ds = builder.as_dataset(split=split, decoders=_skip_image_decoding(builder.info.features), shuffle_files=False)

    def stack(index, episode):
        traj = episode["steps"].batch(1 << 20).get_single_element()
        if "episode_metadata" in episode:
            traj["episode_metadata"] = episode["episode_metadata"]
        length = tf.shape(traj["is_first"])[0]
        key = tf.strings.join([dataset_name, split, tf.strings.as_string(index)], separator="/")
        traj["traj_key"] = tf.fill([length], key)
        return traj

    return ds.enumerate().map(stack)


def standardized(version_dir, name):
    spec = layout(name)
    ds = read_trajectories(version_dir, spec.name).map(spec.standardize)
    return ds, list(ds.as_numpy_iterator())


def image(rng, h, w):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def rl_fields(t, n):
    return {
        "is_first": t == 0,
        "is_last": t == n - 1,
        "is_terminal": t == n - 1,
        "reward": np.float32(t == n - 1),
        "discount": np.float32(1.0),
    }


RL_FEATURES = {
    "is_first": F.Scalar(np.bool_),
    "is_last": F.Scalar(np.bool_),
    "is_terminal": F.Scalar(np.bool_),
    "reward": F.Scalar(np.float32),
    "discount": F.Scalar(np.float32),
}


def check_schema(ds, trajs, spec, lengths):
    """The standard schema: keys, dtypes, shapes."""
    check_standardized(ds.element_spec, spec.name)
    es = ds.element_spec
    for camera in IMAGE_CAMERAS:
        assert es["observation"][f"image_{camera}"].dtype == tf.string
    assert es["observation"]["proprio"].dtype == tf.float32
    assert es["observation"]["proprio"].shape.as_list() == [None, spec.proprio_dim]
    assert es["observation"]["timestep"].dtype == tf.int32
    assert es["action"].dtype == tf.float32 and es["action"].shape.as_list() == [None, spec.action_dim]
    assert es["has_action"].dtype == tf.bool
    assert es["task"]["language_instruction"].dtype == tf.string
    assert es["dataset_name"].dtype == tf.string and es["traj_key"].dtype == tf.string
    assert sorted(es) == ["action", "dataset_name", "has_action", "observation", "task", "traj_key"]
    assert [len(t["action"]) for t in trajs] == lengths
    for i, t in enumerate(trajs):
        n = lengths[i]
        for camera in IMAGE_CAMERAS:
            assert t["observation"][f"image_{camera}"].shape == (n,)
        assert t["observation"]["proprio"].shape == (n, spec.proprio_dim)
        np.testing.assert_array_equal(t["observation"]["timestep"], np.arange(n))
        assert t["has_action"].shape == (n,)
        assert list(t["dataset_name"]) == [spec.name.encode()] * n
        assert list(t["traj_key"]) == [f"{spec.name}/train/{i}".encode()] * n


def decoded(jpeg_bytes):
    return tf.io.decode_image(jpeg_bytes).numpy()


# --------------------------------------------------------------------------- fractal (RT-1)

FRACTAL_GRIPPER = [[0.0, 1.0, 0.3, -1.0], [0.0, -1.0, 0.0]]
FRACTAL_EXPECTED = [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0]]


def _rt1_action_features():
    return {
        "world_vector": F.Tensor(shape=(3,), dtype=np.float32),
        "rotation_delta": F.Tensor(shape=(3,), dtype=np.float32),
        "gripper_closedness_action": F.Tensor(shape=(1,), dtype=np.float32),
        "base_displacement_vector": F.Tensor(shape=(2,), dtype=np.float32),
        "base_displacement_vertical_rotation": F.Tensor(shape=(1,), dtype=np.float32),
        "terminate_episode": F.Tensor(shape=(3,), dtype=np.int32),
    }


def _rt1_action(t, gripper):
    return {
        "world_vector": np.float32([t, 10 + t, 20 + t]),
        "rotation_delta": np.float32([100 + t, 110 + t, 120 + t]),
        "gripper_closedness_action": np.float32([gripper]),
        "base_displacement_vector": np.zeros(2, np.float32),
        "base_displacement_vertical_rotation": np.zeros(1, np.float32),
        "terminate_episode": np.int32([0, 1, 0]),
    }


@pytest.fixture(scope="module")
def fractal(tmp_path_factory):
    rng = np.random.default_rng(0)
    features = {
        "observation": {
            "image": F.Image(shape=(24, 32, 3), encoding_format="jpeg"),
            "natural_language_instruction": F.Text(),
            "natural_language_embedding": F.Tensor(shape=(512,), dtype=np.float32),
            "base_pose_tool_reached": F.Tensor(shape=(7,), dtype=np.float32),
            "gripper_closed": F.Tensor(shape=(1,), dtype=np.float32),
            "gripper_closedness_commanded": F.Tensor(shape=(1,), dtype=np.float32),
            "height_to_bottom": F.Tensor(shape=(1,), dtype=np.float32),
            "workspace_bounds": F.Tensor(shape=(3, 3), dtype=np.float32),
        },
        "action": _rt1_action_features(),
        **RL_FEATURES,
    }
    episodes = []
    for e, grip in enumerate(FRACTAL_GRIPPER):
        n = len(grip)
        steps = [
            {
                "observation": {
                    "image": image(rng, 24, 32),
                    "natural_language_instruction": f"pick coke can {e}",
                    "natural_language_embedding": np.zeros(512, np.float32),
                    "base_pose_tool_reached": np.float32([t, 1, 2, 3, 4, 5, 6]) + e,
                    "gripper_closed": np.float32([0.5]),
                    "gripper_closedness_commanded": np.float32([0.0]),
                    "height_to_bottom": np.float32([0.1]),
                    "workspace_bounds": np.zeros((3, 3), np.float32),
                },
                "action": _rt1_action(t, grip[t]),
                **rl_fields(t, n),
            }
            for t in range(n)
        ]
        episodes.append({"steps": steps})
    return write_rlds(tmp_path_factory.mktemp("fractal"), "fractal20220817_data", features, episodes)


def test_fractal(fractal):
    spec = layout("fractal")
    assert spec.name == "fractal20220817_data"
    ds, trajs = standardized(fractal, "fractal20220817_data")
    check_schema(ds, trajs, spec, [4, 3])
    for e, t in enumerate(trajs):
        n = len(t["action"])
        steps = np.arange(n, dtype=np.float32)
        # Concatenation order: world_vector, rotation_delta, gripper.
        np.testing.assert_array_equal(t["action"][:, :3], np.stack([steps, 10 + steps, 20 + steps], 1))
        np.testing.assert_array_equal(t["action"][:, 3:6], np.stack([100 + steps, 110 + steps, 120 + steps], 1))
        # Relative (+1 close, -1 open) -> absolute (1 open, 0 closed).
        np.testing.assert_array_equal(t["action"][:, 6], FRACTAL_EXPECTED[e])
        assert t["has_action"].all()
        np.testing.assert_array_equal(t["observation"]["proprio"][:, 0], steps + e)
        np.testing.assert_array_equal(t["observation"]["proprio"][:, 7], 0.5)
        assert list(t["task"]["language_instruction"]) == [f"pick coke can {e}".encode()] * n
        assert decoded(t["observation"]["image_primary"][0]).shape == (24, 32, 3)
        assert set(t["observation"]["image_secondary"]) == {b""} and set(t["observation"]["image_wrist"]) == {b""}


def test_missing_feature_names_dataset_key_and_existing_keys(fractal):
    spec = layout("fractal20220817_data")
    traj = next(iter(read_trajectories(fractal, spec.name)))
    del traj["action"]["rotation_delta"]
    with pytest.raises(KeyError) as info:
        spec.standardize(traj)
    message = str(info.value)
    assert "fractal20220817_data" in message and "'action/rotation_delta'" in message
    assert "action/world_vector" in message and "observation/base_pose_tool_reached" in message

    # Inside tf.data the error comes when the map is traced.
    def drop(traj):
        obs = dict(traj["observation"])
        del obs["natural_language_instruction"]
        return {**traj, "observation": obs}

    with pytest.raises(KeyError, match="'fractal20220817_data'.*observation/natural_language_instruction"):
        read_trajectories(fractal, spec.name).map(drop).map(spec.standardize)
    # A spec applied to another dataset's trajectories fails the same way.
    with pytest.raises(KeyError, match=r"'taco_play'.*'action/rel_actions_world'"):
        layout("taco_play").standardize(next(iter(read_trajectories(fractal, spec.name))))


# --------------------------------------------------------------------------- kuka


@pytest.fixture(scope="module")
def kuka(tmp_path_factory):
    rng = np.random.default_rng(1)
    features = {
        "observation": {
            "image": F.Image(shape=(32, 40, 3), encoding_format="jpeg"),
            "natural_language_instruction": F.Text(),
            "natural_language_embedding": F.Tensor(shape=(512,), dtype=np.float32),
            "clip_function_input/base_pose_tool_reached": F.Tensor(shape=(7,), dtype=np.float32),
            "clip_function_input/workspace_bounds": F.Tensor(shape=(3, 3), dtype=np.float32),
            "gripper_closed": F.Tensor(shape=(1,), dtype=np.float32),
            "height_to_bottom": F.Tensor(shape=(1,), dtype=np.float32),
            "task_id": F.Tensor(shape=(1,), dtype=np.float32),
        },
        "action": _rt1_action_features(),
        **RL_FEATURES,
    }
    episodes = []
    for e, grip in enumerate([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0, -1.0]]):
        n = len(grip)
        steps = [
            {
                "observation": {
                    "image": image(rng, 32, 40),
                    "natural_language_instruction": "pick anything",
                    "natural_language_embedding": np.zeros(512, np.float32),
                    "clip_function_input/base_pose_tool_reached": np.float32([t, e, 0, 0, 0, 0, 1]),
                    "clip_function_input/workspace_bounds": np.zeros((3, 3), np.float32),
                    "gripper_closed": np.float32([t % 2]),
                    "height_to_bottom": np.float32([0.2]),
                    "task_id": np.float32([0]),
                },
                "action": _rt1_action(t, grip[t]),
                **rl_fields(t, n),
            }
            for t in range(n)
        ]
        episodes.append({"steps": steps})
    return write_rlds(tmp_path_factory.mktemp("kuka"), "kuka", features, episodes)


def test_kuka(kuka):
    spec = layout("kuka")
    ds, trajs = standardized(kuka, "kuka")
    check_schema(ds, trajs, spec, [3, 5])
    np.testing.assert_array_equal(trajs[0]["action"][:, 6], [1, 1, 0])
    np.testing.assert_array_equal(trajs[1]["action"][:, 6], [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(trajs[1]["observation"]["proprio"][:, 0], np.arange(5))
    np.testing.assert_array_equal(trajs[1]["observation"]["proprio"][:, 1], 1.0)
    np.testing.assert_array_equal(trajs[1]["observation"]["proprio"][:, 7], [0, 1, 0, 1, 0])
    assert set(trajs[0]["task"]["language_instruction"]) == {b"pick anything"}

    # Some copies store the proprio fields as ZLIB-compressed float32 bytes: same result.
    raw = next(iter(read_trajectories(kuka, "kuka").skip(1)))
    obs = dict(raw["observation"])
    for key in ("clip_function_input/base_pose_tool_reached", "gripper_closed"):
        values = obs[key].numpy()
        obs[key] = tf.constant([zlib.compress(v.astype(np.float32).tobytes()) for v in values])
    out = spec.standardize({**raw, "observation": obs})
    np.testing.assert_array_equal(out["observation"]["proprio"].numpy(), trajs[1]["observation"]["proprio"])


# --------------------------------------------------------------------------- bridge

BRIDGE_GRIPPER = [[1.0, 0.6, 0.02, 0.5, 0.99], [0.0, 0.3, 0.7]]
BRIDGE_EXPECTED = [[1, 0, 0, 1, 1], [0, 0, 1]]  # 0.3, 0.7 trail undecided: threshold 0.5


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    rng = np.random.default_rng(2)
    cams = {f"image_{i}": F.Image(shape=(16, 16, 3), encoding_format="jpeg") for i in range(4)}
    features = {
        "observation": {**cams, "state": F.Tensor(shape=(7,), dtype=np.float32)},
        "action": F.Tensor(shape=(7,), dtype=np.float32),
        "language_instruction": F.Text(),
        "language_embedding": F.Tensor(shape=(512,), dtype=np.float32),
        **RL_FEATURES,
    }
    metadata_features = {
        "file_path": F.Text(),
        "episode_id": F.Scalar(np.int32),
        "has_language": F.Scalar(np.bool_),
        **{f"has_image_{i}": F.Scalar(np.bool_) for i in range(4)},
    }
    has = [(True, True, False, False), (True, False, False, True)]  # (image_0, 1, 2, 3)
    episodes = []
    for e, grip in enumerate(BRIDGE_GRIPPER):
        n = len(grip)
        steps = []
        for t in range(n):
            observation = {
                f"image_{i}": image(rng, 16, 16) if has[e][i] else np.zeros((16, 16, 3), np.uint8) for i in range(4)
            }
            observation["state"] = np.float32([t, e, 2, 3, 4, 5, grip[t]])
            steps.append(
                {
                    "observation": observation,
                    "action": np.float32([0.1 * t, 0.2, 0.3, 0.4, 0.5, 0.6, grip[t]]),
                    "language_instruction": "put the spoon in the pot" if e == 0 else "",
                    "language_embedding": np.zeros(512, np.float32),
                    **rl_fields(t, n),
                }
            )
        meta = {"file_path": f"/raw/{e}", "episode_id": e, "has_language": e == 0}
        meta.update({f"has_image_{i}": has[e][i] for i in range(4)})
        episodes.append({"steps": steps, "episode_metadata": meta})
    return write_rlds(tmp_path_factory.mktemp("bridge"), "bridge_dataset", features, episodes, metadata_features)


def test_bridge(bridge):
    spec = layout("bridge")
    assert spec.name == "bridge_dataset" and dataset_gap(spec.name) == 3  # LAPA's H=3 on Bridge
    ds, trajs = standardized(bridge, "bridge_dataset")
    check_schema(ds, trajs, spec, [5, 3])
    for e, t in enumerate(trajs):
        n = len(t["action"])
        np.testing.assert_allclose(t["action"][:, 0], 0.1 * np.arange(n), rtol=1e-6)
        np.testing.assert_allclose(t["action"][:, 1:6], np.tile([0.2, 0.3, 0.4, 0.5, 0.6], (n, 1)), rtol=1e-6)
        np.testing.assert_array_equal(t["action"][:, 6], BRIDGE_EXPECTED[e])
        np.testing.assert_allclose(t["observation"]["proprio"][:, 6], BRIDGE_GRIPPER[e], rtol=1e-6)
        assert (t["observation"]["image_primary"] != b"").all()
    # Per-episode camera availability: episode 0 has image_1 but no wrist (image_3), episode 1
    # has the wrist but no image_1.
    assert (trajs[0]["observation"]["image_secondary"] != b"").all()
    assert set(trajs[0]["observation"]["image_wrist"]) == {b""}
    assert set(trajs[1]["observation"]["image_secondary"]) == {b""}
    assert decoded(trajs[1]["observation"]["image_wrist"][0]).shape == (16, 16, 3)
    assert set(trajs[0]["task"]["language_instruction"]) == {b"put the spoon in the pot"}
    assert set(trajs[1]["task"]["language_instruction"]) == {b""}

    # Without episode_metadata (a reader that drops it) every listed camera is kept.
    plain = next(iter(read_trajectories(bridge, "bridge_dataset")))
    del plain["episode_metadata"]
    out = spec.standardize(plain)
    assert (out["observation"]["image_wrist"].numpy() != b"").all()
    # bridge_orig (OpenVLA's name) reads the same features.
    orig = layout("bridge_orig").standardize(next(iter(read_trajectories(bridge, "bridge_dataset"))))
    np.testing.assert_array_equal(orig["action"].numpy(), trajs[0]["action"])


# --------------------------------------------------------------------------- language_table

LT_INSTRUCTIONS = ["push the red star to the left", "slide the blue cube ↑ next to the café"]


def _codepoints(text, width=512):
    codes = np.zeros(width, np.int32)
    values = [ord(c) for c in text]
    codes[: len(values)] = values
    return codes


@pytest.fixture(scope="module")
def language_table(tmp_path_factory):
    rng = np.random.default_rng(3)
    features = {
        "observation": {
            "rgb": F.Image(shape=(18, 32, 3), encoding_format="jpeg"),
            "effector_translation": F.Tensor(shape=(2,), dtype=np.float32),
            "effector_target_translation": F.Tensor(shape=(2,), dtype=np.float32),
            "instruction": F.Tensor(shape=(512,), dtype=np.int32),
        },
        "action": F.Tensor(shape=(2,), dtype=np.float32),
        "is_first": F.Scalar(np.bool_),
        "is_last": F.Scalar(np.bool_),
        "is_terminal": F.Scalar(np.bool_),
        "reward": F.Scalar(np.float32),
    }
    episodes = []
    for e, (text, n) in enumerate(zip(LT_INSTRUCTIONS, (4, 3))):
        steps = [
            {
                "observation": {
                    "rgb": image(rng, 18, 32),
                    "effector_translation": np.float32([0.3 + t, -0.1 * e]),
                    "effector_target_translation": np.float32([0.3, 0.0]),
                    "instruction": _codepoints(text),
                },
                "action": np.float32([0.01 * (t + 1), -0.02 * (t + 1)]),
                "is_first": t == 0,
                "is_last": t == n - 1,
                "is_terminal": False,
                "reward": np.float32(0),
            }
            for t in range(n)
        ]
        episodes.append({"steps": steps})
    return write_rlds(tmp_path_factory.mktemp("language_table"), "language_table", features, episodes)


def test_language_table(language_table):
    spec = layout("language_table")
    ds, trajs = standardized(language_table, "language_table")
    check_schema(ds, trajs, spec, [4, 3])
    for e, t in enumerate(trajs):
        n = len(t["action"])
        k = np.arange(1, n + 1, dtype=np.float32)
        # [dx, dy] -> [dx, dy, 0, 0, 0, 0, 1 (open)].
        np.testing.assert_allclose(t["action"][:, 0], 0.01 * k, rtol=1e-6)
        np.testing.assert_allclose(t["action"][:, 1], -0.02 * k, rtol=1e-6)
        np.testing.assert_array_equal(t["action"][:, 2:6], 0.0)
        np.testing.assert_array_equal(t["action"][:, 6], 1.0)
        # Codepoints decoded to UTF-8, padding dropped.
        assert [s.decode("utf-8") for s in t["task"]["language_instruction"]] == [LT_INSTRUCTIONS[e]] * n
        np.testing.assert_allclose(t["observation"]["proprio"][:, 0], 0.3 + np.arange(n), rtol=1e-6)
    assert spec.normalize_mask == (True, True, False, False, False, False, False)


# --------------------------------------------------------------------------- taco_play


@pytest.fixture(scope="module")
def taco_play(tmp_path_factory):
    rng = np.random.default_rng(4)
    features = {
        "observation": {
            "rgb_static": F.Image(shape=(15, 20, 3), encoding_format="jpeg"),
            "rgb_gripper": F.Image(shape=(8, 8, 3), encoding_format="jpeg"),
            "depth_static": F.Tensor(shape=(15, 20), dtype=np.float32),
            "depth_gripper": F.Tensor(shape=(8, 8), dtype=np.float32),
            "robot_obs": F.Tensor(shape=(15,), dtype=np.float32),
            "natural_language_instruction": F.Text(),
            "natural_language_embedding": F.Tensor(shape=(512,), dtype=np.float32),
            "structured_language_instruction": F.Text(),
        },
        "action": {
            "actions": F.Tensor(shape=(7,), dtype=np.float32),
            "rel_actions_world": F.Tensor(shape=(7,), dtype=np.float32),
            "rel_actions_gripper": F.Tensor(shape=(7,), dtype=np.float32),
            "terminate_episode": F.Scalar(np.float32),
        },
        **RL_FEATURES,
    }
    episodes = []
    for e, grip in enumerate([[1.0, -1.0, -1.0], [-1.0, 1.0, 1.0, 1.0]]):
        n = len(grip)
        steps = [
            {
                "observation": {
                    "rgb_static": image(rng, 15, 20),
                    "rgb_gripper": image(rng, 8, 8),
                    "depth_static": np.zeros((15, 20), np.float32),
                    "depth_gripper": np.zeros((8, 8), np.float32),
                    "robot_obs": np.arange(15, dtype=np.float32) + 100 * t,
                    "natural_language_instruction": "open the drawer",
                    "natural_language_embedding": np.zeros(512, np.float32),
                    "structured_language_instruction": "open_drawer",
                },
                "action": {
                    "actions": np.full(7, 9.0, np.float32),
                    "rel_actions_world": np.float32([1, 2, 3, 4, 5, 6, grip[t]]),
                    "rel_actions_gripper": np.full(7, -9.0, np.float32),
                    "terminate_episode": np.float32(0),
                },
                **rl_fields(t, n),
            }
            for t in range(n)
        ]
        episodes.append({"steps": steps})
    return write_rlds(tmp_path_factory.mktemp("taco"), "taco_play", features, episodes)


def test_taco_play(taco_play):
    spec = layout("taco_play")
    ds, trajs = standardized(taco_play, "taco_play")
    check_schema(ds, trajs, spec, [3, 4])
    np.testing.assert_array_equal(trajs[0]["action"][:, :6], np.tile([1, 2, 3, 4, 5, 6], (3, 1)))
    # Gripper +1 open / -1 close -> 1 / 0.
    np.testing.assert_array_equal(trajs[0]["action"][:, 6], [1, 0, 0])
    np.testing.assert_array_equal(trajs[1]["action"][:, 6], [0, 1, 1, 1])
    # Proprio: tcp xyz + euler (0:6) and gripper width (6).
    np.testing.assert_array_equal(trajs[1]["observation"]["proprio"], np.arange(7) + 100 * np.arange(4)[:, None])
    for t in trajs:
        assert decoded(t["observation"]["image_primary"][0]).shape == (15, 20, 3)
        assert decoded(t["observation"]["image_wrist"][0]).shape == (8, 8, 3)
        assert set(t["observation"]["image_secondary"]) == {b""}
        assert set(t["task"]["language_instruction"]) == {b"open the drawer"}


# --------------------------------------------------------------------------- Meta-World layout


@pytest.fixture(scope="module")
def metaworld_like(tmp_path_factory):
    """The layout jaxvla.data.metaworld_rlds writes (without running the simulator)."""
    rng = np.random.default_rng(5)
    features = {
        "observation": {
            "image": F.Image(shape=(16, 16, 3), encoding_format="jpeg"),
            "state": F.Tensor(shape=(39,), dtype=np.float32),
        },
        "action": F.Tensor(shape=(4,), dtype=np.float32),
        "language_instruction": F.Text(),
        **RL_FEATURES,
    }
    metadata_features = {
        "task": F.Text(),
        "success": F.Scalar(np.bool_),
        "seed": F.Scalar(np.int64),
        "episode_id": F.Scalar(np.int64),
    }
    steps = [
        {
            "observation": {"image": image(rng, 16, 16), "state": np.full(39, t, np.float32)},
            "action": np.float32([0.1, -0.2, 0.3, 1.0]) if t < 3 else np.zeros(4, np.float32),
            "language_instruction": "reach the goal",
            **rl_fields(t, 4),
        }
        for t in range(4)
    ]
    episodes = [{"steps": steps, "episode_metadata": {"task": "reach", "success": True, "seed": 0, "episode_id": 0}}]
    return write_rlds(tmp_path_factory.mktemp("metaworld"), "metaworld", features, episodes, metadata_features)


def test_metaworld_layout(metaworld_like):
    spec = layout("metaworld_mt10")
    assert spec.tfds_name == "metaworld" and spec.control_hz == 80.0 and dataset_gap("metaworld_mt10") == 48
    assert spec is oxe.METAWORLD_LAYOUT and registry.get_dataset_spec("metaworld_mt10").name == "metaworld"
    ds, trajs = standardized(metaworld_like, "metaworld_mt10")
    check_schema(ds, trajs, spec, [4])
    t = trajs[0]
    np.testing.assert_array_equal(t["has_action"], [True, True, True, False])  # last step: final frame only
    np.testing.assert_allclose(t["action"][:3], np.tile([0.1, -0.2, 0.3, 1.0], (3, 1)), rtol=1e-6)
    np.testing.assert_array_equal(t["action"][3], 0.0)
    assert t["observation"]["proprio"].shape == (4, 39)


def test_metaworld_control_frequency_matches_installed_package():
    import metaworld.env_dict as metaworld_envs
    env = metaworld_envs.ALL_V3_ENVIRONMENTS["reach-v3"]()
    try:
        assert math.isclose(1.0 / env.dt, layout("metaworld").control_hz)
    finally:
        env.close()


# --------------------------------------------------------------------------- every spec


# Widths of the numeric raw features each dataset's spec reads (0: a scalar per step).
RAW_WIDTHS = {
    "fractal20220817_data": {"observation/base_pose_tool_reached": 7, "observation/gripper_closed": 1},
    "kuka": {"observation/clip_function_input/base_pose_tool_reached": 7, "observation/gripper_closed": 1},
    "bridge_dataset": {"observation/state": 7, "action": 7},
    "bridge_orig": {"observation/state": 7, "action": 7},
    "bridge_oxe": {"observation/state": 7, "action/open_gripper": 0},
    "taco_play": {"observation/robot_obs": 15, "action/rel_actions_world": 7},
    "jaco_play": {"observation/end_effector_cartesian_pos": 7},
    "berkeley_cable_routing": {"observation/robot_state": 7},
    "roboturk": {},
    "nyu_door_opening_surprising_effectiveness": {},
    "viola": {"observation/joint_states": 7, "observation/gripper_states": 2},
    "berkeley_autolab_ur5": {"observation/robot_state": 15},
    "toto": {"observation/state": 7, "action/open_gripper": 0},
    "language_table": {"observation/effector_translation": 2, "action": 2},
    "stanford_hydra_dataset_converted_externally_to_rlds": {"observation/state": 27, "action": 7},
    "austin_buds_dataset_converted_externally_to_rlds": {"observation/state": 24, "action": 7},
    "nyu_franka_play_dataset_converted_externally_to_rlds": {"observation/state": 13, "action": 15},
    "furniture_bench_dataset_converted_externally_to_rlds": {"observation/state": 35, "action": 8},
    "ucsd_kitchen_dataset_converted_externally_to_rlds": {"observation/state": 21, "action": 8},
    "austin_sailor_dataset_converted_externally_to_rlds": {"observation/state": 8, "action": 7},
    "austin_sirius_dataset_converted_externally_to_rlds": {"observation/state": 8, "action": 7},
    "bc_z": {
        "observation/present/xyz": 3,
        "observation/present/axis_angle": 3,
        "observation/present/sensed_close": 1,
        "action/future/xyz_residual": 30,
        "action/future/axis_angle_residual": 30,
        "action/future/target_close": 10,
    },
    "dlr_edan_shared_control_converted_externally_to_rlds": {"observation/state": 7, "action": 7},
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds": {"observation/state": 20, "action": 8},
    "utaustin_mutex": {"observation/state": 24, "action": 7},
    "berkeley_fanuc_manipulation": {"observation/state": 13, "action": 6},
    "cmu_stretch": {"observation/state": 4, "action": 8},
    "fmb_dataset": {"observation/eef_pose": 7, "observation/state_gripper_pose": 0, "action": 7},
    "dobbe": {"observation/state": 7, "action": 7},
    "metaworld": {"observation/state": 39, "action": 4},
}
RT1_WIDTHS = {"action/world_vector": 3, "action/rotation_delta": 3, "action/gripper_closedness_action": 1}


def _nest(flat):
    out = {}
    for path, value in flat.items():
        head, _, rest = path.partition("/")
        if head in ("observation", "action", "episode_metadata") and rest:
            out.setdefault(head, {})[rest] = value  # keeps names with '/' (kuka, bc_z) whole
        else:
            out[path] = value
    return out


def synthetic_trajectory(spec, length=6, seed=0):
    rng = np.random.default_rng(seed)
    widths = {**RT1_WIDTHS, **RAW_WIDTHS[spec.name]}
    flat = {"is_first": np.arange(length) == 0, "is_last": np.arange(length) == length - 1}
    for key in spec.raw_keys():
        if key in flat:
            continue
        camera_keys = [f"observation/{k}" for k in spec.image_keys.values() if k]
        if key in camera_keys:
            flat[key] = tf.constant([tf.io.encode_jpeg(image(rng, 8, 8)).numpy()] * length)
        elif key == spec.language_key:
            if spec.language_encoding == "codepoints":
                flat[key] = np.stack([_codepoints("do it", 16)] * length)
            else:
                flat[key] = np.array([b"do it"] * length)
        else:
            width = widths[key]
            shape = (length,) if width == 0 else (length, width)
            flat[key] = rng.uniform(-1.5, 1.5, size=shape).astype(np.float32)
    return _nest(flat)


def test_every_registered_spec_standardizes():
    assert set(RAW_WIDTHS) == set(LAYOUTS) == set(oxe.OXE_LAYOUTS) | {"metaworld"}
    for name, spec in LAYOUTS.items():
        out = spec.standardize(synthetic_trajectory(spec))
        assert out["action"].shape == (6, spec.action_dim), name
        assert out["action"].dtype == tf.float32
        assert out["observation"]["proprio"].shape == (6, spec.proprio_dim), name
        assert sorted(out["observation"]) == ["image_primary", "image_secondary", "image_wrist", "proprio", "timestep"]
        for camera in IMAGE_CAMERAS:
            images = out["observation"][f"image_{camera}"].numpy()
            assert (images == b"").all() == (spec.image_keys[camera] is None), (name, camera)
        assert set(out["task"]["language_instruction"].numpy()) == {b"do it"}, name
        action = out["action"].numpy()
        assert np.isfinite(action).all(), name
        if spec.gripper_output == "absolute_open_one":  # converted grippers land in [0, 1]
            assert ((action[:, 6] >= 0) & (action[:, 6] <= 1)).all(), name
        assert len(spec.fingerprint()) == 16 and dataset_gap(name) >= 1
        assert spec.gripper_dims and all(not spec.normalize_mask[d] for d in spec.gripper_dims)


def test_spec_is_plain_data():
    spec = layout("bridge_dataset")
    json.dumps(spec.to_dict())
    assert hash(spec) == hash(layout("bridge_dataset"))
    assert spec.fingerprint() != layout("bridge_orig").fingerprint()
    assert spec.image_keys == {"primary": "image_0", "secondary": "image_1", "wrist": "image_3"}
    assert layout("fractal20220817_data").image_keys == {"primary": "image", "secondary": None, "wrist": None}
    assert "observation/image_0" in spec.raw_keys() and "language_instruction" in spec.raw_keys()


def test_decoded_uint8_images_are_reencoded():
    spec = layout("roboturk")
    traj = synthetic_trajectory(spec, length=3)
    frames = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    traj["observation"]["front_rgb"] = frames
    out = spec.standardize(traj)
    assert decoded(out["observation"]["image_primary"][2]).shape == (8, 8, 3)


def test_wrong_width_is_named():
    spec = layout("bridge_dataset")
    traj = synthetic_trajectory(spec)
    traj["observation"]["state"] = np.zeros((6, 5), np.float32)
    with pytest.raises(ValueError, match=r"'bridge_dataset': proprio has 5 dims .* says 7"):
        spec.standardize(traj)


# --------------------------------------------------------------------------- conversions


def test_relative_to_absolute_gripper():
    f = lambda x: oxe.relative_to_absolute_gripper(np.float32(x)).numpy().tolist()  # noqa: E731
    assert f([0, 0, 1, 0, 0, -1, 0]) == [1, 1, 0, 0, 0, 1, 1]  # open until closed, then reopened
    assert f([0, -1, 0, 1]) == [0, 1, 1, 0]  # first event "open": it was closed before
    assert f([0, 0, 0]) == [1, 1, 1]  # no events: open
    assert f([0.2, -0.4, 0.6]) == [1, 1, 0]  # below the threshold is "keep"
    assert f([]) == []


def test_binarize_gripper():
    f = lambda x: oxe.binarize_gripper(np.float32(x)).numpy().tolist()  # noqa: E731
    assert f([1.0, 0.8, 0.4, 0.01, 0.3, 0.97]) == [1, 0, 0, 0, 1, 1]  # in-between -> next decided
    assert f([0.02, 0.4, 0.7]) == [0, 0, 1]  # trailing undecided: threshold 0.5


def test_quaternion_to_euler():
    f = lambda q: oxe.quaternion_to_euler(np.float32(q)).numpy()  # noqa: E731
    np.testing.assert_allclose(f([[0, 0, 0, 1]]), [[0, 0, 0]], atol=1e-6)
    s = math.sqrt(0.5)
    np.testing.assert_allclose(f([[0, 0, s, s]]), [[0, 0, math.pi / 2]], atol=1e-6)  # yaw 90 deg
    np.testing.assert_allclose(f([[s, 0, 0, s]]), [[math.pi / 2, 0, 0]], atol=1e-6)  # roll 90 deg
    np.testing.assert_allclose(f([[0, math.sin(0.2), 0, math.cos(0.2)]]), [[0, 0.4, 0]], atol=1e-6)


def test_decode_codepoints():
    codes = np.stack([_codepoints("héllo", 8), _codepoints("", 8), _codepoints("abcdefgh", 8)])
    assert oxe.decode_codepoints(codes).numpy().tolist() == ["héllo".encode(), b"", b"abcdefgh"]


# --------------------------------------------------------------------------- lookups


def test_get_dataset_spec_errors_and_aliases():
    assert layout("stanford_hydra").name == "stanford_hydra_dataset_converted_externally_to_rlds"
    assert layout(" Fractal ").name == "fractal20220817_data"
    with pytest.raises(KeyError) as info:
        registry.get_dataset_spec("bridge_datset")
    message = str(info.value)
    assert "bridge_dataset" in message and "Did you mean" in message and "language_table" in message


def test_one_spec_type_and_metaworld_once():
    """One DatasetSpec class (the registry's; oxe only has raw layouts), Meta-World registered once
    with its MT10 / MT50 names as aliases of the same entry."""
    assert not hasattr(oxe, "DatasetSpec") and not hasattr(oxe, "get_dataset_spec")
    specs = [registry.get_dataset_spec(n) for n in registry.dataset_names(include_aliases=True)]
    assert {type(s) for s in specs} == {DatasetSpec}
    assert all(isinstance(s.layout, (oxe.RawLayout, type(None))) for s in specs)
    mw = registry.get_dataset_spec("metaworld")
    assert registry.get_dataset_spec("metaworld_mt10") is mw is registry.get_dataset_spec("MetaWorld_MT50")
    assert [n for n in registry.dataset_names() if "metaworld" in n] == ["metaworld"]
    assert mw.standardize_fn is mw.layout is oxe.METAWORLD_LAYOUT and mw.builder_dir == "metaworld/1.0.0"
    assert mw.gripper_dims == (oxe.METAWORLD_GRIPPER_DIM,) == (3,) and mw.control_hz == oxe.METAWORLD_CONTROL_HZ
    assert (mw.few_demo_task_key, mw.few_demo_order_key) == ("episode_metadata/task", "episode_metadata/episode_id")
    assert mw.fingerprint == mw.layout.fingerprint()
    bridge = registry.get_dataset_spec("bridge")
    assert bridge.layout is oxe.OXE_LAYOUTS["bridge_dataset"] and bridge.builder_dir == "bridge_dataset"
    assert (bridge.gripper_dims, bridge.normalize_mask) == (bridge.layout.gripper_dims, bridge.layout.normalize_mask)
    assert registry.get_dataset_spec("video_folder").trajectories_fn == video.VideoFolderSource()


def test_registered_and_registry_only_datasets_resolve_in_mixtures():
    """metaworld, video_folder and a register_dataset-ed spec resolve through the one parser."""
    extra = DatasetSpec("test_registry_extra", builder_dir="/nowhere", control_hz=10.0)
    assert registry.register_dataset(extra) is extra
    try:
        resolved = mixtures.resolve_mixture("metaworld:2, video_folder:0.5,Test_Registry_Extra")
        assert resolved == [(registry.get_dataset_spec("metaworld"), 2.0),
                            (registry.get_dataset_spec("video_folder"), 0.5), (extra, 1.0)]
        assert mixtures.resolve_mixture("test_registry_extra") == [(extra, 1.0)]
        assert mixtures.resolve_mixture([("test_registry_extra", 1), ("metaworld_mt10", 3)]) == [
            (extra, 1.0), (registry.get_dataset_spec("metaworld"), 3.0)]
        with pytest.raises(ValueError, match="more than once"):
            mixtures.resolve_mixture("metaworld:1,metaworld_mt10:1")
        assert registry.register_dataset(oxe.OXE_LAYOUTS["toto"]).layout is oxe.OXE_LAYOUTS["toto"]
        with pytest.raises(ValueError, match="alias"):
            registry.register_dataset(DatasetSpec("metaworld_mt10"))
    finally:
        registry._DATASETS.pop("test_registry_extra")
        registry.register_dataset(registry.spec_from_layout(oxe.OXE_LAYOUTS["toto"]))
    with pytest.raises(KeyError, match="Known datasets"):
        mixtures.resolve_mixture("test_registry_extra")


# --------------------------------------------------------------------------- mixtures

MAGIC_SOUP = {
    "fractal20220817_data": 0.54087122203,
    "kuka": 0.8341046294,
    "bridge_dataset": 1.0,
    "taco_play": 2.0,
    "jaco_play": 1.0,
    "berkeley_cable_routing": 1.0,
    "roboturk": 2.0,
    "nyu_door_opening_surprising_effectiveness": 1.0,
    "viola": 2.0,
    "berkeley_autolab_ur5": 2.0,
    "toto": 1.0,
    "language_table": 0.1,
    "stanford_hydra_dataset_converted_externally_to_rlds": 2.0,
    "austin_buds_dataset_converted_externally_to_rlds": 1.0,
    "nyu_franka_play_dataset_converted_externally_to_rlds": 3.0,
    "furniture_bench_dataset_converted_externally_to_rlds": 0.1,
    "ucsd_kitchen_dataset_converted_externally_to_rlds": 2.0,
    "austin_sailor_dataset_converted_externally_to_rlds": 1.0,
    "austin_sirius_dataset_converted_externally_to_rlds": 1.0,
    "bc_z": 0.2,
    "dlr_edan_shared_control_converted_externally_to_rlds": 1.0,
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds": 1.0,
    "utaustin_mutex": 1.0,
    "berkeley_fanuc_manipulation": 2.0,
    "cmu_stretch": 1.0,
}


def test_oxe_magic_soup_is_recorded_exactly():
    soup = mixtures.get_mixture("oxe_magic_soup")
    assert len(soup) == 25 and dict(soup) == MAGIC_SOUP
    resolved = mixtures.resolve_mixture("oxe_magic_soup")
    assert [(s.name, w) for s, w in resolved] == list(soup)
    assert all(isinstance(s, DatasetSpec) for s, _ in resolved)
    plus = dict(mixtures.get_mixture("oxe_magic_soup_plus"))
    assert len(plus) == 26 and plus["fmb_dataset"] == 1.0 and plus["dobbe"] == 0.2
    assert "nyu_door_opening_surprising_effectiveness" not in plus


def test_every_mixture_resolves():
    for name in mixtures.mixture_names():
        resolved = mixtures.resolve_mixture(name)
        assert resolved and all(registry.get_dataset_spec(s.name) is s for s, _ in resolved)
    assert [(s.name, w) for s, w in mixtures.resolve_mixture("bridge")] == [("bridge_dataset", 1.0)]
    for name in ("metaworld_mt10", "metaworld_mt50"):  # mixture names, aliases of the one entry
        assert mixtures.resolve_mixture(name) == [(registry.get_dataset_spec("metaworld"), 1.0)]
    assert len(mixtures.resolve_mixture("rtx")) == 11


def test_resolve_mixture_strings():
    resolved = mixtures.resolve_mixture("bridge_dataset:2, fractal:0.5,language_table")
    assert [(s.name, w) for s, w in resolved] == [
        ("bridge_dataset", 2.0),
        ("fractal20220817_data", 0.5),
        ("language_table", 1.0),
    ]
    assert [(s.name, w) for s, w in mixtures.resolve_mixture("kuka")] == [("kuka", 1.0)]
    expanded = dict((s.name, w) for s, w in mixtures.resolve_mixture("rtx:2,metaworld_mt10:3"))
    assert expanded["berkeley_cable_routing"] == 6.0 and expanded["metaworld"] == 3.0
    pairs = mixtures.resolve_mixture([("viola", 1), (registry.get_dataset_spec("toto"), 2.5)])
    assert [(s.name, w) for s, w in pairs] == [("viola", 1.0), ("toto", 2.5)]


def test_resolve_mixture_errors():
    with pytest.raises(KeyError) as info:
        mixtures.resolve_mixture("oxe_magic_sop")
    assert "oxe_magic_soup" in str(info.value) and "Known mixtures" in str(info.value)
    with pytest.raises(KeyError) as info:
        mixtures.resolve_mixture("bridge_dataset:1,no_such_robot:2")
    assert "no_such_robot" in str(info.value) and "Known datasets" in str(info.value)
    with pytest.raises(KeyError, match="Known mixtures"):
        mixtures.get_mixture("magic")
    with pytest.raises(ValueError, match="not a number"):
        mixtures.resolve_mixture("bridge_dataset:heavy")
    with pytest.raises(ValueError, match=">= 0"):
        mixtures.resolve_mixture("bridge_dataset:-1")
    with pytest.raises(ValueError, match="more than once"):
        mixtures.resolve_mixture("bridge:1,bridge_dataset:2")
    with pytest.raises(ValueError, match="all weights are zero"):
        mixtures.resolve_mixture("kuka:0")
    with pytest.raises(ValueError, match="empty"):
        mixtures.resolve_mixture("  ")
    with pytest.raises(ValueError, match="empty entry"):
        mixtures.resolve_mixture("kuka,,toto")


def test_balance_weights():
    mixture = [("bridge_dataset", 1.0), ("fractal20220817_data", 0.5), ("language_table", 2.0)]
    sizes = {"bridge_dataset": 100, "fractal": 400, "language_table": 25}  # aliases allowed
    balanced = mixtures.balance_weights(mixture, sizes)
    # w * n = 100, 200, 50 -> / 350
    assert [n for n, _ in balanced] == [n for n, _ in mixture]
    np.testing.assert_allclose([w for _, w in balanced], [100 / 350, 200 / 350, 50 / 350])
    assert math.isclose(sum(w for _, w in balanced), 1.0)
    # Sizes in mixture order; equal weights sample each transition equally: shares ~ sizes.
    np.testing.assert_allclose(
        [w for _, w in mixtures.balance_weights([("kuka", 1), ("toto", 1)], [30, 10])], [0.75, 0.25]
    )
    by_name = {s.name: w for s, w in mixtures.balance_weights("oxe_magic_soup", {n: 10 for n in MAGIC_SOUP})}
    total = sum(MAGIC_SOUP.values())
    assert math.isclose(by_name["kuka"], 0.8341046294 / total)
    assert mixtures.normalize_weights([1, 3]) == [0.25, 0.75]
    with pytest.raises(ValueError, match=r"no size for \['language_table'\]"):
        mixtures.balance_weights(mixture, {"bridge_dataset": 1, "fractal20220817_data": 1})
    with pytest.raises(ValueError, match="2 sizes for 3 datasets"):
        mixtures.balance_weights(mixture, [1, 2])
    with pytest.raises(ValueError, match=">= 0"):
        mixtures.balance_weights(mixture, [1, -2, 3])


# --------------------------------------------------------------------------- the core reader


@pytest.mark.parametrize(
    "fixture, name",
    [
        ("fractal", "fractal20220817_data"),
        ("kuka", "kuka"),
        ("bridge", "bridge_dataset"),
        ("language_table", "language_table"),
        ("taco_play", "taco_play"),
        ("metaworld_like", "metaworld_mt10"),
    ],
)
def test_through_traj_dataset_from_rlds(request, fixture, name):
    """The pipeline's reader passes {"steps": ..., "episode_metadata": ...}: same result."""
    version_dir = request.getfixturevalue(fixture)
    spec = layout(name)
    ds = dataset.TrajDataset.from_rlds(
        version_dir, "train", shuffle=False, standardize_fn=spec.standardize, dataset_name=spec.name,
        deterministic=True, process_index=0, process_count=1,
    )
    got = list(ds.iterator())
    _, expected = standardized(version_dir, name)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        for key in ("action", "has_action"):
            np.testing.assert_array_equal(g[key], e[key])
        for key in ("proprio", "timestep", "image_primary", "image_secondary", "image_wrist"):
            np.testing.assert_array_equal(g["observation"][key], e["observation"][key])
        np.testing.assert_array_equal(g["task"]["language_instruction"], e["task"]["language_instruction"])
        np.testing.assert_array_equal(g["traj_key"], e["traj_key"])
        np.testing.assert_array_equal(g["dataset_name"], e["dataset_name"])


def test_missing_feature_through_traj_dataset(fractal):
    with pytest.raises(dataset.MissingFeatureError) as info:
        dataset.TrajDataset.from_rlds(
            fractal, "train", shuffle=False, standardize_fn=layout("taco_play").standardize,
            dataset_name="taco_play", process_index=0, process_count=1,
        )
    message = str(info.value)
    assert "dataset 'taco_play': features 'observation/rgb_static'" in message
    assert "'action/rel_actions_world'" in message and "action/world_vector" in message
