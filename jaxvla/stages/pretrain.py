"""Stage 2: latent pretraining. Config ``configs/pretrain.py``; backbone ``jaxvla/models/llama.py``;
loss ``jaxvla/losses/pretrain.py``; sequences ``jaxvla/data/sequences.py``.

Prerequisites (``prerequisites``; the build only checks them, ``python -m jaxvla.train`` makes
missing ones first): the embedded Meta-World dataset (``data.generate_metaworld``), the image
tokenizer (``model.tokenizer_checkpoint``, trained from ``model.tokenizer_config`` for
``model.tokenizer_steps``) and, with ``latent_source="laq"``, the LAQ (``model.laq_checkpoint``,
from ``model.laq_config`` for ``model.laq_steps``). The frozen encoders come from ``jaxvla.frozen``.

Each batch: pipeline samples -> frames through the frozen image tokenizer (stage 0) -> latent
actions from the LAQ (stage 1: encoded on the fly, or read from the labeller's output) or, for
ACTIONVLA, the ground-truth action bins -> the LAPA / ViPRA / ACTIONVLA sequence of every sample
-> ``[B, seq_len]`` arrays, one example a row, or (``config.model.pack``) the batch's examples
in the packed layout: rows sized to the longest possible example, several a row only where that
pads less (``SequencePacker``, :func:`jaxvla.data.sequences.packing_layout`). Parameters are
``{"backbone": <Llama params>}``, the layout the finetuning stage's ``init_from`` expects.

Windows follow the latent actions: with ``latent_source="laq"`` the data sample is the LAQ's own
(lapa: pairs (o_t, o_{t+H}); vipra: clips o_t, o_{t+s}, ..., o_{t+Ls}, whose last frame is the
future frame o_{t+H}); with ``"labels"`` it is pairs (o_t, o_{t+H}) with H the labels' window
span and the codes joined at t.

Frame history (``model.history_frames`` = 1, every objective, ViPRA's o_{t-k}): the vision block
is ``<vision> o_{t-k} eof o_t ...`` with k = ``model.history_stride`` control steps (the protocol's
7); the pipeline prepends that frame to each sample's window (frame 0 when t < k, as in finetuning
and in a policy), while the anchor t, the LAQ's window and the joined labels stay those of o_t. The
packed layout's longest example is built from a real batch, so it counts the extra frame. Assets
record ``history_frames`` / ``history_stride``.

With ``latent_source="synthetic"`` the stage needs no data, tokenizer or LAQ: batches are random
ids in the objective's real layout (``jaxvla.data.sequences.synthetic_batch``; one image frame is
``max_targets.image`` codes), batch ``s`` drawn from ``(seed, s)`` and split across processes. The
backbone, loss and train step are the ones real runs use; ``scripts/plan.py``, the train-step
benchmarks and the multi-process tests run on it.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxvla import frozen
from jaxvla.data import sequences as seq
from jaxvla.data.embedded import configured_dataset
from jaxvla.data.latent_labels import load_latent_labels
from jaxvla.data.stats import bin_actions, to_jsonable
from jaxvla.losses.pretrain import check_target_caps, pretrain_loss
from jaxvla.models.llama import Llama, llama_config
from jaxvla.sharding import resolve_mesh_shape
from jaxvla.stages import (Checkpoint, DataStream, Stage, data_with_history, history_settings, image_tokenizer,
                           image_tokenizer_checkpoint, require)

log = logging.getLogger("jaxvla")

WINDOW_KEYS = ("sample", "gap_seconds", "gap_frames", "clip_length", "clip_stride", "clip_stride_seconds")


def _reads_laq(config) -> bool:
    """Whether the latent actions come from the LAQ on the fly (ACTIONVLA reads none; an unknown
    source is an error)."""
    mc = config.model
    if mc.objective == "actionvla":
        return False
    if mc.latent_source not in ("laq", "labels", "synthetic"):
        raise ValueError(f"config.model.latent_source={mc.latent_source!r}; expected 'laq', 'labels' or 'synthetic'")
    return mc.latent_source == "laq"


def laq_checkpoint(config) -> Checkpoint:
    """The LAQ ``latent_source="laq"`` encodes with: ``config.model.laq_checkpoint``, trained from
    ``model.laq_config`` for ``model.laq_steps`` on this run's data directory when missing."""
    mc = config.model
    return Checkpoint("LAQ", str(mc.laq_checkpoint), str(mc.laq_config),
                      {"num_steps": mc.laq_steps, "data.data_dir": config.data.data_dir})


