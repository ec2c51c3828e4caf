"""Packing several pretraining examples into one row (jaxvla.data.sequences.pack_examples): the
packed loss and gradients against each example run alone, isolation of the examples in a row
(bidirectional blocks included), the exact row layout of a small case, and the padding of packed
small-config batches. Finetuning: packed bins rows (loss and gradients against each example alone,
isolation, greedy decoding), the small configs' real layouts, and flow's loss unchanged by its
rows sized to the real need."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.pretrain import get_config
from jaxvla.config import with_overrides
from jaxvla.data import sequences as S
from jaxvla.losses.pretrain import pretrain_loss
from jaxvla.models.llama import Llama, llama_config

INPUTS = ("tokens", "modality", "positions", "segment_ids", "bidirectional_ids")
# The tiny backbone's tables: 128 text ids, 62 image codes + eof/eov, 8 latent codes + sep, 32 bins.
TINY_VOCAB = S.Vocab(text_size=128, image_codes=62, image_vocab=64, latent_codes=8, action_bins=32)
MT10 = ("reach", "push", "pick-place", "door-open", "drawer-open", "drawer-close", "button-press-topdown",
        "peg-insert-side", "window-open", "window-close")


def unbox(tree):
    return jax.tree.map(lambda a: a.unbox() if hasattr(a, "unbox") else a, tree, is_leaf=lambda a: hasattr(a, "unbox"))


@functools.lru_cache(maxsize=None)
def tiny_model():
    model = Llama(llama_config("tiny"))
    ids = jnp.zeros((1, 8), jnp.int32)
    # Jitted: one compilation instead of one per primitive (seconds of CPU saved on a loaded machine).
    params = unbox(jax.jit(model.init)(jax.random.PRNGKey(0), ids, ids, jnp.arange(8)[None], ids + 1, ids))["params"]
    return model, {"backbone": params}


def random_examples(objective, prompt_lengths, seed=0):
    """One synthetic example per prompt length (random ids, so every example differs)."""
    rng = np.random.default_rng(seed)
    latent_shape = (2, 4) if objective == "vipra" else (1, 4)
    return [S.synthetic_examples(rng, 1, objective, TINY_VOCAB, 96, frame_tokens=8, latent_shape=latent_shape,
                                 prompt_tokens=n)[0] for n in prompt_lengths]


def loss_and_grads(batch, max_targets):
    model, params = tiny_model()
    fn = jax.jit(jax.value_and_grad(
        lambda p, b: pretrain_loss(p, b, None, backbone=model, max_targets=max_targets), has_aux=True))
    (loss, metrics), grads = fn(params, jax.tree.map(jnp.asarray, batch))
    return loss, metrics, grads


@pytest.mark.parametrize("objective", ["lapa", "vipra"])
def test_packed_loss_and_gradients_equal_the_mean_over_examples_alone(objective):
    examples = random_examples(objective, [5, 9, 7, 12, 6])
    lengths = [S.example_length(e) for e in examples]
    caps = {name: max(S.example_target_counts(e)[name] for e in examples) for name in S.MODALITY_NAMES}
    # 3 rows of at most 2 examples: rows of 2, 2 and 1 example, the last with padding.
    packed = S.pack_examples(examples, 2 * max(lengths), 3, max_per_row=2)
    assert packed["num_examples"].tolist() == [2, 2, 1]
    loss, metrics, grads = loss_and_grads(packed, {name: 2 * cap for name, cap in caps.items()})

    alone = [loss_and_grads({k: e[k][None] for k in S.SEQUENCE_KEYS}, {name: 64 for name in caps}) for e in examples]
    expected_loss = np.mean([float(one[0]) for one in alone])
    expected_grads = jax.tree.map(lambda *g: np.mean(np.stack(g), axis=0), *(one[2] for one in alone))
    assert float(loss) == pytest.approx(expected_loss, rel=2e-6)
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    flat_expected = jax.tree.leaves(expected_grads)
    for (path, got), want in zip(flat, flat_expected):
        # float32 sums in another order: agreement to 1e-5 of each leaf's largest entry.
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max() + 1e-9,
                                   err_msg=jax.tree_util.keystr(path))
    padding = 1 - sum(lengths) / packed["tokens"].size
    assert float(metrics["padding_fraction"]) == pytest.approx(padding, abs=1e-6)


def flow_example(prompt, image):
    markers = {"<vision>": [20], "</vision>": [21]}
    return S.build_flow(np.asarray(prompt), np.asarray(image), markers, TINY_VOCAB, 32, chunk=3,
                        prefix_bidirectional=True)


def hidden(row):
    model, params = tiny_model()
    return np.asarray(model.apply({"params": params["backbone"]}, *(jnp.asarray(row[k]) for k in INPUTS))["hidden"])


def test_examples_in_a_row_never_see_each_other_even_with_bidirectional_blocks():
    # Both examples have a prefix block (id 1) and an action block (id 2): equal ids in one row.
    first = flow_example([1, 5, 6, 7], [3, 4, 5])
    second = flow_example([1, 9, 8], [6, 7, 8, 9])
    n1, n2 = S.example_length(first), S.example_length(second)
    row = S.pack_examples([first, second], n1 + n2 + 3, 1)
    assert row["segment_ids"][0].tolist() == [1] * n1 + [2] * n2 + [0] * 3
    base = hidden(row)[0]

    # The second example alone (its own positions 0..n2-1) gives the same hidden states, up to the
    # float32 rounding of a differently shaped computation.
    alone = hidden({k: second[k][None] for k in INPUTS})[0]
    np.testing.assert_allclose(base[n1:n1 + n2], alone[:n2], rtol=1e-5, atol=1e-5)

    rng = np.random.default_rng(0)
    for perturbed, other in ((slice(0, n1), slice(n1, n1 + n2)), (slice(n1, n1 + n2), slice(0, n1))):
        changed = {k: v.copy() for k, v in row.items()}
        # New ids everywhere in one example, its action block included (modality-valid ids).
        sizes = np.asarray(TINY_VOCAB.sizes)[changed["modality"][0, perturbed]]
        changed["tokens"][0, perturbed] = rng.integers(0, 1 << 20, sizes.size) % sizes
        out = hidden(changed)[0]
        assert np.abs(out[perturbed] - base[perturbed]).max() > 1e-3  # the perturbation is felt there
        np.testing.assert_array_equal(out[other], base[other])  # masked keys weigh exactly 0


def test_packed_row_layout_by_hand():
    vocab = S.Vocab(text_size=128, image_codes=62, image_vocab=64, latent_codes=8)  # eov 63
    markers = {"<vision>": [20], "</vision>": [21], "<delta>": [22], "</delta>": [23]}
    first = S.build_lapa(np.array([1, 7]), np.array([3, 4]), np.array([5, 6]), markers, vocab, 16)
    second = S.build_lapa(np.array([1, 8, 9]), np.array([10, 11]), np.array([0, 1]), markers, vocab, 20)
    row = S.pack_examples([first, second], 24, 1)
    assert row["num_examples"].tolist() == [1 + 1]
    np.testing.assert_array_equal(row["tokens"][0], [1, 7, 20, 3, 4, 63, 21, 22, 5, 6, 23,
                                                     1, 8, 9, 20, 10, 11, 63, 21, 22, 0, 1, 23, 0])
    np.testing.assert_array_equal(row["modality"][0], [0, 0, 0, 1, 1, 1, 0, 0, 2, 2, 0,
                                                       0, 0, 0, 0, 1, 1, 1, 0, 0, 2, 2, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"][0], [1] * 11 + [2] * 12 + [0])
    np.testing.assert_array_equal(row["positions"][0], list(range(11)) + list(range(12)) + [0])
    np.testing.assert_array_equal(row["bidirectional_ids"][0], [0] * 24)
    # Each example's own shift: its last token targets 0 (not the next example's bos) at weight 0.
    np.testing.assert_array_equal(row["targets"][0], [7, 20, 3, 4, 63, 21, 22, 5, 6, 23, 0,
                                                      8, 9, 20, 10, 11, 63, 21, 22, 0, 1, 23, 0, 0])
    np.testing.assert_array_equal(row["target_modality"][0], [0, 0, 1, 1, 1, 0, 0, 2, 2, 0, 0,
                                                              0, 0, 0, 1, 1, 1, 0, 0, 2, 2, 0, 0, 0])
    t1, t2, z = 0.01 / 5, 0.01 / 6, 0.99 / 2  # text targets: 5 in the first, 6 in the second
    np.testing.assert_allclose(row["loss_weight"][0], [t1, t1, 0, 0, 0, t1, t1, z, z, t1, 0,
                                                       t2, t2, t2, 0, 0, 0, t2, t2, z, z, t2, 0, 0], rtol=1e-6)
    # Where each example went: a third one opens a second row (the first is full).
    packed, placement = S.pack_examples([first, second, first], 24, 2, with_placement=True)
    assert {k: v.tolist() for k, v in placement.items()} == {"row": [0, 0, 1], "slot": [0, 1, 0], "start": [0, 11, 0]}
    np.testing.assert_array_equal(packed["tokens"][0], row["tokens"][0])
    # A span array + start indexes the packed row: the second example's latent codes sit at 20, 21.
    np.testing.assert_array_equal(packed["tokens"][0, second["latent_positions"] + 11], [0, 1])
    np.testing.assert_array_equal(packed["tokens"][1, first["latent_positions"]], [5, 6])
    # First fit: a third example that does not fit the row is an error naming the sizes.
    with pytest.raises(ValueError, match="fits in none of the 1 rows of 24 tokens"):
        S.pack_examples([first, second, first], 24, 1)


def test_packing_layout_rows_and_caps():
    caps = {"text": 31, "image": 0, "latent": 4, "action": 0}
    # Every example gets the longest one's 101 tokens: two a row (202) pad as much as one, so one.
    layout = S.packing_layout(8, 101, caps, 256)
    assert (layout.examples_per_row, layout.row_len, layout.num_rows) == (1, 101, 8)
    assert layout.row_caps == caps
    forced = S.packing_layout(8, 101, caps, 256, examples_per_row=2)
    assert (forced.examples_per_row, forced.row_len, forced.num_rows) == (2, 202, 4)
    assert forced.row_caps == {"text": 62, "image": 0, "latent": 8, "action": 0}
    # Rows rounded to 64: one of 100 takes 128 tokens, two 256 (128 each), four 448 (112 each, the
    # least); eight would not fit 512.
    layout = S.packing_layout(8, 100, caps, 512, row_multiple=64)
    assert (layout.examples_per_row, layout.row_len, layout.num_rows) == (4, 448, 2)
    # Rounded to 8, 6 examples of 60: 64 (one), 120 (two: 60 each, the least), 184 (three: 61.3).
    layout = S.packing_layout(6, 60, caps, 256, row_multiple=8)
    assert (layout.examples_per_row, layout.row_len, layout.num_rows) == (2, 120, 3)
    # group 2 (e.g. 4 data devices for 8 examples): d must divide 2. 100 tokens rounded to 64: two
    # take 256 (128 each), as one does: one. 60 rounded to 128: one pads to 128, two fill it: two.
    layout = S.packing_layout(8, 100, caps, 512, row_multiple=64, group=2)
    assert (layout.examples_per_row, layout.num_rows) == (1, 8)
    layout = S.packing_layout(8, 60, caps, 512, row_multiple=128, group=2)
    assert (layout.examples_per_row, layout.row_len, layout.num_rows) == (2, 128, 4)
    with pytest.raises(ValueError, match=r"examples_per_row=4 must divide group=2 .* one of \[1, 2\]"):
        S.packing_layout(8, 50, caps, 256, group=2, examples_per_row=4)
    with pytest.raises(ValueError, match=r"examples_per_row=3 .* one of \[1, 2\]"):
        S.packing_layout(6, 101, caps, 256, examples_per_row=3)
    with pytest.raises(ValueError, match="raise config.model.seq_len"):
        S.packing_layout(8, 300, caps, 256, where="config.model.seq_len")


def small_config(objective, **overrides):
    return with_overrides(get_config(f"{objective}_small"), {"model.latent_source": "synthetic", **overrides})


@pytest.mark.parametrize("objective", ["lapa", "vipra", "actionvla"])
def test_small_synthetic_batches_pack_to_little_padding(objective):
    from jaxvla.stages import build_stage

    batches = {pack: next(build_stage(small_config(objective, **{"model.pack": pack})).batches(0))
               for pack in (False, True)}
    unpacked, packed = batches[False], batches[True]
    real = int((unpacked["segment_ids"] > 0).sum())
    assert int((packed["segment_ids"] > 0).sum()) == real  # the same examples, none dropped
    assert int(packed["num_examples"].sum()) == unpacked["tokens"].shape[0] == 8
    padding = 1 - real / packed["tokens"].size
    assert padding <= 0.10, padding
    assert packed["tokens"].shape[1] <= 256


class StubFrames:
    """The small image tokenizer's shape (8 x 8 codes a frame) without a checkpoint."""

    tokens_per_frame = 64
    checkpoint = "stub"

    def tokens(self, images):
        return np.zeros(images.shape[:-3] + (self.tokens_per_frame,), np.int32)


