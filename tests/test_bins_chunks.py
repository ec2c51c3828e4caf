"""The discrete ("bins") finetuning head on chunks of K actions (ViPRA-AR; K = 1 is LAPA's single
action): the chunked loss against a per-token cross-entropy written out here, padded chunk steps
carrying no loss, the KV-cached greedy decoder against re-running the sequence per token (packed
rows and single examples), the eval metrics against their definition, and the real stage's packer
on 14-action chunks with padded steps. A tiny random backbone: every test runs in seconds."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvla.data import sequences as S
from tests.test_packing import FT_MARKERS, INPUTS, TINY_VOCAB, StubFrames, tiny_model

K, A = 3, 4  # a 3-step chunk of 4-dim actions: T = 12 bin tokens an example
T = K * A
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def chunk_examples(prompt_lengths, valid_steps, seed=0, mask=True):
    """One bins example per prompt length with a random ``[K, A]`` chunk of bins whose first
    ``valid_steps[i]`` steps are real (the rest padding, weight 0 when ``mask``). Returns the
    examples, the bins ``[N, K, A]`` and the step masks ``[N, K]``."""
    from jaxvla.stages.finetune import mask_padded_steps

    rng = np.random.default_rng(seed)
    examples, bins, masks = [], [], []
    for n, valid in zip(prompt_lengths, valid_steps):
        prompt = np.concatenate([[1], rng.integers(3, 128, n - 1)])
        chunk = rng.integers(0, TINY_VOCAB.action_bins, (K, A)).astype(np.int32)
        steps = np.arange(K) < valid
        example = S.build_bins(prompt, rng.integers(0, 62, 8), chunk, FT_MARKERS, TINY_VOCAB, 64)
        examples.append(mask_padded_steps(example, steps, A) if mask else example)
        bins.append(chunk)
        masks.append(steps)
    return examples, np.stack(bins), np.stack(masks)


def pack(examples, bins, masks, per_row, **extra):
    from jaxvla.stages.finetune import pack_bins

    longest = max(examples, key=S.example_length)
    n = S.example_length(longest)
    # Every example holds T action targets when all its steps are real: the cap of the longest.
    caps = dict(S.example_target_counts(longest), action=T)
    layout = S.packing_layout(len(examples), n, caps, per_row * n, examples_per_row=per_row)
    per_example = {"action_bins": bins.reshape(len(bins), T), "action_pad_mask": masks, **extra}
    return pack_bins(examples, per_example, layout), layout


@functools.lru_cache(maxsize=None)
def _action_logits():
    model, _ = tiny_model()
    return jax.jit(lambda p, *inputs: model.apply({"params": p}, *inputs, heads=("action",))["logits"]["action"])


def alone_logits(params, example):
    """float64 ``[L, V]`` action logits of one built example run alone in its own ``[1, L]`` row
    (the builder's padding is segment 0: never attended)."""
    out = _action_logits()(params["backbone"], *(jnp.asarray(example[k])[None] for k in INPUTS))
    return np.asarray(out[0], np.float64)


def test_chunked_loss_equals_the_per_token_cross_entropy():
    """The loss of packed chunk examples = the sum over the real steps' bin tokens of
    ``logsumexp(logits) - logit[bin]`` (each read one position before its token, each example run
    alone) divided by N x T; ``cross_entropy`` is the mean over real tokens, ``valid_fraction`` their
    share, ``action_token_accuracy`` the teacher-forced argmax hits among them."""
    from jaxvla.losses.finetune import binned_action_loss

    model, params = tiny_model()
    examples, bins, masks = chunk_examples([5, 9, 7, 4], [3, 2, 1, 3])
    batch, layout = pack(examples, bins, masks, per_row=2)
    assert batch["action_positions"].shape == batch["action_bins"].shape == (2, 2, T)
    # The row's tokens at action_positions are the chunk's bins, time-major (step 0's A bins first).
    rows = np.arange(2)[:, None, None]
    np.testing.assert_array_equal(batch["tokens"][rows, batch["action_positions"]], bins.reshape(2, 2, T))
    loss, metrics = jax.jit(functools.partial(binned_action_loss, rng=None, backbone=model,
                                              max_targets=layout.row_caps["action"]))(params, batch)

    ce, hits = [], []
    for example, chunk, steps in zip(examples, bins, masks):
        logits = alone_logits(params, example)
        for t, position in enumerate(example["action_positions"]):
            if not steps[t // A]:
                continue  # a padded step: not a target
            row = logits[position - 1]
            log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
            ce.append(log_z - row[chunk.reshape(-1)[t]])
            hits.append(np.argmax(row) == chunk.reshape(-1)[t])
    real = int(masks.sum()) * A
    assert len(ce) == real == 9 * A
    assert float(loss) == pytest.approx(np.sum(ce) / (len(examples) * T), rel=1e-5)
    assert float(metrics["cross_entropy"]) == pytest.approx(np.mean(ce), rel=1e-5)
    assert float(metrics["valid_fraction"]) == pytest.approx(real / (len(examples) * T), rel=1e-6)
    assert float(metrics["action_token_accuracy"]) == pytest.approx(np.mean(hits), abs=1e-6)


def test_padded_chunk_steps_carry_no_loss():
    """The bins of padded steps have loss weight 0 (the real ones 1 / T): rewriting them (token and
    target) changes neither the loss nor its gradients, while rewriting one real bin does; without
    the mask the same rewrite changes the loss (so the check can fail)."""
    from jaxvla.losses.finetune import binned_action_loss

    model, params = tiny_model()
    valid = [3, 1, 2, 2]
    examples, bins, masks = chunk_examples([6, 8, 5, 9], valid, seed=3)
    batch, layout = pack(examples, bins, masks, per_row=2)
    slots = batch["action_positions"]  # [R, d, T]
    weights = np.take_along_axis(batch["loss_weight"], (slots - 1).reshape(2, -1), axis=1).reshape(2, 2, T)
    real = np.repeat(masks.reshape(2, 2, K), A, axis=-1)  # [R, d, T]
    np.testing.assert_array_equal(weights, np.where(real, np.float32(1 / T), 0.0))

    grad = jax.jit(jax.value_and_grad(functools.partial(binned_action_loss, rng=None, backbone=model,
                                                        max_targets=layout.row_caps["action"]), has_aux=True))

    def rewrite(batch, where):
        """New bins at the slots ``where`` [R, d, T] selects, in the tokens and the targets."""
        out = {k: np.array(v, copy=True) for k, v in batch.items()}
        r, e, t = np.nonzero(where)
        positions = slots[r, e, t]
        new = (out["tokens"][r, positions] + 1 + np.arange(r.size)) % TINY_VOCAB.action_bins
        out["tokens"][r, positions] = new
        out["targets"][r, positions - 1] = new
        return out

    (base, _), base_grads = grad(params, batch)
    (padded, _), padded_grads = grad(params, rewrite(batch, ~real))
    assert (~real).sum() == 4 * A
    assert float(padded) == float(base)
    for got, want in zip(jax.tree.leaves(padded_grads), jax.tree.leaves(base_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-9)
    one_real = np.zeros_like(real)
    one_real[1, 0, 0] = True  # example 2's first bin
    (changed, _), _ = grad(params, rewrite(batch, one_real))
    assert float(changed) != float(base)

    unmasked, _, _ = chunk_examples([6, 8, 5, 9], valid, seed=3, mask=False)
    plain, _ = pack(unmasked, bins, masks, per_row=2)
    (plain_base, _), _ = grad(params, plain)
    (plain_padded, _), _ = grad(params, rewrite(plain, ~real))
    assert float(plain_padded) != float(plain_base)


def reference_decode(params, example):
    """Greedy decoding written out for one example alone: T full passes of the unpadded sequence,
    the argmax bin at each slot (read one position before) written in before the next."""
    n = S.example_length(example)
    example = {k: np.array(v, copy=True) for k, v in example.items()}
    picks = []
    for position in example["action_positions"]:
        logits = alone_logits(params, example)
        picks.append(int(np.argmax(logits[position - 1])))
        example["tokens"][position] = picks[-1]
        assert position < n
    return np.asarray(picks, np.int32)


def test_cached_decode_equals_uncached_greedy_for_chunks():
    """T = K x A bins decoded with the prefix in a KV cache (prefill once, one token a step) equal
    the uncached greedy decoder and the decoding written out above, on packed rows ``[R, d, T]``
    and on one example a row ``[B, T]`` (a policy's layout); the decisions are not near-ties."""
    from jaxvla.losses.finetune import predict_bins_cached, predict_bins_greedy

    model, params = tiny_model()
    examples, bins, masks = chunk_examples([5, 10, 7, 6], [3, 3, 2, 3], seed=7)
    batch, _ = pack(examples, bins, masks, per_row=2)
    cached = jax.jit(functools.partial(predict_bins_cached, backbone=model))
    greedy = jax.jit(functools.partial(predict_bins_greedy, backbone=model))
    packed_cached = np.asarray(cached(params, batch))
    assert packed_cached.shape == (2, 2, T) and packed_cached.dtype == np.int32
    expected = np.stack([reference_decode(params, e) for e in examples]).reshape(2, 2, T)
    np.testing.assert_array_equal(np.asarray(greedy(params, batch)), expected)
    np.testing.assert_array_equal(packed_cached, expected)
    alone = S.batch_sequences([{k: e[k] for k in (*S.SEQUENCE_KEYS, "action_positions")} for e in examples])
    single = np.asarray(cached(params, alone))
    assert single.shape == (4, T)
    np.testing.assert_array_equal(single, expected.reshape(4, T))
    # A meaningful comparison: the decoded path's top-2 logit gaps dwarf float rounding, and the
    # decoder does not emit one bin everywhere.
    gaps = []
    for example, picks in zip(examples, expected.reshape(4, T)):
        example = dict(example, tokens=np.array(example["tokens"], copy=True))
        example["tokens"][example["action_positions"]] = picks
        logits = alone_logits(params, example)[example["action_positions"] - 1]
        top = np.sort(logits, axis=-1)
        gaps.append(top[:, -1] - top[:, -2])
    assert np.min(gaps) > 1e-5
    assert len(np.unique(expected)) > 3


def test_bins_eval_metrics_first_action_and_chunk():
    """``action_mse`` / ``action_l1``: the first decoded action's error; ``chunk_action_mse``: every
    real step's; ``greedy_bin_accuracy``: hits among the real steps' bins. Computed here from the
    decoded bins and the centres table."""
    from jaxvla.losses.finetune import bins_eval_metrics, predict_bins_cached

    model, params = tiny_model()
    examples, bins, masks = chunk_examples([5, 8, 6, 9], [3, 1, 2, 3], seed=11)
    rng = np.random.default_rng(0)
    centres = np.sort(rng.normal(size=(A, TINY_VOCAB.action_bins)), axis=-1).astype(np.float32)
    actions = rng.normal(size=(4, K, A)).astype(np.float32)
    batch, layout = pack(examples, bins, masks, per_row=2, action=actions,
                         bin_centres=np.broadcast_to(centres, (4, A, TINY_VOCAB.action_bins)))
    metrics = jax.jit(functools.partial(bins_eval_metrics, rng=None, backbone=model,
                                        max_targets=layout.row_caps["action"]))(params, batch)
    decoded_bins = np.asarray(jax.jit(functools.partial(predict_bins_cached, backbone=model))(params, batch))
    steps = decoded_bins.reshape(4, K, A)
    decoded = centres[np.arange(A), steps]  # [N, K, A]
    error = decoded - actions
    real = masks[..., None].repeat(A, axis=-1)
    assert float(metrics["action_mse"]) == pytest.approx(np.mean(error[:, 0] ** 2), rel=1e-5)
    assert float(metrics["action_l1"]) == pytest.approx(np.mean(np.abs(error[:, 0])), rel=1e-5)
    assert float(metrics["chunk_action_mse"]) == pytest.approx(np.mean((error ** 2)[real]), rel=1e-5)
    assert float(metrics["chunk_action_mse"]) != pytest.approx(float(metrics["action_mse"]), rel=1e-3)
    hits = (steps == bins)[real]
    assert float(metrics["greedy_bin_accuracy"]) == pytest.approx(np.mean(hits), abs=1e-6)


def test_stage_packer_bins_14_action_chunks_with_padding():
    """``bins_small``'s packer: 14 x 4 bins an example (those of ``stats.bin_actions`` of the
    chunk, time-major) at ``action_positions``, and loss weight 1 / 56 on the real steps' bins, 0 on
    the padded steps'. The config's layout is one 169-token example a row; the packer is run on 2 a
    row (forced), so examples' arrays must follow them into their slots."""
    from configs.finetune import get_config
    from jaxvla.data import stats as stats_lib
    from jaxvla.losses.actions import bin_centres
    from jaxvla.stages.finetune import SequencePacker, layout_for, longest_example
    from jaxvla.frozen import TextPrompts

    config = get_config("bins_small")
    chunk = int(config.model.chunk)
    assert chunk == 14 and int(config.data.chunk_size) == 14 and int(config.model.execute_steps) == 7
    vocab, prompts = S.Vocab(image_codes=512, latent_codes=8), TextPrompts()
    longest = longest_example("bins", int(config.model.prompt_tokens), prompts.markers, vocab, 64, chunk=chunk,
                              action_dim=A)
    layout = layout_for(config, longest, 4, group=4)
    assert (layout.example_len, layout.examples_per_row, layout.row_len) == (169, 1, 169)
    assert layout.row_caps["action"] == chunk * A
    layout = S.packing_layout(4, 169, S.example_target_counts(longest), int(config.model.seq_len),
                              examples_per_row=2)
    assert (layout.row_len, layout.row_caps["action"]) == (338, 2 * chunk * A)
    edges = np.tile(np.linspace(-1, 1, 257, dtype=np.float32), (A, 1))
    datasets = {"metaworld": {"edges": edges, "gripper_dims": (-1,), "centres": bin_centres(edges, (-1,))}}
    packer = SequencePacker(config, StubFrames(), prompts, vocab, datasets, layout)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (4, chunk, A)).astype(np.float32)
    valid = np.arange(chunk)[None] < np.array([14, 9, 1, 14])[:, None]  # [4, K]
    actions[~valid] = 0.0  # the pipeline's zero padding
    batch = {"observation": {"image_primary": np.zeros((4, 64, 64, 3), np.uint8)},
             "task": {"language_instruction": np.asarray(["reach the goal", "push the puck", "open the door",
                                                          "press the button"], dtype=object)},
             "action": actions, "action_pad_mask": valid}
    out = packer(batch, eval=True)
    assert out["tokens"].shape == (2, 338) and out["action_positions"].shape == (2, 2, chunk * A)
    assert out["action"].shape == (2, 2, chunk, A) and out["action_pad_mask"].shape == (2, 2, chunk)
    expected = stats_lib.bin_actions(actions, edges, (-1,)).reshape(2, 2, chunk * A)
    np.testing.assert_array_equal(out["action_bins"], expected)
    rows = np.arange(2)[:, None, None]
    np.testing.assert_array_equal(out["tokens"][rows, out["action_positions"]], expected)
    weights = out["loss_weight"][rows, out["action_positions"] - 1]
    real = np.repeat(valid.reshape(2, 2, chunk), A, axis=-1)
    np.testing.assert_allclose(weights, np.where(real, 1 / (chunk * A), 0.0), rtol=1e-6)
    # Nothing else of the rows is weighted (bins finetuning has no text loss).
    assert np.count_nonzero(out["loss_weight"]) == int(real.sum())


def test_model_chunk_override_sets_the_pipeline_chunk():
    """``--config.model.chunk=1`` (LAPA's single action) alone is a consistent config: the pipeline's
    ``data.chunk_size`` follows it."""
    from jaxvla.config import apply_overrides, load_config
    from jaxvla.stages.finetune import check_config

    config = apply_overrides(load_config(os.path.join(REPO, "configs/finetune.py:bins_small")), {"model.chunk": 1})
    assert int(config.data.chunk_size) == 1
    check_config(config)
    assert int(load_config(os.path.join(REPO, "configs/finetune.py:flow_small")).data.chunk_size) == 14
