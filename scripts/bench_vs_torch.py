"""The jaxvla backbone train step against Hugging Face ``LlamaForCausalLM`` in PyTorch.

    python scripts/bench_vs_torch.py [--dim=512 --layers=4 --heads=8 --mlp_dim=1408 --vocab=32000
                                      --seq_len=256 --batch=4 --steps=8 --dtype=float32]

Both sides train the same model from the same weights (torch's initialisation, converted with
``jaxvla.io.hf_llama``) on the same token batches: full next-token cross-entropy over every
position (HF's ``labels=input_ids`` loss), backward, AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8,
weight decay 0.01: torch's defaults). torch uses all cores (``torch.set_num_threads``), SDPA
attention, and in bf16 ``torch.autocast``; jaxvla its jitted, state-donating step with the same
compute dtype. The first-step losses are printed side by side to show the computations match.
Each side runs one warm-up step (jax: compile), then ``--steps`` timed steps, the two sides
alternating step by step; the speed-up of the medians is printed last.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_integer("dim", 512, "Hidden size.")
flags.DEFINE_integer("layers", 4, "Decoder layers.")
flags.DEFINE_integer("heads", 8, "Attention heads (and key/value heads).")
flags.DEFINE_integer("mlp_dim", 1408, "SwiGLU hidden size.")
flags.DEFINE_integer("vocab", 32000, "Vocabulary (LLaMA's 32000).")
flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
flags.DEFINE_integer("batch", 4, "Sequences per step.")
flags.DEFINE_integer("steps", 8, "Timed steps per side.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params stay float32).")
flags.DEFINE_boolean("scan_layers", True, "jaxvla: nn.scan over layers (the 7B default); false unrolls them.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the token batches.")
FLAGS = flags.FLAGS

LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.999), 1e-8, 0.01


def token_batches(steps: int) -> list[np.ndarray]:
    rng = np.random.default_rng(FLAGS.seed)
    return [rng.integers(0, FLAGS.vocab, size=(FLAGS.batch, FLAGS.seq_len), dtype=np.int64) for _ in range(steps)]


def torch_side():
    """(HF config dict, float32 state dict, step(tokens) -> loss)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(FLAGS.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    hf_config = LlamaConfig(
        vocab_size=FLAGS.vocab, hidden_size=FLAGS.dim, intermediate_size=FLAGS.mlp_dim,
        num_hidden_layers=FLAGS.layers, num_attention_heads=FLAGS.heads, num_key_value_heads=FLAGS.heads,
        max_position_embeddings=FLAGS.seq_len, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(hf_config).train()
    state_dict = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    autocast = FLAGS.dtype == "bfloat16"

    def step(tokens):
        ids = torch.from_numpy(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return hf_config.to_dict(), state_dict, step


def jax_side(hf_config, state_dict):
    """step(tokens) -> loss of the jaxvla backbone with the same weights and optimizer."""
    from jaxvla.io.hf_llama import hf_config_to_llama, hf_to_params
    from jaxvla.models.llama import Llama

    config = hf_config_to_llama(hf_config, dtype=FLAGS.dtype, scan_layers=FLAGS.scan_layers)
    model = Llama(config)
    params = jax.tree.map(jnp.asarray, hf_to_params(state_dict, config))
    optimizer = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)
    b, l = FLAGS.batch, FLAGS.seq_len
    positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    zeros, ones = jnp.zeros((b, l), jnp.int32), jnp.ones((b, l), jnp.int32)

    def loss_fn(params, tokens):
        logits = model.apply({"params": params}, tokens, zeros, positions, ones, zeros, heads=("text",))["logits"]["text"]
        logits, targets = logits[:, :-1], tokens[:, 1:]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])

    def train_step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    holder = {"params": params, "opt_state": optimizer.init(params)}

    def step(tokens):
        holder["params"], holder["opt_state"], loss = train_step(holder["params"], holder["opt_state"],
                                                                 jnp.asarray(tokens, jnp.int32))
        return float(loss)  # blocks until the step is done

    return step


def main(argv):
    del argv
    batches = token_batches(FLAGS.steps + 1)
    hf_config, state_dict, torch_step = torch_side()
    jax_step = jax_side(hf_config, state_dict)
    losses = {"torch": [torch_step(batches[0])]}
    start = time.perf_counter()
    losses["jaxvla"] = [jax_step(batches[0])]
    jax_first_s = time.perf_counter() - start
    # Interleaved, so that whatever else the machine does falls on both sides alike.
    times = {"torch": [], "jaxvla": []}
    for tokens in batches[1:]:
        for name, step in (("torch", torch_step), ("jaxvla", jax_step)):
            t0 = time.perf_counter()
            losses[name].append(step(tokens))
            times[name].append(time.perf_counter() - t0)
    params = sum(v.size for v in state_dict.values())
    tokens = FLAGS.batch * FLAGS.seq_len
    torch_s, jax_s = statistics.median(times["torch"]), statistics.median(times["jaxvla"])
    print(f"model        LLaMA dim {FLAGS.dim}, {FLAGS.layers} layers, {FLAGS.heads} heads, mlp {FLAGS.mlp_dim}, "
          f"vocab {FLAGS.vocab} ({params / 1e6:.1f}M params); batch {FLAGS.batch} x {FLAGS.seq_len} tokens; {FLAGS.dtype}; "
          f"jaxvla layers {'scanned' if FLAGS.scan_layers else 'unrolled'}")
    print(f"machine      {jax.devices()[0].device_kind} x {jax.device_count()} (jax), torch threads {os.cpu_count()}")
    print(f"first loss   torch {losses['torch'][0]:.5f}   jaxvla {losses['jaxvla'][0]:.5f}   (same weights, same tokens)")
    print(f"last loss    torch {losses['torch'][-1]:.5f}   jaxvla {losses['jaxvla'][-1]:.5f}   "
          f"(after {len(batches) - 1} AdamW updates)")
    for name, median in (("torch", torch_s), ("jaxvla", jax_s)):
        print(f"{name:<12} {median * 1e3:8.1f} ms/step  (min {min(times[name]) * 1e3:.1f}), {tokens / median:,.0f} tokens/s")
    print(f"jaxvla compile + first step {jax_first_s:.1f} s")
    print(f"speed-up (torch step / jaxvla step) {torch_s / jax_s:.2f}x")


if __name__ == "__main__":
    app.run(main)
