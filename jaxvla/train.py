"""Entry point for every stage.

    python -m jaxvla.train --config=configs/<stage>.py[:variant] --workdir=DIR [--config.a.b=v ...]

Run the same command on every host of a TPU pod (or under SLURM / with JAX_COORDINATOR_ADDRESS):
the trainer joins the processes, builds the mesh and each process reads its share of the data.
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A configs/<stage>.py[:variant] file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and images go (resumes if present).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.getLogger("jaxvla").setLevel(logging.INFO)
    # Orbax and friends log every file operation at INFO through absl; keep warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    # tf.data is used for input only: keep TensorFlow off any accelerator JAX will use.
    try:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    except ImportError:
        pass
    from jaxvla.trainer import train

    result = train(FLAGS.config, FLAGS.workdir)
    if result.preempted:
        logging.getLogger("jaxvla").warning("preempted at step %d; rerun the same command to resume", result.step)
    sys.exit(0)


if __name__ == "__main__":
    app.run(main)
