"""Meta-World wrapper, instructions and the RLDS dataset writer (real rollouts, real TFDS)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

import metaworld  # noqa: F401
import language_world
import tensorflow_datasets as tfds
import tensorflow as tf

from jaxvla.data import metaworld_rlds  # noqa: E402
from jaxvla.data.metaworld_rlds import (  # noqa: E402
    MetaWorldDatasetConfig,
    make_metaworld_dataset,
    read_metadata,
)
from jaxvla.sim import instructions  # noqa: E402
from jaxvla.sim.metaworld_env import (  # noqa: E402
    MT10_TASKS,
    MT50_TASKS,
    MetaWorldEnv,
    episode_seed,
    expert_policy,
    rollout_expert,
    task_names,
)

from conftest import (  # noqa: E402  (the session's shared dataset settings)
    METAWORLD_EPISODES as EPISODES,
    METAWORLD_MAX_STEPS as MAX_STEPS,
    METAWORLD_SEED as SEED,
    METAWORLD_SIZE as SIZE,
    METAWORLD_TASKS as TASKS,
)

STEP_KEYS = {
    "observation",
    "action",
    "language_instruction",
    "reward",
    "discount",
    "is_first",
    "is_last",
    "is_terminal",
}


def _episode_to_numpy(example) -> dict:
    steps = list(example["steps"].as_numpy_iterator())
    stacked = {
        "image": np.stack([s["observation"]["image"] for s in steps]),
        "state": np.stack([s["observation"]["state"] for s in steps]),
        "language_instruction": [s["language_instruction"].decode() for s in steps],
    }
    for key in ("action", "reward", "discount", "is_first", "is_last", "is_terminal"):
        stacked[key] = np.stack([s[key] for s in steps])
    stacked["step_keys"] = set(steps[0])
    meta = {k: v.numpy() for k, v in example["episode_metadata"].items()}
    meta["task"] = meta["task"].decode()
    return {"steps": stacked, "meta": meta}


@pytest.fixture(scope="module")
def generated(metaworld_dataset):
    """The session's 2 tasks x 2 episodes (written with the worker pool), read back, and the
    same episodes re-rolled in this process as the reference."""
    out, version_dir = metaworld_dataset["out"], metaworld_dataset["version_dir"]
    builder = tfds.builder_from_directory(version_dir)
    read = {
        split: [_episode_to_numpy(ex) for ex in builder.as_dataset(split=split)]
        for split in builder.info.splits
    }
    reference = {}
    for task in TASKS:
        with MetaWorldEnv(task, SEED, image_size=SIZE, max_episode_steps=MAX_STEPS) as env:
            for index in range(EPISODES):
                reference[(task, index)] = rollout_expert(env, episode_seed(SEED, task, index))
    return {"out": out, "version_dir": version_dir, "builder": builder, "read": read, "reference": reference}


def _by_key(generated) -> dict:
    seeds = {episode_seed(SEED, t, i): (t, i) for t in TASKS for i in range(EPISODES)}
    found = {}
    for split, episodes in generated["read"].items():
        for ep in episodes:
            key = seeds[int(ep["meta"]["seed"])]
            found[key] = (split, ep)
    return found


def test_layout_splits_and_schema(generated):
    version_dir = generated["version_dir"]
    assert version_dir == os.path.join(str(generated["out"]), "metaworld", "1.0.0")
    files = os.listdir(version_dir)
    assert {"dataset_info.json", "features.json", "metadata.json"} <= set(files)
    assert any(f.startswith("metaworld-train.tfrecord") for f in files)
    # Nothing but the dataset in the output directory (no rollouts, downloads or temp dirs).
    assert os.listdir(generated["out"]) == ["metaworld"]
    assert os.listdir(os.path.dirname(generated["out"])) == ["ds"]

    builder = generated["builder"]
    assert builder.info.splits["train"].num_examples == len(TASKS) * (EPISODES - 1)
    assert builder.info.splits["val"].num_examples == len(TASKS)
    features = builder.info.features
    assert set(features.keys()) == {"steps", "episode_metadata"}
    assert set(features["steps"].keys()) == STEP_KEYS
    assert set(features["steps"]["observation"].keys()) == {"image", "state"}
    image = features["steps"]["observation"]["image"]
    assert image.shape == (SIZE, SIZE, 3) and image.encoding_format == "jpeg"
    assert features["steps"]["observation"]["state"].shape == (39,)
    assert features["steps"]["action"].shape == (4,)
    assert set(features["episode_metadata"].keys()) == {"task", "success", "seed", "episode_id"}

    meta = read_metadata(version_dir)
    assert meta["config"]["tasks"] == list(TASKS)
    assert meta["config"]["image_size"] == SIZE and meta["config"]["max_episode_steps"] == MAX_STEPS
    assert set(meta["stats"]) == set(TASKS)
    assert builder.info.metadata["config"]["episodes_per_task"] == EPISODES

    # The name-based TFDS read works too (from files; no builder code needed).
    by_name = tfds.builder("metaworld", data_dir=str(generated["out"]))
    assert by_name.info.splits["train"].num_examples == builder.info.splits["train"].num_examples


def test_values_round_trip(generated):
    found = _by_key(generated)
    assert len(found) == len(TASKS) * EPISODES
    for (task, index), (split, ep) in found.items():
        ref = generated["reference"][(task, index)]
        steps, meta = ep["steps"], ep["meta"]
        num_actions = ref["actions"].shape[0]
        assert split == ("val" if index == EPISODES - 1 else "train")
        assert steps["step_keys"] == STEP_KEYS
        assert len(steps["action"]) == num_actions + 1

        # Observation t is the one before action t; the last step's action is zero padding.
        np.testing.assert_array_equal(steps["state"], ref["states"])
        np.testing.assert_array_equal(steps["action"][:-1], ref["actions"])
        np.testing.assert_array_equal(steps["action"][-1], np.zeros(4, np.float32))
        np.testing.assert_array_equal(steps["reward"][:-1], ref["rewards"])
        assert steps["reward"][-1] == 0.0
        assert steps["action"].dtype == np.float32 and steps["state"].dtype == np.float32
        assert np.all(np.abs(steps["action"]) <= 1.0)

        # Images: JPEG (quality 95) of the rendered frames, so close to the raw frames ...
        assert steps["image"].shape == ref["images"].shape and steps["image"].dtype == np.uint8
        diff = np.abs(steps["image"].astype(np.float64) - ref["images"].astype(np.float64))
        psnr = 10 * np.log10(255.0**2 / max(np.mean(diff**2), 1e-9))
        assert diff.mean() < 6.0 and psnr > 28.0, (diff.mean(), psnr)
        # ... and bit-identical to this process's frames put through the same codec: the
        # worker processes rendered exactly the same pixels.
        reencoded = np.stack(
            [tf.io.decode_jpeg(tf.image.encode_jpeg(f, quality=95)).numpy() for f in ref["images"]]
        )
        np.testing.assert_array_equal(steps["image"], reencoded)

        # Flags at the boundaries.
        expected_first = np.zeros(num_actions + 1, bool)
        expected_first[0] = True
        np.testing.assert_array_equal(steps["is_first"], expected_first)
        np.testing.assert_array_equal(steps["is_last"], expected_first[::-1])
        terminal = ref["terminated_on_success"]
        np.testing.assert_array_equal(steps["is_terminal"], expected_first[::-1] & terminal)
        expected_discount = np.ones(num_actions + 1, np.float32)
        expected_discount[-1] = 0.0
        if terminal:
            expected_discount[-2] = 0.0
        np.testing.assert_array_equal(steps["discount"], expected_discount)

        # Success flags follow info["success"]; success episodes stop 5 steps after it.
        assert bool(meta["success"]) == bool(ref["successes"].any())
        if ref["success"] and int(np.argmax(ref["successes"])) + 5 < MAX_STEPS:
            assert terminal and num_actions == int(np.argmax(ref["successes"])) + 1 + 5
        else:  # Cut by the step limit: truncated, not terminal.
            assert num_actions == MAX_STEPS and not terminal

        # Language and metadata.
        assert steps["language_instruction"] == [language_world.TASK_DESCRIPTIONS[task]] * (num_actions + 1)
        assert meta["task"] == task
        assert int(meta["seed"]) == episode_seed(SEED, task, index)
        assert int(meta["episode_id"]) == TASKS.index(task) * EPISODES + index


def test_experts_solve_the_test_tasks(generated):
    assert all(ref["success"] for ref in generated["reference"].values())
    stats = read_metadata(generated["version_dir"])["stats"]
    assert all(stats[t]["success_rate"] == 1.0 for t in TASKS)


def test_existing_dataset_is_refused(generated):
    with pytest.raises(FileExistsError, match="overwrite"):
        make_metaworld_dataset(["reach"], 1, SIZE, generated["out"], progress=False, verbose=False)


def test_rollouts_are_deterministic():
    seed = episode_seed(7, "reach", 3)
    runs = []
    for _ in range(2):
        with MetaWorldEnv("reach-v3", 123, image_size=32, max_episode_steps=15) as env:
            runs.append(rollout_expert(env, seed, action_noise=0.3))
    for key in ("images", "states", "actions", "rewards", "successes"):
        np.testing.assert_array_equal(runs[0][key], runs[1][key])
    assert episode_seed(7, "reach", 3) != episode_seed(7, "reach", 4) != episode_seed(8, "reach", 3)
    assert episode_seed(0, "reach", 0) == episode_seed(0, "reach-v3", 0)


def _small(out, **kwargs):
    return make_metaworld_dataset(
        ["reach"], 1, 32, out, max_episode_steps=4, num_workers=1, progress=False, verbose=False, **kwargs
    )


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "ds"

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure while writing")

    with monkeypatch.context() as m:
        m.setattr(metaworld_rlds, "rlds_steps", broken)
        with pytest.raises(RuntimeError, match="simulated failure"):
            _small(out)
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # No leftover temp directory either.

    # A failed --overwrite keeps the dataset that was there.
    version_dir = _small(out)
    before = sorted(os.listdir(version_dir))
    with monkeypatch.context() as m:
        m.setattr(metaworld_rlds, "rlds_steps", broken)
        with pytest.raises(RuntimeError):
            _small(out, overwrite=True)
    assert sorted(os.listdir(version_dir)) == before
    assert os.listdir(tmp_path) == ["ds"]
    assert tfds.builder_from_directory(version_dir).info.splits["train"].num_examples == 1

    # A successful overwrite replaces it.
    _small(out, overwrite=True, seed=5)
    assert read_metadata(version_dir)["config"]["seed"] == 5
    assert os.listdir(tmp_path) == ["ds"]


def test_non_dataset_directory_is_refused(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        _small(out)
    assert os.listdir(out) == ["notes.txt"]


def test_unknown_task_lists_valid_names(tmp_path):
    with pytest.raises(ValueError) as err:
        task_names("reach,not-a-task")
    message = str(err.value)
    assert "not-a-task" in message and "button-press" in message and "window-close" in message
    with pytest.raises(ValueError, match="pick-place"):
        MetaWorldEnv("pick-n-place", 0)
    with pytest.raises(ValueError, match="drawer-open"):
        make_metaworld_dataset("reach,nope", 1, SIZE, tmp_path / "ds", progress=False, verbose=False)
    assert not (tmp_path / "ds").exists()


def test_task_names_and_config():
    assert task_names("mt10") == list(MT10_TASKS) and len(MT10_TASKS) == 10
    assert task_names("MT50") == list(MT50_TASKS) and len(MT50_TASKS) == 50
    assert task_names("reach-v3, push,reach") == ["reach", "push"]
    assert task_names(["door-open-v3"]) == ["door-open"]
    assert MetaWorldDatasetConfig(("reach",), 1).resolved().val_episodes_per_task == 0
    assert MetaWorldDatasetConfig(("reach",), 4).resolved().val_episodes_per_task == 1
    with pytest.raises(ValueError, match="val_episodes_per_task"):
        MetaWorldDatasetConfig(("reach",), 2, val_episodes_per_task=2).resolved()


def test_env_wrapper_render_and_determinism():
    with MetaWorldEnv("reach", 11, image_size=SIZE) as env:
        assert env.instruction == language_world.TASK_DESCRIPTIONS["reach"]
        obs = env.reset()
        assert obs["image"].shape == (SIZE, SIZE, 3) and obs["image"].dtype == np.uint8
        assert obs["state"].shape == (39,) and obs["state"].dtype == np.float32
        assert obs["image"].std() > 10  # Not a blank or constant frame.
        frame = env.render()
        np.testing.assert_array_equal(frame, obs["image"])

        # Upright: lowering the hand moves the (cyan) gripper pads down the image.
        def pad_row(image):
            img = image.astype(int)
            mask = (img[..., 1] > 150) & (img[..., 2] > 150) & (img[..., 0] < 120)
            assert mask.sum() >= 2
            return np.nonzero(mask)[0].mean()

        start_row, start_z = pad_row(obs["image"]), obs["state"][2]
        for _ in range(15):
            obs, reward, terminated, truncated, info = env.step(np.array([0.0, 0.0, -1.0, 0.0]))
        assert obs["state"][2] < start_z - 0.05
        assert pad_row(obs["image"]) > start_row + 2
        assert isinstance(info["success"], bool) and isinstance(reward, float)
        assert not terminated and not truncated

        # Same seed -> same initial state and frame; another seed -> another goal.
        again = env.reset(seed=11)
        np.testing.assert_array_equal(again["image"], frame)
        np.testing.assert_array_equal(again["state"], env.reset(seed=11)["state"])
        other = env.reset(seed=12)
        assert not np.array_equal(other["state"][-3:], again["state"][-3:])
    with MetaWorldEnv("reach", 11, image_size=SIZE) as fresh:
        np.testing.assert_array_equal(fresh.reset()["image"], frame)

    with MetaWorldEnv("reach", 0, image_size=16, max_episode_steps=3) as env:
        env.reset()
        truncated = [env.step(np.zeros(4))[3] for _ in range(3)]
        assert truncated == [False, False, True]
        with pytest.raises(RuntimeError, match="reset"):
            env.step(np.zeros(4))
    with pytest.raises(RuntimeError, match="closed"):
        env.reset()


def test_expert_policy():
    policy = expert_policy("button-press-v3")
    with MetaWorldEnv("button-press", 3, image_size=16) as env:
        action = policy.act(env.reset()["state"])
    assert action.shape == (4,) and action.dtype == np.float32
    assert np.all(np.abs(action) <= 1.0) and np.any(action != 0)


def test_instructions():
    for task in ("reach", "button-press-topdown", "sweep-into"):
        base = language_world.TASK_DESCRIPTIONS[task]
        assert instructions.instruction(task) == base
        assert instructions.instruction(task + "-v3", 0) == base
        variants = instructions.all_instructions(task)
        assert len(variants) == instructions.NUM_VARIANTS >= 4
        assert len(set(variants)) == len(variants)
        assert all(base.rstrip(".").lower() in v.lower() for v in variants)
        assert instructions.instruction(task, 2) == variants[2]
    assert set(language_world.TASK_DESCRIPTIONS) == set(MT50_TASKS)
    with pytest.raises(ValueError):
        instructions.instruction("reach", instructions.NUM_VARIANTS)
    with pytest.raises(ValueError, match="reach"):
        instructions.instruction("not-a-task")
