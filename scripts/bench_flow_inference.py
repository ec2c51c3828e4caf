"""Flow-matching inference benchmark: the KV-cached prefix vs recomputing the whole sequence at
every Euler step.

    python scripts/bench_flow_inference.py [--config=configs/finetune.py:flow_small] [--batch=1] [--repeats=20]

Builds the finetuning config's flow model (random weights: timing does not depend on them) and
one realistic sequence (a 40-token prompt, the image tokenizer's 64 tokens, the markers, 14
action slots, padded to ``model.seq_len``), then times the two jitted samplers of
``jaxvla/losses/finetune.py`` on it: ``sample_action_chunk`` (prefix prefilled once, each Euler
step runs only the K action tokens) and ``sample_action_chunk_recompute`` (the whole sequence
every step). Prints ms per chunk, chunks per second, the control rate when executing
``model.execute_steps`` of every chunk, the largest difference between the two samplers' chunks,
and last the speed-up (target >= 3x).
"""

from __future__ import annotations

import functools
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/finetune.py:flow_small", "A finetuning config (flow head).",
                                lock_config=True)
flags.DEFINE_integer("batch", 1, "Chunks sampled per call (1: one robot).")
flags.DEFINE_integer("repeats", 20, "Timed calls per sampler (after one compiling call).")
flags.DEFINE_integer("image_codes", 512, "Image tokenizer codebook size (the small VQGAN's).")
flags.DEFINE_integer("image_tokens", 64, "Image tokens per frame (64 px / 8).")
FLAGS = flags.FLAGS


def _time_interleaved(fns, *args, repeats: int) -> tuple[list[float], list[np.ndarray]]:
    """Median seconds per call of each of ``fns`` and its last output; the functions alternate call
    by call, so whatever else the machine does falls on all of them alike."""
    outs = [np.asarray(fn(*args)) for fn in fns]  # compile
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = np.asarray(fn(*args))
            times[i].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times], outs


def main(argv):
    del argv
    from jaxvla.data.sequences import MARKERS, Vocab, batch_sequences, build_flow
    from jaxvla.losses import finetune as losses
    from jaxvla.stages.finetune import LATENT_CODES, TEXT_VOCAB, Models

    config = FLAGS.config
    if config.model.head != "flow":
        raise app.UsageError(f"--config: model.head={config.model.head!r}; this benchmark needs the flow head")
    chunk, action_dim, seq_len = int(config.model.chunk), 4, int(config.model.seq_len)
    vocab = Vocab(text_size=TEXT_VOCAB, image_codes=FLAGS.image_codes, latent_codes=LATENT_CODES)
    models = Models(config, vocab, action_dim)

    rng = np.random.default_rng(0)
    markers = {m: rng.integers(3, TEXT_VOCAB, size=3).astype(np.int32) for m in MARKERS}
    prompt = np.concatenate([[1], rng.integers(3, TEXT_VOCAB, size=39)]).astype(np.int32)
    image = rng.integers(0, FLAGS.image_codes, size=FLAGS.image_tokens).astype(np.int32)
    seq = build_flow(prompt, image, markers, vocab, seq_len, chunk=chunk)
    batch = batch_sequences([seq] * FLAGS.batch)
    batch = {k: batch[k] for k in ("tokens", "modality", "positions", "segment_ids", "bidirectional_ids",
                                   "action_positions")}

    ids = jnp.zeros((1, seq_len), jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    unbox = lambda tree: jax.tree.map(lambda x: getattr(x, "value", x), tree,  # noqa: E731
                                      is_leaf=lambda x: hasattr(x, "value"))
    params = unbox({
        "backbone": models.backbone.init({"params": keys[0]}, ids, ids, ids, ids + 1, ids)["params"],
        "action_encoder": models.action_encoder.init(
            {"params": keys[1]}, jnp.zeros((1, chunk, action_dim)), jnp.zeros((1,)))["params"],
        "velocity_head": models.velocity_head.init(
            {"params": keys[2]}, jnp.zeros((1, chunk, models.llama_config.dim)))["params"],
    })
    steps = int(config.model.flow_steps)
    kw = dict(**models.flow_modules, num_steps=steps)
    cached = jax.jit(functools.partial(losses.sample_action_chunk, **kw))
    recompute = jax.jit(functools.partial(losses.sample_action_chunk_recompute, **kw))
    sample_rng = jax.random.PRNGKey(1)
    (cached_s, full_s), (cached_out, full_out) = _time_interleaved(
        (cached, recompute), params, batch, sample_rng, repeats=FLAGS.repeats)

    execute = int(config.model.get("execute_steps", chunk))
    real = int(seq["segment_ids"].sum())
    print(f"backbone {config.model.size}: dim {models.llama_config.dim} x {models.llama_config.num_layers} layers; "
          f"sequence {real} real tokens of {seq_len} ({chunk} action slots); {steps} Euler steps; batch {FLAGS.batch}; "
          f"{jax.devices()[0].platform}")
    for name, seconds in (("kv-cached prefix", cached_s), ("recompute", full_s)):
        print(f"{name:>17}: {1000 * seconds:8.1f} ms per chunk, {FLAGS.batch / seconds:7.1f} chunks/s, "
              f"{FLAGS.batch * execute / seconds:7.1f} Hz executing {execute} of {chunk}")
    print(f"max |cached - recompute| = {float(np.max(np.abs(cached_out - full_out))):.2e}")
    print(f"speed-up (recompute / cached): {full_s / cached_s:.2f}x")


if __name__ == "__main__":
    app.run(main)
