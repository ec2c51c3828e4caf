"""Where the bins policy's decoding time goes: the KV-cached greedy decoder's cost per decoded
token against the length of the cache it carries.

    python scripts/bench_bins_decode.py [--config=configs/finetune.py:bins_small] [--rows=10]
        [--prefix=216] [--longer=1000] [--repeats=5] [--json=PATH]

Builds the finetuning config's bins backbone (random weights: timing does not depend on them)
and ``--rows`` rows (10: the evaluation's batch of environments) of ``--prefix`` prefix tokens
(216: the ``day`` protocol's prompt, state, two frames and markers) followed by the chunk's
``model.chunk`` x 4 bin slots (56), no padding. It times, alternating call by call so that
whatever else the machine does falls on all of them alike:

* the prefill alone (the backbone on the whole rows, the action head at every position);
* ``losses.finetune.predict_bins_cached`` (prefill, then one token per step for the other 55
  bins: what a policy and the held-out checks run);
* the same two on rows whose prefix is ``--longer`` tokens longer, so the cache the decoder
  carries is that much longer while the tokens decoded are the same.

Per decoded token: (decoder - prefill) / (bins - 1). A step attends one query per row to the
cache, a few MFLOP at these sizes, so its cost should hardly depend on the cache's length. The
figure printed last is the ratio of the per-token costs (longer cache / real cache); near 1 means
the step is compute of its own token, well above 1 that it moves the cache (every step writes a
new stacked ``[layers, rows, cache, kv_heads, head_dim]`` cache out of the layer scan).
``--json`` writes the figures as one JSON object.
"""

from __future__ import annotations

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
from jaxvla.data.sequences import Vocab  # noqa: E402
from jaxvla.frozen import LATENT_CODES, TEXT_VOCAB, FinetuneModels  # noqa: E402
from jaxvla.losses import finetune as losses  # noqa: E402
from jaxvla.models.llama import MODALITIES  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs", "finetune.py") + ":bins_small",
                                "A finetuning config (bins head).", lock_config=True)
flags.DEFINE_integer("rows", 10, "Rows decoded per call (10: the evaluation's batch of environments).",
                     lower_bound=1)
flags.DEFINE_integer("prefix", 216, "Prefix tokens before the bin slots (the day protocol's bins rows).",
                     lower_bound=1)
flags.DEFINE_integer("longer", 1000, "Extra prefix tokens of the second measurement.", lower_bound=1)
flags.DEFINE_integer("repeats", 5, "Timed calls of each function (after one compiling call).", lower_bound=1)
flags.DEFINE_string("json", None, "Write the figures to this JSON file (atomically).")
FLAGS = flags.FLAGS

ACTION_DIM = 4  # Meta-World


def bins_batch(rows: int, prefix: int, bins: int, text_vocab: int) -> dict:
    """``rows`` identical-layout rows: ``prefix`` text-modality tokens, then ``bins`` action slots
    (the action modality, action id 0), one segment, causal, positions 0..L-1; ``action_positions`` [R, T]."""
    length = prefix + bins
    rng = np.random.default_rng(0)
    tokens = np.zeros((rows, length), np.int32)
    tokens[:, :prefix] = rng.integers(1, text_vocab, size=(rows, prefix))
    modality = np.zeros((rows, length), np.int32)
    modality[:, prefix:] = MODALITIES.index("action")
    return {"tokens": tokens, "modality": modality,
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
            "segment_ids": np.ones((rows, length), np.int32),
            "bidirectional_ids": np.zeros((rows, length), np.int32),
            "action_positions": np.broadcast_to(np.arange(prefix, length, dtype=np.int32), (rows, bins)).copy()}


def main(argv):
    del argv
    compilation_cache.enable()
    config = FLAGS.config
    if config.model.head != "bins":
        raise app.UsageError(f"--config: model.head={config.model.head!r}; this benchmark needs the bins head")
    vocab = Vocab(text_size=TEXT_VOCAB, image_codes=512, latent_codes=LATENT_CODES)
    backbone = FinetuneModels(config, vocab, ACTION_DIM).backbone
    bins = int(config.model.chunk) * ACTION_DIM
    batches = {name: {k: jnp.asarray(v) for k, v in bins_batch(FLAGS.rows, prefix, bins, TEXT_VOCAB).items()}
               for name, prefix in (("real", FLAGS.prefix), ("longer", FLAGS.prefix + FLAGS.longer))}
    b = batches["real"]
    params = {"backbone": jax.jit(lambda: backbone.init(jax.random.PRNGKey(0), b["tokens"], b["modality"],
                                                        b["positions"], b["segment_ids"],
                                                        b["bidirectional_ids"]))()["params"]}

    @jax.jit
    def prefill(params, batch):
        return backbone.apply({"params": params["backbone"]}, batch["tokens"], batch["modality"],
                              batch["positions"], batch["segment_ids"], batch["bidirectional_ids"],
                              heads=("action",))["logits"]["action"]

    decode = jax.jit(lambda params, batch: losses.predict_bins_cached(params, batch, backbone=backbone))
    calls = [(name, kind, fn, batch) for name, batch in batches.items()
             for kind, fn in (("prefill", prefill), ("decoder", decode))]
    for _, _, fn, batch in calls:
        jax.block_until_ready(fn(params, batch))  # compile
    times = {(name, kind): [] for name, kind, _, _ in calls}
    for _ in range(FLAGS.repeats):
        for name, kind, fn, batch in calls:
            start = time.perf_counter()
            jax.block_until_ready(fn(params, batch))
            times[(name, kind)].append(time.perf_counter() - start)
    median = {key: float(np.median(v)) for key, v in times.items()}
    results = {"rows": FLAGS.rows, "bins": bins, "prefix_tokens": FLAGS.prefix, "longer_tokens": FLAGS.longer,
               "repeats": FLAGS.repeats, "config": str(config.model.size), "devices": str(jax.devices())}
    for name in batches:
        per_token = (median[(name, "decoder")] - median[(name, "prefill")]) / (bins - 1)
        cache = FLAGS.prefix + (FLAGS.longer if name == "longer" else 0) + bins
        results[name] = {"cache_slots": cache, "prefill_ms": 1e3 * median[(name, "prefill")],
                         "decoder_ms": 1e3 * median[(name, "decoder")], "per_token_ms": 1e3 * per_token,
                         "decode_share": 1 - median[(name, "prefill")] / median[(name, "decoder")]}
        print(f"{name:6s} cache {cache:5d} slots: prefill {results[name]['prefill_ms']:7.1f} ms, decoder "
              f"{results[name]['decoder_ms']:7.1f} ms ({100 * results[name]['decode_share']:.0f} % after the "
              f"prefill), {results[name]['per_token_ms']:.2f} ms per decoded token")
    results["per_token_ratio"] = results["longer"]["per_token_ms"] / results["real"]["per_token_ms"]
    results["cache_ratio"] = results["longer"]["cache_slots"] / results["real"]["cache_slots"]
    if FLAGS.json:
        write_results(FLAGS.json, results)
    print(f"per-token cost, cache x{results['cache_ratio']:.1f} longer / real: {results['per_token_ratio']:.2f}")


if __name__ == "__main__":
    app.run(main)
