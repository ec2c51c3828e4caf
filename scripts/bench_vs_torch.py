"""The jaxvla backbone train step against Hugging Face ``LlamaForCausalLM`` in PyTorch.

    python scripts/bench_vs_torch.py [--dim=512 --layers=4 --heads=8 --mlp_dim=1408 --vocab=32000
                                      --examples=8 --row_len=256 --batch=4 --seq_len=256 --steps=8
                                      --dtype=float32 --json=PATH]

Both sides train the same model from the same weights (torch's initialisation, converted with
``jaxvla.io.hf_llama``) with AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8, weight decay 0.01:
torch's defaults). Two comparisons, measured interleaved in one run (each timed iteration runs one
step of each of the four, so background load falls on all alike):

* **LAPA workload** (``speedup``): ``--examples`` LAPA pretraining examples a step, with the exact
  LAPA example layout of ``configs/pretrain.py:lapa_small`` (``<s>`` + LAPA's prompt around a real
  Meta-World MT10 instruction and the layout markers, both tokenized by the project's text
  tokenizer; 64 image tokens + eov; 4 latent codes), the tasks drawn in proportion to the embedded
  dataset's steps per task (``runs/data/metaworld_mt10_64`` when present, else uniformly). Real
  examples would need the image tokenizer and LAQ checkpoints; only their ids are random here,
  their lengths and targets are those of training. Image and latent codes are mapped to ids at the
  top of the one ``--vocab`` table (as LWM shares one vocabulary). Loss: the mean cross-entropy
  over the example's LAPA targets (text after ``<s>``, the markers and the latent codes; image
  tokens are context only), the same targets on both sides. jaxvla trains the way its
  pretraining does: the examples in the packed layout (``jaxvla.data.sequences.pack_examples``,
  rows of at most ``--row_len`` sized for the longest possible example, as many a row as pad least:
  one), attention within each
  example only, the text head applied only at the gathered targets
  (``jaxvla.losses.pretrain.modality_cross_entropy``). torch is batched the way its users batch
  on CPU: padded (right) to the batch's longest example with an ``attention_mask``, ``labels``
  -100 outside the targets.
* **same shape** (``speedup_same_shape``, ``--same_shape``): the earlier comparison, both sides
  on the same ``[--batch, --seq_len]`` batch of random tokens, next-token cross-entropy at every
  position (HF's ``labels=input_ids``), jaxvla computing the full logits like torch.

torch uses as many threads as jax's CPU client has cores (``torch.set_num_threads``), SDPA
attention, ``OMP_WAIT_POLICY=PASSIVE`` (set here before torch is imported, unless already set), and
in bf16 ``torch.autocast``; jaxvla its jitted, state-donating step with the same compute dtype.
The first and last losses of both sides are printed side by side to show the computations match.
Each side runs one warm-up step (jax: compile), then ``--steps`` timed steps; the speed-ups are
of the medians, and the LAPA one is printed last. ``--json`` writes ``speedup``, ``workload``,
``speedup_same_shape`` and the times as one JSON object.
"""

from __future__ import annotations

import os

# Before torch (and its OpenMP runtime) is imported: idle OpenMP workers sleep instead of spinning,
# so torch's threads do not steal the cores from jax's between the interleaved steps.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_integer("dim", 512, "Hidden size.", lower_bound=8)
flags.DEFINE_integer("layers", 4, "Decoder layers.", lower_bound=1)
flags.DEFINE_integer("heads", 8, "Attention heads (and key/value heads).", lower_bound=1)
flags.DEFINE_integer("mlp_dim", 1408, "SwiGLU hidden size.", lower_bound=1)
flags.DEFINE_integer("vocab", 32000, "Vocabulary (LLaMA's 32000; the text tokenizer's ids need 32000).",
                     lower_bound=32000)
flags.DEFINE_integer("examples", 8, "LAPA workload: examples a step (configs/pretrain.py:lapa_small's batch).",
                     lower_bound=1)