def pipeline_batch(instructions, frames, latent_shape):
    batch_size = len(instructions)
    return {"observation": {"image_primary": np.zeros((batch_size, frames, 64, 64, 3), np.uint8)},
            "task": {"language_instruction": np.asarray(instructions, dtype=object)},
            "latent_action": np.zeros((batch_size, *latent_shape), np.int32)}


@pytest.mark.parametrize("objective,frames,latent_shape", [("lapa", 2, (1, 4)), ("vipra", 4, (3, 16))])
def test_real_layout_with_metaworld_prompts(objective, frames, latent_shape):
    """The small configs' real layout (8 x 8 image codes; LAQ latents lapa 1 x 4, vipra 3 x 16) with
    the MT10 instructions the embedded dataset uses: padding at most 10 % in every batch of 8."""
    from jaxvla.sim.instructions import instruction
    from jaxvla.stages.pretrain import SequencePacker

    config = get_config(f"{objective}_small")
    packer = SequencePacker(config, StubFrames(), None, S.Vocab(image_codes=512, latent_codes=8))
    unpacker = SequencePacker(with_overrides(config, {"model.pack": False}), StubFrames(), None,
                              S.Vocab(image_codes=512, latent_codes=8))
    instructions = [instruction(task) for task in MT10]
    for start in range(0, 10, 2):  # batches of 8 cycling through the tasks
        batch = pipeline_batch([instructions[(start + i) % 10] for i in range(8)], frames, latent_shape)
        packed, unpacked = packer(batch), unpacker(batch)
        real = int((unpacked["segment_ids"] > 0).sum())
        assert int((packed["segment_ids"] > 0).sum()) == real
        assert 1 - real / packed["tokens"].size <= 0.10
    assert packer.layout.examples_per_row == 1  # two a row would pad as much
    assert packer.max_targets["image"] == (64 if objective == "vipra" else 0)
    # A prompt beyond the budget is refused by name.
    with pytest.raises(ValueError, match="config.model.pack_prompt_tokens"):
        packer(pipeline_batch(["pick up the " + "very " * 40 + "small block"] * 8, frames, latent_shape))


