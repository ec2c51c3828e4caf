"""Test session set-up: 8 fake CPU devices so sharded and single-device runs share one process."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MUJOCO_GL", "egl")
# TensorFlow (tf.data) must never claim an accelerator that JAX wants.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from jaxvla import compilation_cache  # noqa: E402

# The suite compiles the same tiny programs in many tests and both workers: share them on disk
# ($JAXVLA_COMPILATION_CACHE, else ~/.cache/jaxvla/xla; "off" disables).
compilation_cache.enable()

import pytest  # noqa: E402


# Experts solve these in ~45-70 steps; the cap keeps generation short whatever the seed.
METAWORLD_TASKS = ("reach", "button-press")
METAWORLD_EPISODES = 2
METAWORLD_SIZE = 64
METAWORLD_MAX_STEPS = 80
METAWORLD_SEED = 0


@pytest.fixture(scope="session")
def metaworld_dataset(tmp_path_factory):
    """A real Meta-World RLDS dataset (2 tasks x 2 expert episodes, 64 px), generated once per
    session with the worker pool: {"out": data_dir, "version_dir": dataset version dir}."""
    from jaxvla.data.metaworld_rlds import make_metaworld_dataset

    out = tmp_path_factory.mktemp("metaworld") / "ds"
    version_dir = make_metaworld_dataset(
        list(METAWORLD_TASKS),
        METAWORLD_EPISODES,
        METAWORLD_SIZE,
        out,
        seed=METAWORLD_SEED,
        max_episode_steps=METAWORLD_MAX_STEPS,
        num_workers=2,
        progress=False,
        verbose=False,
    )
    return {"out": out, "version_dir": version_dir}


@pytest.fixture(scope="session")
def rendered_frames_config(metaworld_dataset):
    """Config overrides pointing a stage at rendered Meta-World frames."""
    return {"data.source": "rlds", "data.data_dir": str(metaworld_dataset["version_dir"])}


def _one_device():
    return jax.devices()[:1]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A tiny VQGAN checkpoint (64 px -> 8x8 codes of 64) trained for 2 steps on procedural frames."""
    from jaxvla.trainer import train
    from tests.test_tokenizer_stage import tiny_tokenizer_config

    workdir = str(tmp_path_factory.mktemp("tokenizer"))
    train(tiny_tokenizer_config(num_steps=2, **{"data.num_frames": 16}), workdir, devices=_one_device())
    return workdir


@pytest.fixture(scope="session")
def finetune_stats_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("stats"))


@pytest.fixture(scope="session")
def finetuned(tiny_tokenizer, metaworld_dataset, finetune_stats_dir, tmp_path_factory):
    """Tiny finetuning checkpoints, 3 steps each (eval at 3): {"flow_small" | "bins_small":
    (workdir, TrainResult)}. Shared by the finetuning, policy, evaluation and serving tests."""
    from jaxvla.trainer import train
    from tests.test_finetune import tiny_finetune_config

    out = {}
    for variant in ("flow_small", "bins_small"):
        workdir = str(tmp_path_factory.mktemp(variant))
        config = tiny_finetune_config(variant, tiny_tokenizer, metaworld_dataset["out"], finetune_stats_dir,
                                      num_steps=3, eval_every=3)
        out[variant] = (workdir, train(config, workdir, devices=_one_device()))
    return out


# Test files that take minutes go first: pytest-xdist (--dist loadfile) hands whole files to the
# workers in collection order, so starting the long ones early keeps both workers busy until the
# end instead of one finishing a long file alone (measured 2026-11-30: ~3 min of one idle core).
LONGEST_FILES_FIRST = (
    "test_tokenizer_stage.py", "test_laq_long.py", "test_policy.py", "test_laq.py", "test_pretrain.py",
    "test_planning.py", "test_finetune.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return LONGEST_FILES_FIRST.index(name) if name in LONGEST_FILES_FIRST else len(LONGEST_FILES_FIRST)

    items.sort(key=rank)  # stable: the order inside a file is kept
