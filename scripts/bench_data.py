"""Data-pipeline throughput: read, decode, resize, window, (augment,) batch -> numpy.

    python scripts/bench_data.py --data_dir=runs/data/metaworld_mt10_64 --sample=pairs --batch_size=32
    python scripts/bench_data.py --data_dir=DIR --mixture="metaworld:1" --sample=clips
    python scripts/bench_data.py --data_dir=DIR --sample=pairs --train_config=configs/tokenizer.py:small
    python scripts/bench_data.py --data_dir=DIR --sample=pairs --train_examples_per_sec=250

Builds the same pipeline as training (``jaxvla.data.pipeline.make_batches``), pulls
``--warmup`` batches (pipeline start, shuffle-buffer fill), then times ``--num_batches``
batches. Prints samples/s, transitions/s (a frame, pair or chunk is one transition; a clip of
L+1 frames is L), decoded frames/s and the time to the first batch; last, the ratio of the
pipeline's samples/s to a training step's consumption rate (examples = batch rows): measured in
the same run for ``--train_config`` (a stage config; its real jitted train step is timed), or
given by ``--train_examples_per_sec``. The default pretraining config joins as the default
``--train_config`` once that stage exists.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

flags.DEFINE_string("data_dir", None, "TFDS data_dir holding the datasets (or a dataset version dir).")
flags.DEFINE_string("mixture", "", "Mixture name or 'name:weight,...' (overrides --dataset).")
flags.DEFINE_string("dataset", "metaworld", "Single dataset name when --mixture is empty.")
flags.DEFINE_enum("sample", "pairs", ["frames", "pairs", "clips", "chunks"], "Sample kind.")
flags.DEFINE_integer("batch_size", 32, "Rows per batch (this process).")
flags.DEFINE_integer("image_size", 64, "Square image size after resize.")
flags.DEFINE_integer("num_batches", 200, "Timed batches.")
flags.DEFINE_integer("warmup", 10, "Untimed batches first.")
flags.DEFINE_boolean("augment", False, "Seeded augmentation on.")
flags.DEFINE_boolean("deterministic", True, "Deterministic (order-preserving) pipeline.")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_list("set", [], "More config.data overrides, key=value (e.g. gap_frames=8,shuffle_buffer=1000).")
flags.DEFINE_float("train_examples_per_sec", 0.0, "Training consumption (examples/s) to compare with.")
config_flags.DEFINE_config_file("train_config", None, "A stage config whose train step's consumption is measured.", lock_config=True)
FLAGS = flags.FLAGS


def _parse(value: str, like):
    if isinstance(like, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(like, int):
        return int(value)
    if isinstance(like, float):
        return float(value)
    return value


def main(argv):
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # TFDS logs every dataset_info load at INFO
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # tf.data only: accelerators stay JAX's
    from jaxvla.data.pipeline import default_data_config, make_batches

    if not FLAGS.data_dir:
        raise app.UsageError("--data_dir is required")
    data = default_data_config()
    data.data_dir = FLAGS.data_dir
    data.dataset = FLAGS.dataset
    data.mixture = FLAGS.mixture
    data.sample = FLAGS.sample
    data.image_size = FLAGS.image_size
    data.augment = FLAGS.augment
    data.deterministic = FLAGS.deterministic
    for item in FLAGS.set:
        key, _, value = item.partition("=")
        if key not in data:
            raise app.UsageError(f"--set: unknown config.data key {key!r}; known: {sorted(data.keys())}")
        data[key] = _parse(value, data[key])

    start = time.perf_counter()
    batches = make_batches(data, batch_size=FLAGS.batch_size, train=True, seed=FLAGS.seed, process_index=0, process_count=1)
    iterator = iter(batches)
    first = next(iterator)
    first_s = time.perf_counter() - start
    for _ in range(max(FLAGS.warmup - 1, 0)):
        next(iterator)
    start = time.perf_counter()
    for _ in range(FLAGS.num_batches):
        batch = next(iterator)
    seconds = time.perf_counter() - start

    images = batch["observation"]
    frames_per_sample = 1
    for key, value in images.items():
        if key.startswith("image_"):
            frames_per_sample = max(frames_per_sample, int(value[0].size // (FLAGS.image_size**2 * 3)))
    transitions_per_sample = {"frames": 1, "pairs": 1, "chunks": 1, "clips": max(frames_per_sample - 1, 1)}[FLAGS.sample]
    samples = FLAGS.num_batches * FLAGS.batch_size
    rate = samples / seconds
    names = ", ".join(f"{s.name}:{w:g}" for s, w in batches.specs)
    print(f"datasets: {names}; sample={FLAGS.sample}; batch {FLAGS.batch_size}; image {FLAGS.image_size}px; "
          f"augment={FLAGS.augment}; deterministic={FLAGS.deterministic}; gaps={batches.gaps or '-'}")
    print(f"first batch after {first_s:.2f} s (pipeline start + shuffle buffer); batch keys: "
          f"{sorted(first.keys())}")
    print(f"{FLAGS.num_batches} batches in {seconds:.2f} s: {FLAGS.num_batches / seconds:.1f} batches/s, "
          f"{rate:.0f} samples/s, {rate * transitions_per_sample:.0f} transitions/s, "
          f"{rate * frames_per_sample:.0f} decoded frames/s")
    consumption = FLAGS.train_examples_per_sec
    if FLAGS.train_config is not None:
        from jaxvla.benchmark import time_train_step

        timing = time_train_step(FLAGS.train_config, steps=5)
        consumption = FLAGS.train_config.batch_size / timing.step_s
        print(f"training consumption ({FLAGS.train_config.stage}, batch {FLAGS.train_config.batch_size}): "
              f"{consumption:.1f} examples/s ({timing.step_s * 1e3:.0f} ms/step)")
    if consumption > 0:
        print(f"ratio to training consumption: {rate / consumption:.2f}")
    else:
        print("ratio to training consumption: n/a (pass --train_config or --train_examples_per_sec)")


if __name__ == "__main__":
    app.run(main)