def test_packed_synthetic_training_runs(tmp_path):
    from jaxvla.trainer import train

    config = small_config("lapa", **{
        "num_steps": 2, "batch_size": 4, "log_every": 1, "eval_every": 0, "checkpoint.async_save": False,
        "model.dim": 32, "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 2, "model.mlp_dim": 64})
    result = train(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert result.step == 2 and np.isfinite(result.metrics["loss"])
    assert result.metrics["padding_fraction"] == 0.0  # 4 synthetic examples of 101 tokens in 2 rows of 202
    assert "image_ce" not in result.metrics  # no image targets in LAPA: the head never runs


# ------------------------------------------------------------------ finetuning (bins packed, flow sized)

FT_MARKERS = {"<vision>": [20], "</vision>": [21], "<delta>": [22], "</delta>": [23]}
ACTION_DIM = 4


def bins_examples(prompt_lengths, seed=0):
    """One bins example per prompt length (random prompt, 8 image codes, 4 bins) and its bins."""
    rng = np.random.default_rng(seed)
    examples, bins = [], []
    for n in prompt_lengths:
        prompt = np.concatenate([[1], rng.integers(3, 128, n - 1)])
        bins.append(rng.integers(0, TINY_VOCAB.action_bins, ACTION_DIM).astype(np.int32))
        examples.append(S.build_bins(prompt, rng.integers(0, 62, 8), bins[-1], FT_MARKERS, TINY_VOCAB, 64))
    return examples, np.stack(bins)


def packed_bins(examples, bins, per_row):
    from jaxvla.stages.finetune import pack_bins

    longest = max(examples, key=S.example_length)
    n = S.example_length(longest)
    layout = S.packing_layout(len(examples), n, S.example_target_counts(longest), per_row * n,
                              examples_per_row=per_row)
    return pack_bins(examples, {"action_bins": bins}, layout), layout


def alone_bins_loss(params, row, action_positions, bins):
    """Written out for one example in its own unpadded row ``[1, n]``, without the loss under test:
    the mean over its A bins of -log p(bin) from the action head's logits one position before each."""
    model, _ = tiny_model()
    logits = model.apply({"params": params["backbone"]}, *(row[k] for k in INPUTS), heads=("action",))
    log_probs = jax.nn.log_softmax(logits["logits"]["action"][0, action_positions - 1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, bins[:, None], axis=-1))


def test_packed_bins_loss_and_gradients_equal_the_mean_over_examples_alone():
    from jaxvla.losses.finetune import binned_action_loss

    examples, bins = bins_examples([5, 9, 9, 5])  # two lengths: two compilations of the unpadded rows
    batch, layout = packed_bins(examples, bins, per_row=2)
    lengths = [S.example_length(e) for e in examples]
    assert batch["tokens"].shape == (2, 2 * max(lengths)) and batch["num_examples"].tolist() == [2, 2]
    # Every per-example array follows its example: the row's tokens at its action_positions are its bins,
    # and its segment restarts the positions at 0.
    assert batch["action_positions"].shape == batch["action_bins"].shape == (2, 2, ACTION_DIM)
    rows = np.arange(2)[:, None, None]
    np.testing.assert_array_equal(batch["tokens"][rows, batch["action_positions"]], bins.reshape(2, 2, ACTION_DIM))
    for row in range(2):
        for slot in range(2):
            where = batch["segment_ids"][row] == slot + 1
            np.testing.assert_array_equal(batch["positions"][row][where], np.arange(lengths[2 * row + slot]))

    model, params = tiny_model()
    fn = jax.jit(jax.value_and_grad(functools.partial(
        binned_action_loss, rng=None, backbone=model, max_targets=layout.row_caps["action"]), has_aux=True))
    (loss, metrics), grads = fn(params, jax.tree.map(jnp.asarray, batch))
    alone = jax.jit(jax.value_and_grad(alone_bins_loss))
    results = [alone(params, {k: jnp.asarray(e[k][:n])[None] for k in INPUTS}, jnp.asarray(e["action_positions"]),
                     jnp.asarray(b)) for e, b, n in zip(examples, bins, lengths)]
    expected_loss = np.mean([float(value) for value, _ in results])
    expected_grads = jax.tree.map(lambda *g: np.mean(np.stack(g), axis=0), *(g for _, g in results))
    assert float(loss) == pytest.approx(expected_loss, rel=2e-6)
    assert float(metrics["cross_entropy"]) == float(loss)
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    for (path, got), want in zip(flat, jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max() + 1e-9,
                                   err_msg=jax.tree_util.keystr(path))
    assert float(metrics["padding_fraction"]) == pytest.approx(1 - sum(lengths) / batch["tokens"].size, abs=1e-6)


def test_bins_examples_in_a_row_never_see_each_other():
    from jaxvla.losses.finetune import action_token_logits, binned_action_loss, predict_bins_greedy

    model, params = tiny_model()
    examples, bins = bins_examples([6, 11], seed=1)
    batch, layout = packed_bins(examples, bins, per_row=2)
    n1, n2 = (S.example_length(e) for e in examples)
    spans = (slice(0, n1), slice(n1, n1 + n2))
    logits = jax.jit(functools.partial(action_token_logits, backbone=model))
    loss = jax.jit(functools.partial(binned_action_loss, rng=None, backbone=model, max_targets=8))

    def example_losses(row):
        # Each example's own loss: the other example's weights zeroed (its tokens still in the row).
        return [float(loss(params, dict(row, loss_weight=np.where(row["segment_ids"] == slot, row["loss_weight"], 0),
                                        num_examples=np.ones(1, np.int32)))[0]) for slot in (1, 2)]

    base_logits, base_losses = np.asarray(logits(params, batch))[0], example_losses(batch)
    rng = np.random.default_rng(0)
    for changed, other in ((0, 1), (1, 0)):
        perturbed = {k: v.copy() for k, v in batch.items()}
        # New ids for every token of one example, its bins included (valid ids of each modality).
        sizes = np.asarray(TINY_VOCAB.sizes)[perturbed["modality"][0, spans[changed]]]
        perturbed["tokens"][0, spans[changed]] = rng.integers(0, 1 << 20, sizes.size) % sizes
        out_logits, out_losses = np.asarray(logits(params, perturbed))[0], example_losses(perturbed)
        assert np.abs(out_logits[spans[changed]] - base_logits[spans[changed]]).max() > 1e-3
        assert out_losses[changed] != base_losses[changed]
        np.testing.assert_array_equal(out_logits[spans[other]], base_logits[spans[other]])  # masked keys weigh 0
        assert out_losses[other] == base_losses[other]

    # Greedy decoding of the packed row (both examples at once) equals decoding each alone (one a
    # row, unpacked [B, A] positions as a policy builds them).
    decode = jax.jit(functools.partial(predict_bins_greedy, backbone=model))
    packed = np.asarray(decode(params, batch))
    alone = S.batch_sequences([{k: e[k] for k in (*S.SEQUENCE_KEYS, "action_positions")} for e in examples])
    assert packed.shape == (1, 2, ACTION_DIM)
    np.testing.assert_array_equal(packed[0], np.asarray(decode(params, alone)))


def finetune_pipeline_batch(instructions, chunk, seed=0):
    rng = np.random.default_rng(seed)
    batch_size = len(instructions)
    return {"observation": {"image_primary": np.zeros((batch_size, 64, 64, 3), np.uint8)},
            "task": {"language_instruction": np.asarray(instructions, dtype=object)},
            "action": rng.uniform(-1, 1, (batch_size, chunk, ACTION_DIM)).astype(np.float32),
            "action_pad_mask": np.ones((batch_size, chunk), bool)}


@pytest.mark.parametrize("head", ["bins", "flow"])
def test_finetune_real_layout_with_metaworld_prompts(head):
    """The small finetuning configs' layout (8 x 8 image codes, 4 action dims, MT10's instructions,
    batches of 8 on one device): one example a row of the real need (bins' packed layout too: two
    a row would pad as much); padding at most 10 % in every batch; an instruction over the budget is refused by name."""
    from configs.finetune import get_config as finetune_config
    from jaxvla.losses.actions import bin_centres
    from jaxvla.sim.instructions import instruction
    from jaxvla.stages.finetune import SequencePacker, layout_for, longest_example
    from jaxvla.frozen import TextPrompts

    config = finetune_config(f"{head}_small")
    chunk, vocab, prompts = int(config.model.chunk), S.Vocab(image_codes=512, latent_codes=8), TextPrompts()
    longest = longest_example(head, int(config.model.prompt_tokens), prompts.markers, vocab, 64, chunk=chunk,
                              action_dim=ACTION_DIM)
    layout = layout_for(config, longest, 8, group=8)
    # 36 prompt ids + <vision> 3 + 64 codes + eov + </vision> 3, then 14 flow slots (121) or
    # <delta> 3 + 14 x 4 bins + </delta> 3 (169).
    assert (layout.examples_per_row, layout.num_rows) == (1, 8)
    assert layout.row_len == (169 if head == "bins" else 121)
    edges = np.tile(np.linspace(-1, 1, 257, dtype=np.float32), (ACTION_DIM, 1))
    datasets = {"metaworld": {"edges": edges, "gripper_dims": (-1,), "centres": bin_centres(edges, (-1,))}}
    packer = SequencePacker(config, StubFrames(), prompts, vocab, datasets, layout)
    instructions = [instruction(task) for task in MT10]
    for start in range(0, 10, 2):  # batches of 8 cycling through the tasks
        chosen = [instructions[(start + i) % 10] for i in range(8)]
        out = packer(finetune_pipeline_batch(chosen, chunk, seed=start), eval=True)
        assert out["tokens"].shape == (layout.num_rows, layout.row_len)
        real = sum(prompts(text).size for text in chosen) + 8 * (layout.example_len - 36)
        assert int((out["segment_ids"] > 0).sum()) == real  # every example whole, none dropped
        assert 1 - real / out["tokens"].size <= 0.10
        if head == "bins":
            assert out["num_examples"].tolist() == [1] * 8
            assert out["action"].shape == (8, 1, 14, ACTION_DIM) and out["bin_centres"].shape == (8, 1, ACTION_DIM, 256)
            assert out["action_bins"].shape == (8, 1, 14 * ACTION_DIM)
            picked = out["tokens"][np.arange(8)[:, None, None], out["action_positions"]]
            np.testing.assert_array_equal(picked, out["action_bins"])
        else:
            np.testing.assert_array_equal(out["action_positions"][:, -1], out["segment_ids"].sum(axis=1) - 1)
    with pytest.raises(ValueError, match="config.model.prompt_tokens"):
        packer(finetune_pipeline_batch(["pick up the " + "very " * 40 + "small block"] * 8, chunk))


def test_flow_loss_does_not_depend_on_the_row_length():
    """Sizing flow's rows to the real need changes only the padding: the loss (same noise and times)
    is the same on rows of the longest example's length as on the old, wider rows, and
    padding_fraction reports each. (The KV-cached sampler on the sized rows: test_finetune.py
    test_cached_sampler_matches_recompute.)"""
    from jaxvla.losses.finetune import flow_matching_loss
    from jaxvla.models.action_heads import ActionEncoder, VelocityHead

    model, params = tiny_model()
    encoder, head = ActionEncoder(width=64, time_dim=16), VelocityHead(ACTION_DIM)
    params = dict(params, action_encoder=unbox(encoder.init(jax.random.PRNGKey(1), jnp.zeros((1, 3, ACTION_DIM)),
                                                            jnp.zeros((1,))))["params"],
                  velocity_head=unbox(head.init(jax.random.PRNGKey(2), jnp.zeros((1, 3, 64))))["params"])
    rng = np.random.default_rng(0)
    prompts = [np.concatenate([[1], rng.integers(3, 128, n - 1)]) for n in (4, 9, 6)]
    images = rng.integers(0, 62, (3, 8))
    actions = rng.uniform(-1, 1, (3, 3, ACTION_DIM)).astype(np.float32)
    real = [S.example_length(S.build_flow(p, i, FT_MARKERS, TINY_VOCAB, 64, chunk=3)) for p, i in zip(prompts, images)]
    loss_fn = jax.jit(functools.partial(flow_matching_loss, backbone=model, action_encoder=encoder, velocity_head=head))
    losses = {}
    for length in (max(real), 64):
        batch = S.batch_sequences([S.build_flow(p, i, FT_MARKERS, TINY_VOCAB, length, chunk=3)
                                   for p, i in zip(prompts, images)])
        loss, metrics = loss_fn(params, dict(batch, action=actions, action_pad_mask=np.ones((3, 3), bool)),
                                jax.random.PRNGKey(3))
        assert float(metrics["padding_fraction"]) == pytest.approx(1 - sum(real) / (3 * length), abs=1e-6)
        losses[length] = float(loss)
    assert losses[max(real)] == pytest.approx(losses[64], rel=1e-5)