def prerequisites(config) -> list:
    """What pretraining reads, in the order to make it: the embedded Meta-World dataset (when
    ``config.data`` asks for it), the image tokenizer, the LAQ (``latent_source="laq"``); nothing
    with ``latent_source="synthetic"``."""
    if config.model.latent_source == "synthetic":
        return []
    data = configured_dataset(config.data)
    needs = [data] if data is not None else []
    needs.append(image_tokenizer_checkpoint(config))
    if _reads_laq(config):
        needs.append(laq_checkpoint(config))
    return needs


def _prerequisites(config):
    """(FrameTokenizer, LoadedLAQ or None, labels info or None): the frozen encoders and labels the
    batches need (the checkpoints are there: ``require(prerequisites(config))``)."""
    mc, data = config.model, config.data
    frames = image_tokenizer(config)
    if mc.objective == "actionvla":
        return frames, None, None
    if mc.latent_source == "labels":
        if not mc.labels_dir:
            raise ValueError("config.model.latent_source='labels' needs config.model.labels_dir")
        info, _ = load_latent_labels(mc.labels_dir)
        variant = info.get("meta", {}).get("variant")
        if variant != mc.objective:
            raise ValueError(f"{mc.labels_dir}: labels of a {variant!r} LAQ, but config.model.objective={mc.objective!r}")
        return frames, None, info
    laq_dir = laq_checkpoint(config).workdir
    laq = frozen.load_laq(laq_dir)
    if laq.model.variant != mc.objective:
        raise ValueError(
            f"{laq_dir} holds a {laq.model.variant!r} LAQ but config.model.objective={mc.objective!r} "
            "(set config.model.laq_checkpoint)"
        )
    if laq.model.image_size != int(data.image_size):
        raise ValueError(f"config.data.image_size={data.image_size} but the LAQ reads {laq.model.image_size} px")
    return frames, laq, None


def data_config_for(config, laq, labels_info) -> ml_collections.ConfigDict:
    """``config.data`` with the sample window the latent actions need and, with
    ``model.history_frames`` = 1, the history frame o_{t-k} (k = ``model.history_stride``) before
    each sample's frames (the anchor t, the LAQ's window and the labels stay those of o_t)."""
    data = data_with_history(config.data, *history_settings(config.model))
    if config.model.objective == "actionvla":
        data.sample = "frames"
    elif laq is not None:
        for key in WINDOW_KEYS:  # an LAQ from before a key existed: that key's default
            data[key] = laq.config.data.get(key, data[key])
    else:
        data.sample = "pairs"
        data.gap_frames = int(labels_info["meta"]["frame_offsets"][-1])
        data.latent_labels = config.model.labels_dir
        data.latent_labels_hash = labels_info["laq_config_hash"]
    return data


def packing_group(config) -> int:
    """Examples whose count every packed row count respects: with ``d`` examples a row (``d``
    dividing this group) the global rows ``batch_size / d`` stay divisible by the processes and by
    data x fsdp x grad_accum_steps, as ``batch_size`` is (``jaxvla.config.validate``). The mesh is
    resolved against ``jax.device_count()``; a mesh that does not resolve counts every device."""
    try:
        data, fsdp, _ = resolve_mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, jax.device_count())
        parallel = data * fsdp
    except ValueError:
        parallel = jax.device_count()
    unit = math.lcm(parallel * int(config.optimizer.grad_accum_steps), jax.process_count())
    return config.batch_size // unit if config.batch_size % unit == 0 else 1


class _RowCaps(Mapping):
    """The loss's per-row target caps, read from the packer's layout (known after its first batch)."""

    def __init__(self, packer: "SequencePacker"):
        self._packer = packer

    def _caps(self) -> dict[str, int]:
        if self._packer.layout is None:
            raise RuntimeError("pretraining: the packed layout is set by the first batch; the loss ran before it")
        return self._packer.layout.row_caps

    def __getitem__(self, name):
        return self._caps()[name]

    def __iter__(self):
        return iter(self._caps())

    def __len__(self):
        return len(self._caps())


