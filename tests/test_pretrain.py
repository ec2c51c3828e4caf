"""Stage 2 (latent pretraining): the gathered-target loss against a brute-force reference, the
target caps, training prerequisites first, and short end-to-end runs (LAQ on the fly, labels)."""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvla.config import apply_overrides, load_config
from jaxvla.data.sequences import MODALITY_NAMES
from jaxvla.losses.pretrain import check_target_caps, pretrain_loss
from jaxvla.models.llama import Llama, llama_config
from jaxvla.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unbox(tree):
    return jax.tree.map(lambda a: a.unbox() if hasattr(a, "unbox") else a, tree, is_leaf=lambda a: hasattr(a, "unbox"))


def random_sequences(rng, config, batch=2, length=24):
    """Sequences with every modality among the targets, padding at the end."""
    modality = rng.integers(0, 4, (batch, length)).astype(np.int32)
    sizes = np.asarray([config.vocab(m) for m in MODALITY_NAMES])
    tokens = (rng.integers(0, 1 << 30, (batch, length)) % sizes[modality]).astype(np.int32)
    segment = np.ones((batch, length), np.int32)
    segment[:, -4:] = 0
    weight = rng.uniform(0, 1, (batch, length)).astype(np.float32) * (rng.uniform(size=(batch, length)) < 0.6)
    weight[:, -5:] = 0
    return {
        "tokens": tokens, "modality": modality, "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
        "segment_ids": segment, "bidirectional_ids": np.zeros((batch, length), np.int32),
        "targets": np.roll(tokens, -1, axis=1), "target_modality": np.roll(modality, -1, axis=1),
        "loss_weight": weight,
    }


def test_gathered_loss_equals_full_logits_reference():
    config = llama_config("tiny")
    model = Llama(config)
    rng = np.random.default_rng(0)
    batch = random_sequences(rng, config)
    params = unbox(model.init(jax.random.PRNGKey(0), *(jnp.asarray(batch[k]) for k in
                                                       ("tokens", "modality", "positions", "segment_ids", "bidirectional_ids"))))
    params = {"backbone": params["params"]}
    loss, metrics = jax.jit(lambda p, b: pretrain_loss(p, b, None, backbone=model, max_targets={m: 24 for m in MODALITY_NAMES}))(params, batch)
    logits = model.apply({"params": params["backbone"]}, *(batch[k] for k in
                                                          ("tokens", "modality", "positions", "segment_ids", "bidirectional_ids")))["logits"]
    total = 0.0
    for index, name in enumerate(MODALITY_NAMES):
        log_probs = np.asarray(jax.nn.log_softmax(logits[name], axis=-1))
        mask = (batch["target_modality"] == index) & (batch["loss_weight"] > 0)
        b, i = np.nonzero(mask)
        ce = -log_probs[b, i, batch["targets"][b, i]]
        total += np.sum(batch["loss_weight"][b, i] * ce)
        accuracy = np.mean(np.argmax(log_probs[b, i], -1) == batch["targets"][b, i])
        assert float(metrics[f"{name}_accuracy"]) == pytest.approx(accuracy, abs=1e-6)
    assert float(loss) == pytest.approx(total / 2, rel=1e-5)
    # Capped below the real count, the iterator's check refuses the batch instead of dropping targets.
    with pytest.raises(ValueError, match=r"raise config.model.max_targets\.(text|image|latent|action)"):
        check_target_caps(batch, {m: 2 for m in MODALITY_NAMES}, "config.model.max_targets")


