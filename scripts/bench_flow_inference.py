"""Flow-matching inference benchmark: the KV-cached prefix vs recomputing the whole sequence at
every Euler step, both on the UNPADDED sequence.

    python scripts/bench_flow_inference.py [--config=configs/finetune.py:flow_small] [--batch=1]
        [--repeats=20] [--task=reach] [--also_padded] [--json=PATH]

Builds the finetuning config's flow model (random weights: timing does not depend on them) and
one real-length sequence: the LAPA prompt of a Meta-World task's instruction (``--task``) and the
layout markers, both tokenized by the project's text tokenizer, the image tokenizer's 64 tokens,
and the ``model.chunk`` action slots, with no padding (length = prefix + chunk, not
``model.seq_len``). Then it times the two jitted samplers of ``jaxvla/losses/finetune.py`` on it,
alternating call by call: ``sample_action_chunk`` (prefix prefilled once, each Euler step runs
only the K action tokens) and ``sample_action_chunk_recompute`` (the whole unpadded sequence every
step). ``--also_padded`` times the recompute on the sequence padded to ``model.seq_len`` too (the
old, flattering baseline; reported as ``speedup_vs_padded``).

Prints ms per chunk, chunks per second, the control rate when executing ``model.execute_steps``
of every chunk, the largest difference between the two samplers' chunks, and last the speed-up
(recompute / cached). ``--json`` writes ``speedup``, ``cached_ms``, ``recompute_ms``, ... as one
JSON object.
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

from jaxvla import compilation_cache  # noqa: E402
from jaxvla.benchmark import write_results  # noqa: E402
from jaxvla.data.sequences import Vocab, batch_sequences, build_flow, example_length  # noqa: E402
from jaxvla.frozen import LATENT_CODES, TEXT_VOCAB, FinetuneModels, TextPrompts  # noqa: E402
from jaxvla.losses import finetune as losses  # noqa: E402
from jaxvla.sim.instructions import instruction  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs", "finetune.py") + ":flow_small",
                                "A finetuning config (flow head).", lock_config=True)
flags.DEFINE_integer("batch", 1, "Chunks sampled per call (1: one robot).", lower_bound=1)
flags.DEFINE_integer("repeats", 20, "Timed calls per sampler (after one compiling call).", lower_bound=1)
flags.DEFINE_integer("image_codes", 512, "Image tokenizer codebook size (the small VQGAN's).", lower_bound=1)
flags.DEFINE_integer("image_tokens", 64, "Image tokens per frame (64 px / 8).", lower_bound=1)
flags.DEFINE_string("task", "reach", "Meta-World task whose instruction is the prompt (reach: 27 ids, about the "
                    "MT10 median; MT10 spans 26-34).")
flags.DEFINE_boolean("also_padded", False, "Also time the recompute on the sequence padded to model.seq_len.")
flags.DEFINE_string("json", None, "Write the figures to this JSON file (atomically).")
FLAGS = flags.FLAGS


def _time_interleaved(fns, *args, repeats: int) -> tuple[list[float], list[np.ndarray]]:
    """Median seconds per call of each of ``fns`` (``fn(*args_i)``, ``args[i]`` its arguments) and
    its last output; the functions alternate call by call, so whatever else the machine does falls
    on all of them alike."""
    outs = [np.asarray(fn(*a)) for fn, a in zip(fns, args)]  # compile
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, (fn, a) in enumerate(zip(fns, args)):
            start = time.perf_counter()
            outs[i] = np.asarray(fn(*a))
            times[i].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times], outs


def flow_sequence(prompt, image, markers, vocab, chunk: int, max_len: int | None) -> dict:
    """``build_flow``'s sequence, of exactly its real length when ``max_len`` is None."""
    if max_len is None:
        # Built once at a generous length to measure it, then at exactly that length.
        max_len = example_length(build_flow(prompt, image, markers, vocab, 1 << 16, chunk=chunk))
    return build_flow(prompt, image, markers, vocab, max_len, chunk=chunk)