flags.DEFINE_integer("row_len", 256, "LAPA workload: jaxvla's packed rows hold at most this many tokens "
                     "(lapa_small's seq_len).", lower_bound=1)
flags.DEFINE_string("data_dir", os.path.join(REPO, "runs", "data", "metaworld_mt10_64"),
                    "The embedded Meta-World dataset whose steps per task weight the tasks (uniform if absent).")
flags.DEFINE_boolean("same_shape", True, "Also run the same-shape comparison (random tokens, --batch x --seq_len).")
flags.DEFINE_integer("seq_len", 256, "Same shape: tokens per sequence.", lower_bound=2)
flags.DEFINE_integer("batch", 4, "Same shape: sequences per step.", lower_bound=1)
flags.DEFINE_integer("steps", 8, "Timed steps per side.", lower_bound=1)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params stay float32).")
flags.DEFINE_enum("torch_device", "cpu", ["cpu", "cuda"], "Where torch runs (cuda: a CUDA build of torch).")
flags.DEFINE_boolean("scan_layers", True, "jaxvla: nn.scan over layers (the 7B default); false unrolls them.")
flags.DEFINE_string("attention", "", "jaxvla attention kernel (LlamaConfig.attention: '', einsum, xla, cudnn).")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the token batches.")
flags.DEFINE_string("json", None, "Write the figures to this JSON file (atomically).")
FLAGS = flags.FLAGS

LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.999), 1e-8, 0.01