class SequencePacker:
    """Pipeline batch -> sequence batch (numpy) for one objective.

    ``config.model.pack=False``: one example a ``[B, seq_len]`` row, ``max_targets`` per row.
    ``pack=True``: the examples packed by :func:`jaxvla.data.sequences.pack_examples` into the
    :class:`~jaxvla.data.sequences.PackingLayout` that the first batch fixes: its first example
    rebuilt with a prompt of ``pack_prompt_tokens`` ids is the longest example any batch can hold
    (longer prompts raise, naming that key), at most ``seq_len`` tokens a row, as many a row as
    pad least (one, unless rows are rounded); the per-row target caps follow from it
    (:attr:`max_targets`).
    """

    def __init__(self, config, frames: frozen.FrameTokenizer, laq, vocab: seq.Vocab, bin_edges=None):
        self.mc = config.model
        self.frames, self.laq, self.vocab, self.bin_edges = frames, laq, vocab, bin_edges
        self.text = frozen.TextPrompts(self.mc.text_tokenizer)
        self.pack = bool(self.mc.get("pack", False))
        self.history_frames, self.history_stride = history_settings(self.mc)
        self.layout: seq.PackingLayout | None = None
        self.group = packing_group(config)
        if self.pack:
            self.prompt_budget = int(self.mc.pack_prompt_tokens)
            self.text.set_budget(self.prompt_budget, "config.model.pack_prompt_tokens")
            self.max_targets: Mapping[str, int] = _RowCaps(self)
        else:
            self.max_targets = dict(self.mc.max_targets)

    def latent_codes(self, batch: dict, images: np.ndarray) -> np.ndarray:
        if self.laq is not None:
            return self.laq.encode(images)  # [B, K, M]
        return np.asarray(batch["latent_action"])

    def example_builder(self, batch: dict):
        """``build(i, prompt_ids) -> example`` for the ``i``-th sample of ``batch`` (the frames
        tokenized, the latent codes or action bins computed once for the whole batch).

        With ``history_frames`` = 1 the pipeline's windows start with o_{t-k} (``data_config_for``):
        frames ``[B, 2, S, S, 3]`` (o_{t-k}, o_t), pairs ``[B, 3, ...]`` (o_{t-k}, o_t, o_{t+H}),
        clips ``[B, 1 + L+1, ...]``; the LAQ encodes the window without it (from o_t on) and
        ``prev_image`` puts its tokens before o_t's."""
        mc, vocab, markers = self.mc, self.vocab, self.text.markers
        images = np.asarray(batch["observation"]["image_primary"])
        h = self.history_frames
        if h and (images.ndim != 5 or images.shape[1] < 2):
            raise ValueError(f"pretraining with config.model.history_frames={h}: expected frame windows "
                             f"[B, 1 + F, S, S, 3] starting with o_{{t-k}}, got images {images.shape}")
        if mc.objective == "actionvla":
            tokens = self.frames.tokens(images)  # [B, N], with history [B, 2, N]
            current, previous = (tokens[:, h], tokens[:, 0]) if h else (tokens, None)
            bins = bin_actions(np.asarray(batch["action"]), self.bin_edges)  # [B, A]
            return lambda i, prompt: seq.build_actionvla(
                prompt, current[i], bins[i], markers, vocab, mc.seq_len, action_weight=mc.action_weight,
                text_weight=mc.text_weight, prev_image=None if previous is None else previous[i])
        # [o_{t-k},] o_t (and, for vipra, o_{t+H}) through the tokenizer in one call.
        frame_index = list(range(h)) + ([h, images.shape[1] - 1] if mc.objective == "vipra" else [h])
        tokens = self.frames.tokens(images[:, frame_index])  # [B, h + 1 or h + 2, N]
        first, future = tokens[:, h], tokens[:, -1]
        previous = tokens[:, 0] if h else None
        codes = self.latent_codes(batch, images[:, h:])  # the LAQ's own window, from o_t

        def prev(i):
            return None if previous is None else previous[i]

        if mc.objective == "lapa":
            return lambda i, prompt: seq.build_lapa(prompt, first[i], codes[i].reshape(-1), markers, vocab, mc.seq_len,
                                                    latent_weight=mc.latent_weight, text_weight=mc.text_weight,
                                                    prev_image=prev(i))
        return lambda i, prompt: seq.build_vipra(prompt, first[i], future[i], codes[i], markers, vocab, mc.seq_len,
                                                 latent_weight=mc.latent_weight, future_weight=mc.future_weight,
                                                 text_weight=mc.text_weight, prev_image=prev(i))

    def __call__(self, batch: dict) -> dict:
        build = self.example_builder(batch)
        instructions = batch["task"]["language_instruction"]
        built = [build(i, self.text(instruction)) for i, instruction in enumerate(instructions)]
        if not self.pack:
            stacked = seq.stack_examples(built)
            check_target_caps(stacked, self.max_targets, "config.model.max_targets")
            return stacked
        if self.layout is None:
            longest = build(0, np.concatenate([[self.vocab.bos_id], np.zeros(self.prompt_budget - 1)]).astype(np.int32))
            self.layout = layout_for(longest, len(built), self.group, self.mc.seq_len)
            log.info("packing: %s", describe_layout(self.layout, len(built)))
        return pack_batch(built, self.layout)