def main(argv):
    del argv
    compilation_cache.enable()  # like every jaxvla entry point; timing is unaffected
    config = FLAGS.config
    if config.model.head != "flow":
        raise app.UsageError(f"--config: model.head={config.model.head!r}; this benchmark needs the flow head")
    try:
        sentence = instruction(FLAGS.task)
    except ValueError as e:
        raise app.UsageError(f"--task: {e}") from None
    chunk, action_dim, seq_len = int(config.model.chunk), 4, int(config.model.seq_len)
    vocab = Vocab(text_size=TEXT_VOCAB, image_codes=FLAGS.image_codes, latent_codes=LATENT_CODES)
    models = FinetuneModels(config, vocab, action_dim)

    text = TextPrompts(config.model.get("text_tokenizer", ""))
    prompt = np.asarray(text(sentence))
    rng = np.random.default_rng(0)
    image = rng.integers(0, FLAGS.image_codes, size=FLAGS.image_tokens).astype(np.int32)
    keys = ("tokens", "modality", "positions", "segment_ids", "bidirectional_ids", "action_positions")

    def batch_of(max_len):
        seq = flow_sequence(prompt, image, text.markers, vocab, chunk, max_len)
        stacked = batch_sequences([seq] * FLAGS.batch)
        return {k: stacked[k] for k in keys}, seq

    batch, seq = batch_of(None)
    real = int(seq["segment_ids"].sum())
    if real > seq_len:
        raise app.UsageError(f"the sequence has {real} tokens, more than model.seq_len={seq_len}")

    ids = jnp.zeros((1, seq_len), jnp.int32)
    init_keys = jax.random.split(jax.random.PRNGKey(0), 3)
    unbox = lambda tree: jax.tree.map(lambda x: getattr(x, "value", x), tree,  # noqa: E731
                                      is_leaf=lambda x: hasattr(x, "value"))
    params = unbox({
        "backbone": models.backbone.init({"params": init_keys[0]}, ids, ids, ids, ids + 1, ids)["params"],
        "action_encoder": models.action_encoder.init(
            {"params": init_keys[1]}, jnp.zeros((1, chunk, action_dim)), jnp.zeros((1,)))["params"],
        "velocity_head": models.velocity_head.init(
            {"params": init_keys[2]}, jnp.zeros((1, chunk, models.llama_config.dim)))["params"],
    })
    steps = int(config.model.flow_steps)
    kw = dict(**models.flow_modules, num_steps=steps)
    cached = jax.jit(functools.partial(losses.sample_action_chunk, **kw))
    recompute = jax.jit(functools.partial(losses.sample_action_chunk_recompute, **kw))
    sample_rng = jax.random.PRNGKey(1)
    fns, args = [cached, recompute], [(params, batch, sample_rng), (params, batch, sample_rng)]
    if FLAGS.also_padded:
        padded_batch, _ = batch_of(seq_len)
        fns.append(recompute)
        args.append((params, padded_batch, sample_rng))
    seconds, outs = _time_interleaved(fns, *args, repeats=FLAGS.repeats)
    cached_s, full_s = seconds[:2]

    execute = int(config.model.get("execute_steps", chunk))
    llama = models.llama_config
    results = {
        "backbone": dict(size=config.model.size, dim=llama.dim, num_layers=llama.num_layers,
                         num_heads=llama.num_heads, mlp_dim=llama.mlp_dim, dtype=llama.dtype),
        "platform": jax.devices()[0].platform, "batch": FLAGS.batch, "euler_steps": steps, "chunk": chunk,
        "execute_steps": execute, "task": FLAGS.task, "prompt_tokens": int(prompt.size), "sequence_tokens": real,
        "seq_len": seq_len, "repeats": FLAGS.repeats,
        "cached_ms": 1000 * cached_s, "recompute_ms": 1000 * full_s,
        "cached_chunks_per_s": FLAGS.batch / cached_s, "cached_hz": FLAGS.batch * execute / cached_s,
        "max_abs_difference": float(np.max(np.abs(outs[0] - outs[1]))),
        "speedup": full_s / cached_s,
    }
    print(f"backbone {config.model.size}: dim {llama.dim} x {llama.num_layers} layers; sequence {real} tokens, "
          f"no padding (prompt {prompt.size} of {FLAGS.task!r}, {FLAGS.image_tokens} image tokens, markers, "
          f"{chunk} action slots); {steps} Euler steps; batch {FLAGS.batch}; {results['platform']}")
    rows = [("kv-cached prefix", cached_s), ("recompute", full_s)]
    if FLAGS.also_padded:
        padded_s = seconds[2]
        results.update(recompute_padded_ms=1000 * padded_s, speedup_vs_padded=padded_s / cached_s)
        rows.append((f"recompute, padded to {seq_len}", padded_s))
    for name, s in rows:
        print(f"{name:>28}: {1000 * s:8.1f} ms per chunk, {FLAGS.batch / s:7.1f} chunks/s, "
              f"{FLAGS.batch * execute / s:7.1f} Hz executing {execute} of {chunk}")
    print(f"max |cached - recompute| = {results['max_abs_difference']:.2e}")
    if FLAGS.also_padded:
        print(f"speed-up against the padded recompute: {results['speedup_vs_padded']:.2f}x")
    if FLAGS.json:
        write_results(FLAGS.json, results)
        print(f"wrote {FLAGS.json}")
    print(f"speed-up (recompute on the unpadded sequence / cached): {results['speedup']:.2f}x")


if __name__ == "__main__":
    app.run(main)