def jax_threads() -> int:
    """Cores jax's CPU client runs its thread pool on (the process's CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------
# The LAPA workload


def lapa_workload(steps: int, vocab: int) -> tuple[list[list[dict]], dict, dict]:
    """(``steps`` lists of ``--examples`` LAPA examples, each a dict of ``ids`` [n] int64 and
    ``target`` [n] bool: position i is a loss target predicting ids[i + 1]; the longest possible
    example; a description). See the module docstring."""
    from jaxvla import config as cfg_lib
    from jaxvla.benchmark import MetaWorldPrompts, longest_example, realistic_examples
    from jaxvla.data.sequences import IMAGE, LATENT, Vocab, example_length

    mc = cfg_lib.load_config(os.path.join(REPO, "configs", "pretrain.py") + ":lapa_small").model
    prompts = MetaWorldPrompts.load("mt10", FLAGS.data_dir, mc.text_tokenizer)
    builder_vocab = Vocab(text_size=32000, image_codes=512, latent_codes=8)
    latent_base = vocab - builder_vocab.latent_size
    image_base = latent_base - builder_vocab.image_size

    def flatten(example):
        n = example_length(example)
        tokens = np.asarray(example["tokens"][:n], np.int64)
        modality = np.asarray(example["modality"][:n])
        ids = np.where(modality == IMAGE, image_base + tokens,
                       np.where(modality == LATENT, latent_base + tokens, tokens))
        return {"ids": ids, "target": np.asarray(example["loss_weight"][:n]) > 0}

    rng = np.random.default_rng(FLAGS.seed)
    batches = [[flatten(e) for e in realistic_examples(mc, builder_vocab, prompts, rng, FLAGS.examples)]
               for _ in range(steps)]
    longest = flatten(longest_example(mc, builder_vocab, prompts))
    lengths = [len(e["ids"]) for b in batches for e in b]
    description = {
        "name": "lapa", "layout": "configs/pretrain.py:lapa_small (prompt + <vision> 64 image codes eov </vision> "
                                  "<delta> 4 latent codes </delta>)",
        "prompts": "Meta-World MT10 instructions, LAPA template, project text tokenizer",
        "task_weights": dict(zip(prompts.tasks, np.round(prompts.weights, 4).tolist())),
        "examples_per_step": FLAGS.examples, "example_tokens_min": int(min(lengths)),
        "example_tokens_max": int(max(lengths)), "example_tokens_mean": float(np.mean(lengths)),
        "longest_possible": int(len(longest["ids"])),
        "targets_per_example_mean": float(np.mean([e["target"].sum() for b in batches for e in b])),
    }
    return batches, longest, description


def padded_batch(examples: list[dict]) -> dict:
    """torch's batch: right-padded to the longest example; ``labels`` -100 except the targets
    (HF shifts labels: label j is predicted at j - 1, so target i's label sits at i + 1)."""
    length = max(len(e["ids"]) for e in examples)
    ids = np.zeros((len(examples), length), np.int64)
    mask = np.zeros_like(ids)
    labels = np.full_like(ids, -100)
    for row, e in enumerate(examples):
        n = len(e["ids"])
        ids[row, :n] = e["ids"]
        mask[row, :n] = 1
        labels[row, 1:n] = np.where(e["target"][:n - 1], e["ids"][1:], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed_batch(examples: list[dict], layout) -> dict:
    """jaxvla's batch: ``pack_examples`` rows (segment ids, per-example positions) with weight 1
    on every target (the loss divides by the target count: the same mean as torch's)."""
    from jaxvla.data.sequences import pack_examples

    built = []
    for e in examples:
        n = len(e["ids"])
        zeros = np.zeros(n, np.int32)
        built.append({"tokens": e["ids"].astype(np.int32), "modality": zeros, "positions": np.arange(n, dtype=np.int32),
                      "segment_ids": np.ones(n, np.int32), "bidirectional_ids": zeros,
                      "targets": np.append(e["ids"][1:], 0).astype(np.int32), "target_modality": zeros,
                      "loss_weight": e["target"].astype(np.float32)})
    return pack_examples(built, layout.row_len, layout.num_rows, max_per_row=layout.examples_per_row)


# ----------------------------------------------------------------------------------------------
# The two sides


def torch_model(threads: int):
    """(torch, HF config dict, float32 state dict, make_step(): step(batch) -> loss); every
    make_step() trains its own copy of the model from the same weights."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(FLAGS.seed)
    torch.set_num_threads(threads)
    hf_config = LlamaConfig(
        vocab_size=FLAGS.vocab, hidden_size=FLAGS.dim, intermediate_size=FLAGS.mlp_dim,
        num_hidden_layers=FLAGS.layers, num_attention_heads=FLAGS.heads, num_key_value_heads=FLAGS.heads,
        max_position_embeddings=max(FLAGS.seq_len, FLAGS.row_len), rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    base = LlamaForCausalLM(hf_config)
    state_dict = {k: v.detach().float().numpy().copy() for k, v in base.state_dict().items()}
    device = torch.device(FLAGS.torch_device)
    autocast = FLAGS.dtype == "bfloat16"

    def make_step():
        model = copy.deepcopy(base).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)

        def step(batch):
            inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())  # waits for the step

        return step

    return hf_config.to_dict(), state_dict, make_step


def jax_steps(hf_config, state_dict, target_cap: int):
    """(same_shape_step(tokens) -> loss, lapa_step(packed batch) -> loss): the jaxvla backbone with
    the torch weights and the same optimizer, each step with its own parameters and state."""
    from jaxvla.io.hf_llama import hf_config_to_llama, hf_to_params
    from jaxvla.losses.pretrain import modality_cross_entropy
    from jaxvla.models.llama import Llama

    config = hf_config_to_llama(hf_config, dtype=FLAGS.dtype, scan_layers=FLAGS.scan_layers)
    if FLAGS.attention:
        import dataclasses

        config = dataclasses.replace(config, attention=FLAGS.attention)
    model = Llama(config)
    optimizer = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)

    def full_loss(params, tokens):
        b, l = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
        zeros, ones = jnp.zeros((b, l), jnp.int32), jnp.ones((b, l), jnp.int32)
        out = model.apply({"params": params}, tokens, zeros, positions, ones, zeros, heads=("text",))
        logits = out["logits"]["text"]
        logits, targets = logits[:, :-1], tokens[:, 1:]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])

    def packed_loss(params, batch):
        zeros = jnp.zeros_like(batch["tokens"])
        hidden = model.apply({"params": params}, batch["tokens"], zeros, batch["positions"], batch["segment_ids"],
                             zeros, heads=())["hidden"]
        sums = modality_cross_entropy(hidden, params["head_text"]["kernel"], batch, 0, target_cap)
        return sums["weighted_ce"] / jnp.maximum(sums["weight"], 1e-12)

    def make(loss_fn, convert):
        def train_step(params, opt_state, batch):
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        train_step = jax.jit(train_step, donate_argnums=(0, 1))
        params = jax.tree.map(jnp.asarray, hf_to_params(state_dict, config))
        holder = {"params": params, "opt_state": optimizer.init(params)}

        def step(batch):
            holder["params"], holder["opt_state"], loss = train_step(holder["params"], holder["opt_state"],
                                                                     convert(batch))
            return float(loss)  # blocks until the step is done

        return step

    same = make(full_loss, lambda tokens: jnp.asarray(tokens, jnp.int32))
    lapa = make(packed_loss, lambda batch: {k: jnp.asarray(v) for k, v in batch.items()
                                            if k in ("tokens", "positions", "segment_ids", "targets",
                                                     "target_modality", "loss_weight")})
    return same, lapa, config


def main(argv):
    del argv
    from jaxvla import compilation_cache
    from jaxvla.benchmark import write_results
    from jaxvla.data.sequences import packing_layout

    compilation_cache.enable()  # like every jaxvla entry point; timing is unaffected
    threads = jax_threads()
    lapa_batches, longest, workload = lapa_workload(FLAGS.steps + 1, FLAGS.vocab)
    caps = {"text": int(longest["target"].sum())}
    layout = packing_layout(FLAGS.examples, len(longest["ids"]), caps, FLAGS.row_len,
                            where="--row_len")
    target_cap = layout.row_caps["text"]
    torch_padded = [padded_batch(b) for b in lapa_batches]
    jax_packed = [packed_batch(b, layout) for b in lapa_batches]
    rng = np.random.default_rng(FLAGS.seed)
    same_tokens = [rng.integers(0, FLAGS.vocab, size=(FLAGS.batch, FLAGS.seq_len), dtype=np.int64)
                   for _ in range(FLAGS.steps + 1)]

    hf_config, state_dict, make_torch_step = torch_model(threads)
    jax_same, jax_lapa, llama = jax_steps(hf_config, state_dict, target_cap)
    sides = {"torch_lapa": (make_torch_step(), torch_padded), "jaxvla_lapa": (jax_lapa, jax_packed)}
    if FLAGS.same_shape:
        torch_same = make_torch_step()
        sides["torch_same"] = (lambda t: torch_same({"input_ids": t, "labels": t}), same_tokens)
        sides["jaxvla_same"] = (jax_same, same_tokens)
    losses = {name: [] for name in sides}
    times = {name: [] for name in sides}
    first_s = {}
    for name, (step, batches) in sides.items():  # warm-up (jax: compile)
        start = time.perf_counter()
        losses[name].append(step(batches[0]))
        first_s[name] = time.perf_counter() - start
    # Interleaved, so that whatever else the machine does falls on every side alike.
    for i in range(1, FLAGS.steps + 1):
        for name, (step, batches) in sides.items():
            start = time.perf_counter()
            losses[name].append(step(batches[i]))
            times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(t) for name, t in times.items()}
    params = sum(v.size for v in state_dict.values())
    real_tokens = float(np.mean([sum(len(e["ids"]) for e in b) for b in lapa_batches[1:]]))
    torch_slots = float(np.mean([b["input_ids"].size for b in torch_padded[1:]]))
    jax_slots = float(jax_packed[0]["tokens"].size)
    results = {
        "workload": dict(workload, torch_batch="padded to the batch's longest, attention_mask, labels -100",
                         jaxvla_batch=f"packed: {layout.num_rows} rows x {layout.row_len} "
                                      f"({layout.examples_per_row} examples a row)",
                         real_tokens_per_step=real_tokens, torch_padding_fraction=1 - real_tokens / torch_slots,
                         jaxvla_padding_fraction=1 - real_tokens / jax_slots),
        "model": dict(dim=FLAGS.dim, layers=FLAGS.layers, heads=FLAGS.heads, mlp_dim=FLAGS.mlp_dim, vocab=FLAGS.vocab,
                      params=int(params), dtype=FLAGS.dtype, jaxvla_attention=llama.attention or "default",
                      jaxvla_layers="scanned" if FLAGS.scan_layers else "unrolled"),
        "machine": dict(jax_devices=f"{jax.devices()[0].device_kind} x {jax.device_count()}", jax_threads=threads,
                        torch_device=FLAGS.torch_device, torch_threads=threads,
                        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY")),
        "steps": FLAGS.steps,
        "ms": {name: 1000 * m for name, m in median.items()},
        "first_loss": {name: v[0] for name, v in losses.items()},
        "last_loss": {name: v[-1] for name, v in losses.items()},
        "jaxvla_compile_and_first_step_s": {name: s for name, s in first_s.items() if name.startswith("jaxvla")},
        "real_tokens_per_s": {name: real_tokens / median[name] for name in ("torch_lapa", "jaxvla_lapa")},
        "speedup": median["torch_lapa"] / median["jaxvla_lapa"],
    }
    print(f"model        LLaMA dim {FLAGS.dim}, {FLAGS.layers} layers, {FLAGS.heads} heads, mlp {FLAGS.mlp_dim}, "
          f"vocab {FLAGS.vocab} ({params / 1e6:.1f}M params); {FLAGS.dtype}; jaxvla layers "
          f"{results['model']['jaxvla_layers']}, attention {results['model']['jaxvla_attention']}")
    print(f"machine      {results['machine']['jax_devices']} (jax, {threads} cores), torch on {FLAGS.torch_device} "
          f"with {threads} threads, OMP_WAIT_POLICY={results['machine']['omp_wait_policy']}")
    print(f"LAPA         {FLAGS.examples} examples a step of {workload['example_tokens_min']}-"
          f"{workload['example_tokens_max']} tokens (mean {workload['example_tokens_mean']:.1f}, "
          f"{workload['targets_per_example_mean']:.1f} targets); torch padded to the longest "
          f"(padding {results['workload']['torch_padding_fraction']:.3f}), jaxvla packed "
          f"{layout.num_rows} x {layout.row_len} (padding {results['workload']['jaxvla_padding_fraction']:.3f})")
    if FLAGS.same_shape:
        results.update(speedup_same_shape=median["torch_same"] / median["jaxvla_same"],
                       same_shape=dict(batch=FLAGS.batch, seq_len=FLAGS.seq_len, tokens="random",
                                       loss="next-token CE at every position"))
        print(f"same shape   {FLAGS.batch} x {FLAGS.seq_len} random tokens on both sides, CE at every position")
    for name in sides:
        print(f"{name:<12} {median[name] * 1e3:8.1f} ms/step (min {min(times[name]) * 1e3:.1f}); loss first "
              f"{losses[name][0]:.5f} last {losses[name][-1]:.5f}")
    for name in ("torch_lapa", "jaxvla_lapa"):
        print(f"{name:<12} {results['real_tokens_per_s'][name]:,.0f} real tokens/s")
    if FLAGS.same_shape:
        print(f"speed-up, same shape (torch / jaxvla): {results['speedup_same_shape']:.2f}x")
    if FLAGS.json:
        write_results(FLAGS.json, results)
        print(f"wrote {FLAGS.json}")
    print(f"speed-up, LAPA workload (torch padded to the longest / jaxvla packed): {results['speedup']:.2f}x")


if __name__ == "__main__":
    app.run(main)
