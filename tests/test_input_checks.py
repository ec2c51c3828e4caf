"""Losses and encoders check their inputs (jaxvla/input_checks.py): dtype and shape at trace time,
value ranges on concrete arrays; every error names the function, the key, what was expected and
what was got."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvla.data import sequences as seq
from jaxvla.input_checks import InputError, check_array, check_sequence_batch
from jaxvla.losses import (
    binned_action_loss,
    binned_action_loss_from_logits,
    flow_matching_loss,
    laq_loss,
    make_flow_matching_loss,
    make_tokenizer_loss,
    pretrain_loss,
)
from jaxvla.losses.flow import estimate_flow
from jaxvla.losses.laq import laq_eval_metrics
from jaxvla.losses.tokenizer import images_to_float
from jaxvla.models import LAQ, VQGAN, Llama, llama_config, vqgan_variant
from jaxvla.models.action_heads import VelocityHead

RNG = jax.random.PRNGKey(0)
VOCAB = seq.Vocab(text_size=128, image_codes=62, image_vocab=64, latent_codes=8, action_bins=32)  # llama "tiny"
MARKERS = {name: np.array([3 + i], np.int32) for i, name in enumerate(seq.MARKERS)}


# --------------------------------------------------------------------------- the helper


def test_check_array_names_key_expectation_and_what_was_got():
    with pytest.raises(InputError, match=r"f: batch\['x'\] must be an integer dtype \[B, 3\]; got float32 \[2, 3\]"):
        check_array(np.zeros((2, 3), np.float32), where="f", key="batch['x']", dtype="integer", shape=("B", 3))
    with pytest.raises(InputError, match=r"must be uint8 \[B, 4\].*got uint8 \[2, 5\]"):
        check_array(np.zeros((2, 5), np.uint8), where="f", key="k", dtype="uint8", shape=("B", 4))
    dims = {}
    check_array(np.zeros((2, 5), np.int32), where="f", key="a", dtype="integer", shape=("B", "L"), dims=dims)
    assert dims == {"B": 2, "L": 5}
    with pytest.raises(InputError, match=r"k2 must be .*\[B=2, L=5\]; got int32 \[3, 5\] \(B is 2 elsewhere\)"):
        check_array(np.zeros((3, 5), np.int32), where="f", key="k2", dtype="integer", shape=("B", "L"), dims=dims)
    with pytest.raises(InputError, match=r"with values in \[0, 9\].*got int32 \[3\] with values in \[0, 12\]"):
        check_array(np.array([0, 5, 12], np.int32), where="f", key="ids", dtype="integer", low=0, high=9)
    with pytest.raises(InputError, match="holding NaN"):
        check_array(np.array([0.0, np.nan], np.float32), where="f", key="a", dtype="floating", finite=True)
    check_array(jnp.zeros((2,), jnp.bfloat16), where="f", key="a", dtype="floating")


def test_value_ranges_are_checked_on_concrete_arrays_only():
    ids = np.array([0, 5, 12], np.int32)
    with pytest.raises(InputError):
        check_array(jnp.asarray(ids), where="f", key="ids", dtype="integer", low=0, high=9)

    @jax.jit
    def traced(x):  # dtype and shape still checked at trace time; values are tracers: not checked
        check_array(x, where="f", key="ids", dtype="integer", shape=(3,), low=0, high=9)
        return x.sum()

    assert int(traced(ids)) == 17
    with pytest.raises(InputError, match="must be an integer dtype"):
        traced(ids.astype(np.float32))


# --------------------------------------------------------------------------- frames


def test_tokenizer_loss_refuses_float_or_misshaped_frames_and_a_missing_key():
    model = VQGAN(**vqgan_variant("small"))  # 64 px; the checks run before the model is applied
    loss_fn = make_tokenizer_loss(model)
    frames = np.zeros((2, 64, 64, 3), np.uint8)
    with pytest.raises(InputError, match=r"tokenizer loss: batch\['image'\] must be uint8 \[B, 64, 64, 3\] with values "
                                         r"in \[0, 255\] .*; got float32 \[2, 64, 64, 3\]"):
        loss_fn({}, {"image": frames.astype(np.float32) / 127.5 - 1}, RNG)
    with pytest.raises(InputError, match=r"got uint8 \[2, 32, 32, 3\]"):
        loss_fn({}, {"image": np.zeros((2, 32, 32, 3), np.uint8)}, RNG)
    with pytest.raises(InputError, match=r"tokenizer loss: batch has no 'image' .*; it has \['frames'\]"):
        loss_fn({}, {"frames": frames}, RNG)
    with pytest.raises(InputError, match=r"images_to_float: expects uint8 .*; got float32 \[2, 64, 64, 3\]"):
        images_to_float(frames.astype(np.float32))


LAQ_TINY = dict(image_size=16, patch_size=4, dim=32, num_heads=2, head_dim=16, encoder_depth=1, temporal_depth=1,
                decoder_depth=1, quant_dim=8, code_grid=2, codebook_size=8)


def test_laq_loss_and_eval_check_frames_and_step():
    model = LAQ(variant="vipra", num_frames=3, **LAQ_TINY)
    frames = np.zeros((2, 3, 16, 16, 3), np.uint8)
    for fn, where in ((functools.partial(laq_loss, model=model), "laq_loss"),
                      (functools.partial(laq_eval_metrics, model=model), "laq_eval_metrics")):
        with pytest.raises(InputError, match=rf"{where}: batch\['frames'\] must be uint8 \[B, 3, 16, 16, 3\] with "
                                             r"values in \[0, 255\].*; got float32 \[2, 3, 16, 16, 3\]"):
            fn({}, {"frames": frames.astype(np.float32)}, RNG)
        with pytest.raises(InputError, match=r"got uint8 \[2, 4, 16, 16, 3\]"):  # T is the model's num_frames
            fn({}, {"frames": np.zeros((2, 4, 16, 16, 3), np.uint8)}, RNG)
    with pytest.raises(InputError, match=r"laq_loss: batch\['step'\] must be an integer dtype \[B=2\]"):
        laq_loss({}, {"frames": frames, "step": np.zeros((2,), np.float32)}, RNG, model=model)
    with pytest.raises(InputError, match=r"batch\['step'\] .*got int32 \[3\]"):
        laq_loss({}, {"frames": frames, "step": np.zeros((3,), np.int32)}, RNG, model=model)


def test_encoders_want_float_frames_in_unit_range():
    vqgan = VQGAN(**vqgan_variant("small"))
    images = np.zeros((2, 64, 64, 3), np.uint8)
    with pytest.raises(InputError, match=r"VQGAN.encode: images must be float with values in \[-1, 1\] .*got uint8 "
                                         r"\[2, 64, 64, 3\]: convert uint8 frames with .*images_to_float"):
        vqgan.apply({"params": {}}, images, method=vqgan.encode)
    with pytest.raises(InputError, match=r"VQGAN.encode: images must be a float dtype with values in \[-1, 1\].*got "
                                         r"float32 \[2, 64, 64, 3\] with values in \[0, 255\]"):
        vqgan.apply({"params": {}}, images.astype(np.float32) + np.float32([0, 255, 0]), method=vqgan.encode)

    laq = LAQ(variant="lapa", num_frames=2, **LAQ_TINY)
    params = jax.jit(laq.init)(RNG, jnp.zeros((1, 2, 16, 16, 3)))["params"]
    with pytest.raises(InputError, match=r"LAQ.encode: frames must be float with values in \[-1, 1\].*got uint8"):
        laq.apply({"params": params}, np.zeros((1, 2, 16, 16, 3), np.uint8), method=laq.encode)
    with pytest.raises(InputError, match=r"LAQ.encode: frames must be a float dtype \[B=1, 2, 16, 16, 3\] with values "
                                         r"in \[-1, 1\]; got float32 \[1, 2, 16, 16, 3\] with values in \[-3, -3\]"):
        laq.apply({"params": params}, np.full((1, 2, 16, 16, 3), -3.0, np.float32), method=laq.encode)
    # Under jit the range is not checked (values are tracers); the dtype still is.
    encode = jax.jit(lambda p, x: laq.apply({"params": p}, x, method=laq.encode)["indices"])
    assert encode(params, np.full((1, 2, 16, 16, 3), -3.0, np.float32)).shape == (1, 1, 4)
    with pytest.raises(InputError, match="got uint8"):
        encode(params, np.zeros((1, 2, 16, 16, 3), np.uint8))


def test_flow_estimator_refuses_uint8_frames():
    with pytest.raises(InputError, match=r"estimate_flow: frame_a must be a float dtype .*; got uint8 \[1, 16, 16, 3\]"):
        estimate_flow(np.zeros((1, 16, 16, 3), np.uint8), np.zeros((1, 16, 16, 3), np.uint8))


# --------------------------------------------------------------------------- sequences


def flow_batch(rows: int = 2, chunk: int = 3, action_dim: int = 4) -> dict:
    rng = np.random.default_rng(0)
    examples = [seq.build_flow(np.r_[1, rng.integers(10, 128, 5)], rng.integers(0, 62, 8), MARKERS, VOCAB, 24,
                               chunk=chunk) for _ in range(rows)]
    batch = seq.batch_sequences(examples)
    batch["action"] = np.zeros((rows, chunk, action_dim), np.float32)
    batch["action_pad_mask"] = np.ones((rows, chunk), bool)
    return batch


def test_pretrain_loss_checks_dtypes_shapes_and_ids_against_the_backbone_tables():
    backbone = Llama(llama_config("tiny"))  # tables: text 128, image 64, latent 9, action 32
    batch = seq.synthetic_batch(np.random.default_rng(0), 2, "lapa", VOCAB, 128, frame_tokens=8)
    loss = functools.partial(pretrain_loss, backbone=backbone, max_targets={"latent": 4})
    check_sequence_batch(batch, where="pretrain_loss", vocab_sizes=(128, 64, 9, 32), targets=True)  # valid

    bad = dict(batch, tokens=np.where(batch["modality"] == 0, 500, batch["tokens"]).astype(np.int32))
    with pytest.raises(InputError, match=r"pretrain_loss: batch\['tokens'\] ids of text tokens must lie in the text "
                                         r"table \[0, 127\] \(the backbone's text vocabulary\); got ids in \[500, 500\]"):
        loss({}, bad, None)
    targets = np.where((batch["target_modality"] == 2) & (batch["loss_weight"] > 0), 9, batch["targets"])
    with pytest.raises(InputError, match=r"batch\['targets'\] ids of latent weighted targets must lie in the latent "
                                         r"table \[0, 8\].*got ids in \[9, 9\]"):
        loss({}, dict(batch, targets=targets.astype(np.int32)), None)
    with pytest.raises(InputError, match=r"batch\['modality'\] must be an integer dtype \[B=2, L=128\] with values "
                                         r"in \[0, 3\] \(0 text, 1 image, 2 latent, 3 action\); got int32 \[2, 128\] "
                                         r"with values in \[0, 7\]"):
        loss({}, dict(batch, modality=np.where(batch["modality"] == 1, 7, batch["modality"]).astype(np.int32)), None)
    with pytest.raises(InputError, match=r"batch\['loss_weight'\] must be a float dtype \[B=2, L=128\]"):
        loss({}, dict(batch, loss_weight=batch["loss_weight"].astype(np.int32)), None)
    with pytest.raises(InputError, match=r"batch\['positions'\] must be an integer dtype \[B=2, L=128\].*got int32 "
                                         r"\[2, 127\]"):
        loss({}, dict(batch, positions=batch["positions"][:, :-1]), None)
    with pytest.raises(InputError, match=r"pretrain_loss: batch has no 'segment_ids'"):
        loss({}, {k: v for k, v in batch.items() if k != "segment_ids"}, None)


def test_finetune_losses_check_their_batches():
    backbone = Llama(llama_config("tiny", latent_vocab=0, action_vocab=0))
    flow = functools.partial(flow_matching_loss, backbone=backbone, action_encoder=None,
                             velocity_head=VelocityHead(4))
    batch = flow_batch()
    with pytest.raises(InputError, match=r"flow_matching_loss: batch\['action'\] must be a float dtype \[B=2, K=3, 4\]"
                                         r".*; got float32 \[2, 3, 7\]"):
        flow({}, dict(batch, action=np.zeros((2, 3, 7), np.float32)), RNG)
    with pytest.raises(InputError, match=r"batch\['action'\] .*got float32 \[2, 3, 4\] holding NaN"):
        flow({}, dict(batch, action=np.full((2, 3, 4), np.nan, np.float32)), RNG)
    with pytest.raises(InputError, match=r"flow_matching_loss: batch\['action_positions'\] must be an integer dtype "
                                         r"\[B=2, K=3\] with values in \[0, 23\] \(indices of the action placeholders "
                                         r"in each row\); got int32 \[2, 3\] with values in \[17, 40\]"):
        positions = np.array(batch["action_positions"])
        positions[:, -1] = 40
        flow({}, dict(batch, action_positions=positions), RNG)
    with pytest.raises(InputError, match=r"flow_matching_loss: batch has no 'action'"):
        flow({}, {k: v for k, v in batch.items() if k != "action"}, RNG)

    bins_backbone = Llama(llama_config("tiny", latent_vocab=0))  # action table 32
    example = seq.build_bins(np.r_[1, 20, 21], np.zeros(8, np.int32), np.full(4, 5, np.int32), MARKERS, VOCAB, 32)
    bins_batch = seq.batch_sequences([example, example])
    action_targets = (bins_batch["target_modality"] == seq.ACTION) & (bins_batch["loss_weight"] > 0)
    bins_batch["targets"] = np.where(action_targets, 40, bins_batch["targets"]).astype(np.int32)
    with pytest.raises(InputError, match=r"binned_action_loss: batch\['targets'\] ids of action weighted targets must "
                                         r"lie in the action table \[0, 31\].*got ids in \[40, 40\]"):
        binned_action_loss({}, bins_batch, RNG, backbone=bins_backbone)


def test_action_losses_check_dtypes_shapes_and_bins():
    logits, bins = jnp.zeros((2, 3, 8)), np.array([[0, 1, 2], [3, 4, 9]], np.int32)
    with pytest.raises(InputError, match=r"binned_action_loss_from_logits: bins must be an integer dtype \[B=2, A=3\] "
                                         r"with values in \[0, 7\].*got int32 \[2, 3\] with values in \[0, 9\]"):
        binned_action_loss_from_logits(logits, bins, None)
    with pytest.raises(InputError, match=r"logits must be a float dtype \[B, A, V\]; got int32 \[2, 3, 8\]"):
        binned_action_loss_from_logits(jnp.zeros((2, 3, 8), jnp.int32), bins % 8, None)
    loss_fn = make_flow_matching_loss(lambda p, b, u, s: u)
    with pytest.raises(InputError, match=r"flow matching loss: batch\['action'\] must be a float dtype \[B, K, \*\]"
                                         r".*; got int32 \[2, 3, 4\]"):
        loss_fn({}, {"action": np.zeros((2, 3, 4), np.int32)}, RNG)
    with pytest.raises(InputError, match=r"batch\['action_pad_mask'\] must be bool .*\[B=2, K=3\].*got bool \[2, 4\]"):
        loss_fn({}, {"action": np.zeros((2, 3, 4), np.float32), "action_pad_mask": np.ones((2, 4), bool)}, RNG)