def test_missing_prerequisites_are_made_first_and_said(tmp_path, monkeypatch, caplog):
    """What ``python -m jaxvla.train`` runs before training (``trainer.train_prerequisites``): the
    stage's declared prerequisites in order, the data rendered, each missing checkpoint's own
    prerequisites before it is trained in its workdir, and the log says so."""
    from jaxvla import trainer
    from jaxvla.data import embedded

    events = []  # neither renders nor trains: every prerequisite stays missing
    monkeypatch.setattr(embedded, "ensure_metaworld_dataset", lambda *args: events.append(("render",) + args))
    monkeypatch.setattr(trainer, "train", lambda config, workdir: events.append(("train", config, workdir)))
    data, tok, laq = str(tmp_path / "data"), str(tmp_path / "tok"), str(tmp_path / "laq")
    config = apply_overrides(load_config(os.path.join(REPO, "configs/pretrain.py:vipra_small")), {
        "data.data_dir": data, "model.tokenizer_checkpoint": tok, "model.laq_checkpoint": laq,
        "model.tokenizer_steps": 7, "model.laq_steps": 5})
    with caplog.at_level(logging.INFO, logger="jaxvla"):
        trainer.train_prerequisites(config)
    rendered = ("render", data, "mt10", 5, 64, 0)
    assert [e[0] if e[0] == "train" else e for e in events] == [rendered, rendered, "train", rendered, "train"]
    (_, tok_config, tok_dir), (_, laq_config, laq_dir) = [e for e in events if e[0] == "train"]
    assert tok_dir == tok and tok_config.stage == "tokenizer" and tok_config.num_steps == 7
    assert tok_config.data.source == "metaworld" and tok_config.data.data_dir == data
    assert laq_dir == laq and laq_config.stage == "laq" and laq_config.num_steps == 5
    assert laq_config.model.size == "vipra_small" and laq_config.data.data_dir == data
    assert ("image tokenizer: no checkpoint in " + tok + ": training configs/tokenizer.py:small there first (7 steps; "
            in caplog.text)
    assert "LAQ: no checkpoint in " + laq + ": training configs/laq.py:vipra_small there first (5 steps; " in caplog.text


def test_build_with_missing_prerequisites_names_them_and_trains_nothing(tmp_path, monkeypatch):
    """A stage build only reads: a missing checkpoint or dataset is an error naming each one and
    the command that makes it; nothing is trained or rendered."""
    from jaxvla import trainer
    from jaxvla.data import embedded
    from jaxvla.stages import MissingPrerequisiteError, build_stage

    def forbidden(*args, **kwargs):
        raise AssertionError("a stage build trained or rendered")

    monkeypatch.setattr(trainer, "train", forbidden)
    monkeypatch.setattr(embedded, "ensure_metaworld_dataset", forbidden)
    data, tok, laq = str(tmp_path / "data"), str(tmp_path / "tok"), str(tmp_path / "laq")
    config = apply_overrides(load_config(os.path.join(REPO, "configs/pretrain.py:vipra_small")), {
        "data.data_dir": data, "model.tokenizer_checkpoint": tok, "model.laq_checkpoint": laq})
    with pytest.raises(MissingPrerequisiteError) as error:
        build_stage(config)
    message = str(error.value)
    assert "python -m jaxvla.train` with this config makes missing prerequisites first" in message
    assert f"the embedded Meta-World dataset: no Meta-World dataset in {data}; make it with: python " \
           f"scripts/make_metaworld_dataset.py --tasks=mt10 --episodes_per_task=5 --image_size=64 --out={data} " \
           "--seed=0" in message
    assert (f"image tokenizer: no checkpoint in {tok}; make it with: python -m jaxvla.train "
            f"--config=configs/tokenizer.py:small --workdir={tok} --config.num_steps=300 "
            f"--config.data.source=metaworld --config.data.data_dir={data}") in message
    assert (f"LAQ: no checkpoint in {laq}; make it with: python -m jaxvla.train --config=configs/laq.py:vipra_small "
            f"--workdir={laq} --config.num_steps=300 --config.data.data_dir={data}") in message
    # Finetuning and the image tokenizer alike; a synthetic pretraining reads nothing.
    finetune = apply_overrides(load_config(os.path.join(REPO, "configs/finetune.py:flow_small")), {
        "data.data_dir": data, "data.generate_metaworld": False, "model.tokenizer_checkpoint": tok})
    with pytest.raises(MissingPrerequisiteError, match=f"image tokenizer: no checkpoint in {tok}"):
        build_stage(finetune)
    tokenizer = apply_overrides(load_config(os.path.join(REPO, "configs/tokenizer.py:small")), {"data.data_dir": data})
    with pytest.raises(MissingPrerequisiteError, match="scripts/make_metaworld_dataset.py --tasks=mt10"):
        build_stage(tokenizer)
    from jaxvla.stages import prerequisites

    assert prerequisites(apply_overrides(config, {"model.latent_source": "synthetic"})) == []