def layout_for(longest: dict, num_examples: int, group: int, seq_len: int) -> seq.PackingLayout:
    """The packing layout of ``num_examples`` examples (``group`` divides it, see :func:`packing_group`)
    no longer than the built example ``longest``, rows of at most ``seq_len`` tokens."""
    return seq.packing_layout(num_examples, seq.example_length(longest), seq.example_target_counts(longest),
                              int(seq_len), group=math.gcd(group, num_examples),
                              where="config.model.seq_len (or lower config.model.pack_prompt_tokens)")


def pack_batch(built: list, layout: seq.PackingLayout) -> dict:
    packed = seq.pack_examples(built, layout.row_len, layout.num_rows, max_per_row=layout.examples_per_row)
    check_target_caps(packed, layout.row_caps, "the packed layout's caps (config.model.pack_prompt_tokens)")
    return packed


def describe_layout(layout: seq.PackingLayout, num_examples: int) -> str:
    caps = ", ".join(f"{name} {count}" for name, count in layout.row_caps.items())
    return (f"{num_examples} examples of <= {layout.example_len} tokens in {layout.num_rows} rows of "
            f"{layout.row_len} ({layout.examples_per_row} a row); targets gathered per row: {caps}")


def synthetic_vocab(size: str) -> seq.Vocab:
    """The backbone size's tables: its image table's codes (at most LWM's 8192), 8 latent codes."""
    table = llama_config(size).image_vocab
    return seq.Vocab(image_codes=min(table - 2, 8192), image_vocab=table, latent_codes=8, action_bins=256)


def synthetic_batches(config, vocab: seq.Vocab):
    """(batches, eval_batches, layout) of random sequences; global batch ``s`` depends on (seed, s)
    only and each process takes its rows, so any process count sees the same global batch. With
    ``config.model.pack`` the global batch's ``batch_size`` examples are packed (``layout``: a
    :class:`~jaxvla.data.sequences.PackingLayout`; None unpacked)."""
    mc = config.model
    examples = functools.partial(seq.synthetic_examples, objective=mc.objective, vocab=vocab, max_len=mc.seq_len,
                                 frame_tokens=int(mc.max_targets["image"]),
                                 latent_shape=tuple(mc.synthetic_latent_shape),
                                 history_frames=history_settings(mc)[0])
    layout = None
    if mc.get("pack", False):
        longest = examples(np.random.default_rng(0), 1)[0]  # every synthetic example has this length
        layout = layout_for(longest, config.batch_size, packing_group(config), mc.seq_len)
        log.info("packing (synthetic): %s", describe_layout(layout, config.batch_size))
    batches, eval_batches = seeded_batch_streams(config, examples, layout)
    return batches, eval_batches, layout


def seeded_batch_streams(config, examples, layout, check=None):
    """(batches(start_step), eval_batches()) of generated examples: global batch ``s`` is
    ``examples(np.random.default_rng([seed, s]), batch_size)`` stacked (``layout`` None; then
    ``check(batch)`` if given) or packed into ``layout``; each process takes its rows, so any
    process count sees the same global batch. Eval batches use ``config.seed + 1``."""
    rows_total = config.batch_size if layout is None else layout.num_rows
    per_process = rows_total // jax.process_count()
    rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)

    def global_batch(seed, step):
        built = examples(np.random.default_rng([seed, step]), config.batch_size)
        if layout is None:
            batch = seq.stack_examples(built)
            if check is not None:
                check(batch)
        else:
            batch = pack_batch(built, layout)
        return {key: value[rows] for key, value in batch.items()}

    def batches(start_step: int):
        step = start_step
        while True:
            yield global_batch(config.seed, step)
            step += 1

    def eval_batches():
        return (global_batch(config.seed + 1, i) for i in range(max(1, config.eval_batches)))

    return batches, eval_batches


