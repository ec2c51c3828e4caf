"""Packing several pretraining examples into one row (jaxvla.data.sequences.pack_examples): the
packed loss and gradients against each example run alone, isolation of the examples in a row
(bidirectional blocks included), the exact row layout of a small case, and the padding of packed
small-config batches."""

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
    params = unbox(model.init(jax.random.PRNGKey(0), ids, ids, jnp.arange(8)[None], ids + 1, ids))["params"]
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
    # First fit: a third example that does not fit the row is an error naming the sizes.
    with pytest.raises(ValueError, match="fits in none of the 1 rows of 24 tokens"):
        S.pack_examples([first, second, first], 24, 1)


def test_packing_layout_rows_and_caps():
    caps = {"text": 31, "image": 0, "latent": 4, "action": 0}
    layout = S.packing_layout(8, 101, caps, 256)
    assert (layout.examples_per_row, layout.row_len, layout.num_rows) == (2, 202, 4)
    assert layout.row_caps == {"text": 62, "image": 0, "latent": 8, "action": 0}
    # group 2 (e.g. 4 data devices for 8 examples): at most 2 a row and the rows stay a multiple of 4.
    assert S.packing_layout(8, 50, caps, 256, group=2).num_rows == 4
    # 4 of 60 fit 256 but 4 does not divide 6: 3 a row, 180 tokens rounded up to 184.
    layout = S.packing_layout(6, 60, caps, 256, row_multiple=8)
    assert (layout.examples_per_row, layout.row_len, layout.num_rows) == (3, 184, 2)
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
    assert packer.max_targets["image"] == (packer.layout.examples_per_row * 64 if objective == "vipra" else 0)
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