# -- end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prerequisites(metaworld_dataset, tmp_path_factory):
    """A tiny image tokenizer and a tiny ViPRA LAQ trained for a few steps on the rendered data."""
    root = tmp_path_factory.mktemp("prereq")
    data_dir = str(metaworld_dataset["out"])
    tokenizer = apply_overrides(load_config(os.path.join(REPO, "configs/tokenizer.py:small")), {
        "num_steps": 3, "batch_size": 4, "log_every": 1, "eval_every": 0, "image_every": 0,
        "checkpoint.async_save": False, "model.hidden_channels": 8, "model.embed_dim": 8, "model.codebook_size": 32,
        "data.source": "rlds", "data.data_dir": str(metaworld_dataset["version_dir"]),
    })
    train(tokenizer, str(root / "tokenizer"), devices=jax.devices()[:1])
    laq = apply_overrides(load_config(os.path.join(REPO, "configs/laq.py:vipra_small")), {
        "num_steps": 3, "batch_size": 4, "log_every": 1, "eval_every": 0, "image_every": 0,
        "checkpoint.async_save": False, "model.dim": 32, "model.num_heads": 1, "model.head_dim": 32,
        "model.encoder_depth": 1, "model.decoder_depth": 1, "model.lpips_weight": 0.0, "model.flow_weight": 0.0,
        "data.data_dir": data_dir, "data.generate_metaworld": False, "data.shuffle_buffer": 16, "data.clip_stride": 4,
        "data.clip_length": 2,
    })
    train(laq, str(root / "laq"), devices=jax.devices()[:1])
    return {"tokenizer": str(root / "tokenizer"), "laq": str(root / "laq"), "data_dir": data_dir}


def tiny_pretrain_config(prerequisites, **overrides):
    config = load_config(os.path.join(REPO, "configs/pretrain.py:vipra_small"))
    values = {
        "batch_size": 4, "log_every": 1, "eval_every": 0, "checkpoint.async_save": False,
        "optimizer.warmup_steps": 0, "optimizer.schedule": "constant", "optimizer.learning_rate": 3e-3,
        "model.size": "tiny", "model.max_len": 512, "data.data_dir": prerequisites["data_dir"],
        "data.generate_metaworld": False, "data.shuffle_buffer": 16,
        "model.tokenizer_checkpoint": prerequisites["tokenizer"], "model.laq_checkpoint": prerequisites["laq"],
        **overrides,
    }
    return apply_overrides(config, values)


def test_vipra_pretraining_on_the_fly_latents_learns(prerequisites, tmp_path):
    result = train(tiny_pretrain_config(prerequisites, num_steps=30), str(tmp_path / "pre"), devices=jax.devices()[:1])
    history = [metrics for _, metrics in result.history]
    assert history[-1]["latent_ce"] < history[0]["latent_ce"]
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    for key in ("latent_accuracy", "image_accuracy", "text_ce"):
        assert np.isfinite(result.metrics[key])
    assert set(result.state.params) == {"backbone"}
    assert "head_latent" in result.state.params["backbone"]