def build(config) -> Stage:
    from jaxvla.data.pipeline import make_batches  # TensorFlow: only for real data, not synthetic sequences

    mc = config.model
    if mc.latent_source == "synthetic":
        vocab = synthetic_vocab(mc.size)
        batches, eval_batches, layout = synthetic_batches(config, vocab)
        return _stage(config, vocab, batches, eval_batches, {
            "objective": mc.objective, "latent_source": "synthetic", "vocab_sizes": np.asarray(vocab.sizes),
            "seq_len": np.asarray(mc.seq_len), "history_frames": np.asarray(history_settings(mc)[0]),
            "history_stride": np.asarray(history_settings(mc)[1])}, max_targets=dict(mc.max_targets) if layout is None else layout.row_caps)
    require(prerequisites(config), "pretraining")
    frames, laq, labels_info = _prerequisites(config)
    data = data_config_for(config, laq, labels_info)
    latent_codes = laq.model.codebook_size if laq is not None else int(labels_info["codebook_size"]) if labels_info else 8
    vocab = frozen.make_vocab(mc.size, frames, latent_codes, action_bins=256)
    per_process = config.batch_size // jax.process_count()

    bin_edges = None
    statistics = {}
    if mc.objective == "actionvla":
        probe = make_batches(data, batch_size=per_process, train=True, seed=config.seed)
        statistics = probe.statistics
        bin_edges = np.asarray(next(iter(statistics.values()))["action"]["bin_edges"])
    packer = SequencePacker(config, frames, laq, vocab, bin_edges)
    log.info(
        "pretraining (%s): %s sequences of %d tokens; image tokens per frame %d; latent codes %d; %s",
        mc.objective, data.sample, mc.seq_len, frames.tokens_per_frame, latent_codes,
        f"LAQ {laq.checkpoint}" if laq is not None else (f"labels {mc.labels_dir}" if labels_info else "action bins"),
    )

    def batches(start_step: int):
        stream = make_batches(data, batch_size=per_process, train=True, seed=config.seed, start_step=start_step)
        return DataStream(stream, packer)

    def eval_batches():
        stream = make_batches(data, batch_size=per_process, train=False, seed=config.seed + 1)
        return (packer(b) for b in stream)

    assets = {
        "objective": mc.objective,
        "vocab_sizes": np.asarray(vocab.sizes),
        "image_codes": np.asarray(vocab.image_codes),
        "latent_codes": np.asarray(vocab.latent_codes),
        "seq_len": np.asarray(mc.seq_len),
        "tokenizer_checkpoint": frames.checkpoint,
        # The vision block: history_frames (0 / 1) earlier frames o_{t-k}, k = history_stride steps.
        "history_frames": np.asarray(packer.history_frames),
        "history_stride": np.asarray(packer.history_stride),
    }
    if laq is not None:
        assets.update(laq_checkpoint=laq.checkpoint, laq_config_hash=laq.config_hash)
    if labels_info is not None:
        assets.update(labels_dir=mc.labels_dir, laq_config_hash=labels_info["laq_config_hash"])
    if statistics:
        assets["statistics"] = to_jsonable(statistics)
    return _stage(config, vocab, batches, eval_batches, assets, max_targets=packer.max_targets)


def _stage(config, vocab: seq.Vocab, batches, eval_batches, assets, max_targets) -> Stage:
    """The backbone for ``vocab`` with the objective's tables, its initialiser and loss."""
    mc = config.model
    backbone = Llama(frozen.backbone_config(
        mc, vocab, compute_dtype=config.compute_dtype, remat=config.remat_policy,
        latent=mc.objective != "actionvla", action=mc.objective == "actionvla"))
    if backbone.config.max_len < mc.seq_len:
        raise ValueError(f"config.model.seq_len={mc.seq_len} exceeds the backbone's max_len {backbone.config.max_len}")

    def init_variables(rng):
        ones = jnp.ones((1, mc.seq_len), jnp.int32)
        variables = backbone.init(rng, ones, jnp.zeros_like(ones), jnp.arange(mc.seq_len)[None], ones,
                                  jnp.zeros_like(ones))
        return {"params": {"backbone": variables["params"]}}

    return Stage(
        init_variables=init_variables,
        loss_fn=functools.partial(pretrain_loss, backbone=backbone, max_targets=max_targets),
        batches=batches,
        eval_batches=eval_batches,
        assets=assets,
    )
