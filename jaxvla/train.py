"""Entry point for every stage.

    python -m jaxvla.train --config=configs/<stage>.py[:variant] --workdir=DIR [--config.a.b=v ...]

Run the same command on every host of a TPU pod (or under SLURM / with JAX_COORDINATOR_ADDRESS):
the trainer joins the processes, builds the mesh and each process reads its share of the data.

What the stage reads and is missing is made first (``jaxvla.trainer.train_prerequisites``): the
embedded Meta-World dataset is rendered, earlier stages' checkpoints (e.g. pretraining's image
tokenizer and LAQ) are trained in their workdirs, each saying so.
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

from jaxvla import compilation_cache  # noqa: E402
from jaxvla import config as cfg_lib  # noqa: E402
from jaxvla.trainer import train, train_prerequisites  # noqa: E402

FLAGS = flags.FLAGS
cfg_lib.DEFINE_config_file("config")
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and images go (resumes if present).")
flags.DEFINE_string("compilation_cache", None, "Persistent XLA compilation cache directory, or 'off' "
                    f"(default: ${compilation_cache.ENV_VAR}, else ~/.cache/jaxvla/xla).")
flags.mark_flags_as_required(["config", "workdir"])


def _fail(message: str) -> None:
    """One line on stderr and exit status 2: for mistakes in the command line, not bugs."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _config_overrides(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --config spec, the dotted keys of every --config.KEY[=V] / --noconfig.KEY) in ``argv``."""
    spec, keys = None, []
    for index, arg in enumerate(argv):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and index + 1 < len(argv):
            spec = argv[index + 1]
        elif arg.startswith(("--config.", "--noconfig.")):
            keys.append(arg.split(".", 1)[1].split("=", 1)[0])
    return spec, keys


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; an unknown config key (ml_collections raises a KeyError or an
    AttributeError from deep inside the flag parser) becomes one line naming the key and the
    closest valid ones instead of a traceback."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(str(e))
    except (KeyError, AttributeError) as e:
        spec, keys = _config_overrides(argv)
        try:
            config = cfg_lib.load_config(spec) if spec else None
        except Exception:  # the config file itself is broken: let its own error speak
            config = None
        for key in keys if config is not None else []:
            message = cfg_lib.unknown_key_message(config, key)
            if message:
                _fail(message)
        _fail(f"bad --config override: {type(e).__name__}: {e}")


def main(argv):
    del argv
    try:
        cfg_lib.check_values(FLAGS.config)
    except cfg_lib.ConfigError as e:
        _fail(str(e))
    logging.getLogger("jaxvla").setLevel(logging.INFO)
    # Orbax and friends log every file operation at INFO through absl; keep warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    # tf.data is used for input only: keep TensorFlow off any accelerator JAX will use.
    try:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    except ImportError:
        pass
    cache_dir = compilation_cache.enable(FLAGS.compilation_cache)
    logging.getLogger("jaxvla").info("compilation cache: %s", cache_dir or "off")
    try:
        train_prerequisites(FLAGS.config)
        result = train(FLAGS.config, FLAGS.workdir)
    except cfg_lib.ConfigError as e:  # mesh / batch against the devices: still before compile
        _fail(str(e))
    if result.preempted:
        logging.getLogger("jaxvla").warning("preempted at step %d; rerun the same command to resume", result.step)
    sys.exit(0)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