def test_pretraining_from_labeller_output(prerequisites, tmp_path):
    from jaxvla.frozen import load_laq
    from jaxvla.latent_actions import label_dataset

    laq = load_laq(prerequisites["laq"])
    # Both splits in one directory: the held-out evaluation reads the val split's labels.
    labels = label_dataset(laq, laq.config.data, str(tmp_path / "labels"), split="train,val", progress=False)
    with open(os.path.join(labels, "labels_info.json")) as f:
        assert json.load(f)["parts"] == ["part-train-00000", "part-val-00000"]
    config = tiny_pretrain_config(prerequisites, num_steps=2, eval_every=2, eval_batches=1,
                                  **{"model.latent_source": "labels", "model.labels_dir": labels})
    result = train(config, str(tmp_path / "pre"), devices=jax.devices()[:1])
    assert np.isfinite(result.metrics["loss"]) and result.step == 2
    assert 0.0 <= result.metrics["eval/latent_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="labels of a 'vipra' LAQ"):
        from jaxvla.stages import build_stage

        build_stage(tiny_pretrain_config(prerequisites, **{"model.objective": "lapa", "model.latent_source": "labels",
                                                           "model.labels_dir": labels}))


def test_actionvla_pretraining_targets_action_bins(prerequisites, tmp_path):
    config = tiny_pretrain_config(prerequisites, num_steps=2, **{
        "model.objective": "actionvla", "data.num_bins": 256, "data.stats_dir": str(tmp_path / "stats")})
    result = train(config, str(tmp_path / "pre"), devices=jax.devices()[:1])
    backbone = result.state.params["backbone"]
    assert "head_action" in backbone and "head_latent" not in backbone
    assert np.isfinite(result.metrics["action_ce"]) and 0.0 <= result.metrics["action_accuracy"] <= 1.0


def test_five_step_pretrain_then_init_from_finetune(prerequisites, tmp_path, caplog):
    pretrained = train(tiny_pretrain_config(prerequisites, num_steps=5), str(tmp_path / "pre"), devices=jax.devices()[:1])
    config = apply_overrides(load_config(os.path.join(REPO, "configs/finetune.py:flow_small")), {
        "batch_size": 4, "num_steps": 2, "log_every": 1, "eval_every": 0, "checkpoint.async_save": False,
        "model.size": "tiny", "model.max_len": 512, "model.seq_len": 136,
        "model.tokenizer_checkpoint": prerequisites["tokenizer"], "data.data_dir": prerequisites["data_dir"],
        "data.generate_metaworld": False, "data.shuffle_buffer": 16, "data.stats_dir": str(tmp_path / "stats"),
        "init_from": pretrained.workdir,
    })
    with caplog.at_level(logging.INFO, logger="jaxvla"):
        result = train(config, str(tmp_path / "ft"), devices=jax.devices()[:1])
    assert result.step == 2 and np.isfinite(result.metrics["loss"])
    assert "init_from" in caplog.text and "(step 5)" in caplog.text
    assert "dropped     backbone/head_latent/kernel" in caplog.text
    assert "kept        backbone/embed_text/embedding" in caplog.text
    assert "initialised velocity_head" in caplog.text


@pytest.mark.parametrize("objective", ["vipra", "actionvla"])
def test_history_frame_before_o_t(prerequisites, tmp_path, objective):
    """``model.history_frames=1``, k = 7: each pretraining example's vision block is o_{t-7}, eof,
    o_t, ...: o_{t-7} the raw episode's frame 7 steps before the sample's anchor (its first frame
    while t < 7), while the latent codes stay the LAQ's codes of the window from o_t (vipra) and the
    targets those of o_t's sample (actionvla: its action's bins)."""
    from jaxvla.data import sequences as seq
    from jaxvla.data.pipeline import make_batches
    from jaxvla.data.stats import bin_actions
    from jaxvla.frozen import load_laq
    from jaxvla.frozen import FrameTokenizer
    from jaxvla.stages import build_stage, pretrain

    config = tiny_pretrain_config(prerequisites, **{
        "model.objective": objective, "model.history_frames": 1, "model.history_stride": 7, "model.pack": False,
        "model.seq_len": 320,
        "data.num_bins": 256 if objective == "actionvla" else 0, "data.stats_dir": str(tmp_path / "stats")})
    stage = build_stage(config)
    assert int(stage.assets["history_frames"]) == 1 and int(stage.assets["history_stride"]) == 7
    batch = next(stage.batches(0))
    laq = load_laq(prerequisites["laq"]) if objective == "vipra" else None
    raw = next(iter(make_batches(pretrain.data_config_for(config, laq, None), batch_size=4, train=True,
                                 seed=config.seed)))  # the stage's first pipeline batch
    images, timestep = raw["observation"]["image_primary"], raw["observation"]["timestep"]
    own = 3 if objective == "vipra" else 1  # the LAQ's clip of 2 x 4 steps / one frame
    assert images.shape[:2] == (4, 1 + own)
    np.testing.assert_array_equal(timestep[:, 0], np.maximum(timestep[:, 1] - 7, 0))
    if objective == "vipra":
        np.testing.assert_array_equal(timestep[:, 1:], timestep[:, 1:2] + np.array([0, 4, 8]))
    frames = FrameTokenizer.from_checkpoint(prerequisites["tokenizer"])
    index = [0, 1, -1] if objective == "vipra" else [0, 1]  # tokenized as the stage does: one call
    codes = frames.tokens(images[:, index])  # [4, 3 or 2, N]
    latents = laq.encode(images[:, 1:]) if objective == "vipra" else None  # [4, H, M]: the window from o_t
    n = frames.tokens_per_frame
    eof = frames.codebook_size
    for row in range(4):
        tokens, modality = batch["tokens"][row], batch["modality"][row]
        image = tokens[modality == seq.IMAGE]
        np.testing.assert_array_equal(image[:n], codes[row, 0])  # o_{t-7}
        assert image[n] == eof
        np.testing.assert_array_equal(image[n + 1:2 * n + 1], codes[row, 1])  # o_t
        if objective == "vipra":
            np.testing.assert_array_equal(image[2 * n + 2:3 * n + 2], codes[row, -1])  # o_{t+H}
            latent = tokens[modality == seq.LATENT].reshape(latents.shape[1], -1)[:, :-1]  # separators dropped
            np.testing.assert_array_equal(latent, latents[row])
        else:
            edges = np.asarray(next(iter(stage.assets["statistics"].values()))["action"]["bin_edges"])
            np.testing.assert_array_equal(tokens[modality == seq.ACTION], bin_actions(raw["action"][row], edges))
