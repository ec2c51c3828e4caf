"""Stage 3: action finetuning of the backbone. Config ``configs/finetune.py``; losses
``jaxvla/losses/finetune.py``.

``config.model.head``:

* ``flow`` (ViPRA-FM): params ``{"backbone": Llama (no latent, no action vocabulary),
  "action_encoder": ActionEncoder(width=dim), "velocity_head": VelocityHead(A)}``; sequences of
  ``build_flow`` (prefix + ``chunk`` placeholder slots in one bidirectional block); actions
  normalised by ``data.action_normalization`` (q01q99 -> [-1, 1], gripper untouched).
* ``bins`` (LAPA / OpenVLA): params ``{"backbone": Llama (no latent vocabulary, 256 action
  bins)}``; sequences of ``build_bins`` with the A bins of the chunk's first action
  (``chunk`` = 1), quantile edges from ``data.num_bins``; actions unnormalised.

``init_from`` (a stage 2 workdir whose params are ``{"backbone": ...}`` with the latent table and
head) keeps the backbone, drops ``embed_latent`` / ``head_latent`` (and, for flow, the action
table / head), initialises what is new; the trainer logs every decision.

Frames are tokenized host-side in the batch iterator by the frozen image tokenizer
(``model.tokenizer_checkpoint``, trained first with ``model.tokenizer_steps`` when missing), the
instruction by the SentencePiece model, then laid out, so the loss sees int arrays only.

Sequence layout, fixed at build time (:func:`longest_example`, :func:`layout_for`): the longest
example is the one whose prompt has ``model.prompt_tokens`` ids (bos and template included; a
longer instruction is an error naming that key) with the tokenizer's image tokens and the action
part. Its length is every example's budget: the ``seq_len`` asset, from which a policy derives
the same prompt budget.

* flow: one example a row of exactly that length (its fixed prefix layout: the KV-cached sampler
  prefills the prefix once and appends the action block); padding only where a prompt is shorter
  than the budget.
* bins, ``model.pack`` (default): the examples packed ``d`` a row
  (``jaxvla.data.sequences.pack_examples``, the mechanism of packed pretraining): ``d`` the largest
  divisor of pretraining's :func:`~jaxvla.stages.pretrain.packing_group` with ``d`` examples in
  ``model.seq_len`` tokens, rows of ``d`` x the longest example, the loss's action gather ``d`` x A
  a row and the loss the mean over examples. ``pack=False``: ``d`` = 1.

Batch (numpy, per process): the ``SEQUENCE_KEYS`` arrays ``[R, L]`` (flow: R = B). Flow adds
``action_positions`` ``[B, K]``, ``action`` ``[B, K, A]`` float32 and ``action_pad_mask`` ``[B, K]``.
Bins add ``num_examples`` ``[R]`` (always ``d``) and, by row and slot (example ``r * d + j`` of the
pipeline batch is slot ``j`` of row ``r``, so every array splits along its leading axis with its
rows, across devices and gradient-accumulation micro-batches), ``action_positions`` ``[R, d, A]``
(indices in the row), ``action_bins`` ``[R, d, A]``, ``action`` ``[R, d, K, A]``, ``action_pad_mask``
``[R, d, K]`` and, in eval batches, ``bin_centres`` ``[R, d, A, V]``.

Assets (everything a policy needs to turn outputs into robot actions): ``head``, ``chunk``,
``action_dim``, ``execute_steps``, ``image_size``, ``seq_len`` (one example's budget, see above),
``prompt_tokens``, ``layout`` (rows, row length, examples a row), ``vocab`` sizes and special ids,
``tokenizer_checkpoint``, ``text_tokenizer``, ``action_normalization``, per dataset
``statistics`` (action / proprio mean, std, min, max, q01, q99 (+ ``bin_edges`` when bins)),
``normalize_mask``, ``gripper_dims``, and for bins ``bin_edges`` / ``bin_centres`` of the first
dataset.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxvla.data import sequences as seq
from jaxvla.data.embedded import ensure_configured_dataset
from jaxvla.stages import DataStream, Stage

log = logging.getLogger("jaxvla")

TEXT_VOCAB = 32000
LATENT_CODES = 8


class Models:
    """The modules of the finetuning model (bound into the losses by keyword)."""

    def __init__(self, config, vocab, action_dim: int):
        from jaxvla.models.action_heads import ActionEncoder, VelocityHead
        from jaxvla.models.llama import Llama
        from jaxvla.stages.vla import backbone_config

        mc = config.model
        self.head = mc.head
        self.llama_config = backbone_config(mc, vocab, compute_dtype=config.compute_dtype,
                                            remat=config.remat_policy, latent=False, action=mc.head == "bins")
        self.backbone = Llama(self.llama_config)
        dtype = jnp.dtype(config.compute_dtype)
        dim = self.llama_config.dim
        time_dim = int(mc.get("time_dim") or min(256, dim))
        time_dim += time_dim % 2
        self.action_encoder = ActionEncoder(width=dim, time_dim=time_dim, dtype=dtype)
        self.velocity_head = VelocityHead(action_dim, dtype=dtype)

    @property
    def flow_modules(self) -> dict:
        return dict(backbone=self.backbone, action_encoder=self.action_encoder, velocity_head=self.velocity_head)


def check_config(config) -> None:
    mc, data = config.model, config.data
    if mc.head not in ("flow", "bins"):
        raise ValueError(f"config.model.head={mc.head!r}; expected 'flow' or 'bins'")
    if data.sample != "chunks":
        raise ValueError(f"config.data.sample={data.sample!r}; finetuning reads 'chunks'")
    if int(data.chunk_size) != int(mc.chunk):
        raise ValueError(f"config.data.chunk_size={data.chunk_size} but config.model.chunk={mc.chunk}; set them equal")
    if int(data.get("history", 1)) != 1:
        raise ValueError(f"config.data.history={data.history}: finetuning reads one frame (history 1)")
    if mc.head == "bins" and int(data.num_bins) <= 0:
        raise ValueError("config.model.head='bins' needs config.data.num_bins > 0 (e.g. 256)")
    if mc.head == "bins" and (data.action_normalization or "none") != "none":
        raise ValueError(f"config.model.head='bins' bins raw actions: set config.data.action_normalization='none' "
                         f"(got {data.action_normalization!r})")
    if int(mc.prompt_tokens) < 1:
        raise ValueError(f"config.model.prompt_tokens={mc.prompt_tokens}: expected >= 1 (bos and template included)")
    if mc.head == "flow" and mc.get("pack", False):
        raise ValueError("config.model.pack=True needs head='bins': flow keeps one example a row (its KV-cached "
                         "sampler prefills one fixed prefix per row)")


LAYOUT_KEYS = "config.model.seq_len (or lower config.model.prompt_tokens)"


def longest_example(head: str, prompt_tokens: int, markers, vocab: seq.Vocab, tokens_per_frame: int, *,
                    chunk: int, action_dim: int) -> dict:
    """The longest example finetuning builds: a ``prompt_tokens``-id prompt (bos, then zeros), a
    frame of ``tokens_per_frame`` codes and the head's action part (flow: ``chunk`` slots; bins: A
    bins). Only its length and its targets count (the builders' layouts do not depend on ids)."""
    prompt = np.concatenate([[vocab.bos_id], np.zeros(prompt_tokens - 1)]).astype(np.int32)
    image = np.zeros(tokens_per_frame, np.int32)
    # A bound the example always fits (markers are a few ids each), so the builder never refuses it.
    bound = prompt_tokens + tokens_per_frame + chunk + action_dim + sum(np.size(m) for m in markers.values()) + 8
    if head == "flow":
        return seq.build_flow(prompt, image, markers, vocab, bound, chunk=chunk)
    return seq.build_bins(prompt, image, np.zeros(action_dim, np.int32), markers, vocab, bound)


def layout_for(config, longest: dict, num_examples: int, group: int | None = None) -> seq.PackingLayout:
    """The rows of ``num_examples`` (a process's batch) examples no longer than ``longest``.
    bins with ``model.pack``: ``d`` a row, ``d`` dividing ``group`` (default pretraining's
    :func:`~jaxvla.stages.pretrain.packing_group`, which keeps rows divisible by processes and data
    x fsdp x gradient accumulation) and ``d`` examples within ``model.seq_len``; otherwise one a
    row. Either way rows hold ``d`` x the longest example's tokens; one longer than
    ``model.seq_len`` is an error naming it."""
    from jaxvla.stages.pretrain import packing_group

    mc = config.model
    if mc.head == "bins" and mc.get("pack", False):
        group = math.gcd(packing_group(config) if group is None else int(group), num_examples)
    else:
        group = 1
    return seq.packing_layout(num_examples, seq.example_length(longest), seq.example_target_counts(longest),
                              int(mc.seq_len), group=group, where=LAYOUT_KEYS)


def describe_layout(head: str, layout: seq.PackingLayout) -> str:
    examples = layout.num_rows * layout.examples_per_row
    return (f"{head}: {examples} examples of <= {layout.example_len} tokens in {layout.num_rows} rows of "
            f"{layout.row_len} ({layout.examples_per_row} a row)")


def pack_bins(built: list, per_example: dict, layout: seq.PackingLayout) -> dict:
    """Bins examples (``build_bins`` dicts, any ``max_len``) -> the packed batch of ``layout``:
    ``SEQUENCE_KEYS`` ``[R, row_len]``, ``num_examples`` ``[R]``, ``action_positions`` ``[R, d, A]``
    (indices in the row) and every ``per_example`` array ``[N, ...]`` as ``[R, d, ...]``."""
    from jaxvla.losses.pretrain import target_counts

    rows, per_row = layout.num_rows, layout.examples_per_row
    packed, placement = seq.pack_examples(built, layout.row_len, rows, max_per_row=per_row, with_placement=True)
    # Rows of d x the longest example take d examples each, in order (example r * d + j is slot j of
    # row r); a row with fewer would leave slots of the [R, d, ...] arrays empty.
    if len(built) != rows * per_row or np.any(packed["num_examples"] != per_row):
        raise ValueError(f"pack_bins: {len(built)} examples packed {packed['num_examples'].tolist()} a row; the "
                         f"layout expects {per_row} in each of {rows} rows")
    # The loss gathers the layout's cap of action targets a row: more would be dropped silently.
    count, cap = target_counts(packed)["action"], int(layout.row_caps["action"])
    if count > cap:
        raise ValueError(f"pack_bins: a row has {count} action targets but the loss gathers {cap} (the longest "
                         f"example's, times {per_row}): an example has more action dims than the longest one")

    def by_slot(values):
        values = np.asarray(values)
        out = np.zeros((rows, per_row) + values.shape[1:], values.dtype)
        out[placement["row"], placement["slot"]] = values
        return out

    starts = placement["start"][:, None]
    batch = dict(packed, action_positions=by_slot(np.stack([e["action_positions"] for e in built]) + starts))
    for key, values in per_example.items():
        batch[key] = by_slot(values)
    return batch


class SequencePacker:
    """Pipeline chunk batches -> sequence batches in ``layout`` (host side; see the module
    docstring). The prompts' budget is set here: a longer instruction raises naming
    ``config.model.prompt_tokens``."""

    def __init__(self, config, frames, prompts, vocab, datasets: dict, layout: seq.PackingLayout):
        self.config = config
        self.head = config.model.head
        self.frames = frames
        self.prompts = prompts
        self.prompts.set_budget(int(config.model.prompt_tokens), "config.model.prompt_tokens")
        self.vocab = vocab
        self.layout = layout
        self.chunk = int(config.model.chunk)
        self.datasets = datasets  # name -> {"edges", "gripper_dims", "centres"} (bins)
        self.default = next(iter(datasets)) if datasets else None

    def _dataset(self, name) -> dict:
        if isinstance(name, bytes):
            name = name.decode("utf-8")
        return self.datasets.get(str(name)) or self.datasets[self.default]

    def __call__(self, batch: dict, eval: bool = False) -> dict:
        from jaxvla.data import stats as stats_lib

        images = _lookup(batch, "observation/image_primary")
        codes = self.frames.tokens(images)  # [B, N]
        instructions = _lookup(batch, "task/language_instruction")
        actions = np.asarray(batch["action"], np.float32)
        pad_mask = np.asarray(batch["action_pad_mask"], bool)
        names = batch.get("dataset_name", [None] * len(actions))
        markers, layout = self.prompts.markers, self.layout
        if self.head == "flow":
            seqs = [seq.build_flow(self.prompts(instructions[i]), codes[i], markers, self.vocab, layout.row_len,
                                   chunk=self.chunk) for i in range(len(actions))]
            return dict(seq.batch_sequences(seqs), action=actions, action_pad_mask=pad_mask)
        built, bins, centres = [], [], []
        for i in range(len(actions)):
            info = self._dataset(names[i])
            bins.append(stats_lib.bin_actions(actions[i, :1], info["edges"], info["gripper_dims"])[0].astype(np.int32))
            centres.append(info["centres"])
            built.append(seq.build_bins(self.prompts(instructions[i]), codes[i], bins[-1], markers, self.vocab,
                                        layout.example_len))
        per_example = {"action_bins": np.stack(bins), "action": actions, "action_pad_mask": pad_mask}
        if eval:
            per_example["bin_centres"] = np.stack(centres).astype(np.float32)
        return pack_bins(built, per_example, layout)


def _lookup(tree: dict, key: str):
    """``tree["a/b"]`` or ``tree["a"]["b"]``."""
    if key in tree:
        return tree[key]
    node = tree
    for part in key.split("/"):
        node = node[part]
    return node


def _norm_mask(spec, action_dim: int) -> np.ndarray:
    if spec.normalize_mask is not None:
        return np.asarray(spec.normalize_mask, bool)
    mask = np.ones((action_dim,), bool)
    for d in spec.gripper_dims:
        if -action_dim <= d < action_dim:
            mask[d] = False
    return mask


def build(config) -> Stage:
    from jaxvla.data.pipeline import make_batches as pipeline_batches
    from jaxvla.losses import finetune as losses
    from jaxvla.losses.actions import bin_centres
    from jaxvla.stages import vla

    check_config(config)
    ensure_configured_dataset(config.data)
    mc = config.model
    head = mc.head
    frames = vla.image_tokenizer(config)
    prompts = vla.TextPrompts(mc.text_tokenizer)
    action_bins = int(config.data.num_bins) if head == "bins" else 256
    vocab = vla.make_vocab(mc.size, frames, LATENT_CODES, action_bins, text_size=TEXT_VOCAB)

    per_process = config.batch_size // jax.process_count()

    def pipeline(train: bool, start_step: int = 0, seed_offset: int = 0):
        return pipeline_batches(config.data, batch_size=per_process, train=train, seed=config.seed + seed_offset,
                                start_step=start_step)

    # Statistics come with the pipeline (computed / cached on first use); the action dim from
    # them, or from a first batch when there are none.
    probe = pipeline(True)
    statistics = dict(probe.statistics)
    specs = [spec for spec, _ in probe.specs]
    dims = {int(np.asarray(s["action"]["q01"]).shape[-1]) for s in statistics.values()}
    action_dim = max(dims) if dims else int(next(iter(probe))["action"].shape[-1])
    del probe

    datasets, dataset_assets = {}, {}
    for spec in specs:
        entry = {"gripper_dims": np.asarray(spec.gripper_dims, np.int32),
                 "normalize_mask": _norm_mask(spec, action_dim)}
        if spec.name in statistics:
            entry["statistics"] = statistics[spec.name]
        if head == "bins":
            edges = np.asarray(statistics[spec.name]["action"]["bin_edges"], np.float32)
            centres = bin_centres(edges, tuple(spec.gripper_dims))
            datasets[spec.name] = {"edges": edges, "gripper_dims": tuple(spec.gripper_dims), "centres": centres}
        dataset_assets[spec.name] = entry
    if head == "flow" and (config.data.action_normalization or "none") == "none":
        log.warning("flow finetuning on unnormalised actions (config.data.action_normalization='none')")

    models = Models(config, vocab, action_dim)
    chunk = int(mc.chunk)
    longest = longest_example(head, int(mc.prompt_tokens), prompts.markers, vocab, frames.tokens_per_frame,
                              chunk=chunk, action_dim=action_dim)
    layout = layout_for(config, longest, per_process)
    packer = SequencePacker(config, frames, prompts, vocab, datasets, layout)
    log.info(
        "finetune (%s): backbone %s dim %d x %d layers, vocab text %d / image %d / action %d (no latent); "
        "chunk %d x %d action dims, image tokenizer %s (%d tokens per frame)",
        head, mc.size, models.llama_config.dim, models.llama_config.num_layers, vocab.text_size, vocab.image_size,
        models.llama_config.action_vocab, chunk, action_dim, frames.checkpoint, frames.tokens_per_frame,
    )
    log.info("finetune layout: %s (a %d-id prompt budget, config.model.prompt_tokens; rows of at most "
             "config.model.seq_len=%d)", describe_layout(head, layout), int(mc.prompt_tokens), int(mc.seq_len))

    def init_variables(rng):
        ids = jnp.zeros((1, layout.row_len), jnp.int32)
        b_rng, e_rng, v_rng = jax.random.split(rng, 3)
        params = {"backbone": models.backbone.init({"params": b_rng}, ids, ids, ids, ids + 1, ids)["params"]}
        if head == "flow":
            dim = models.llama_config.dim
            params["action_encoder"] = models.action_encoder.init(
                {"params": e_rng}, jnp.zeros((1, chunk, action_dim), jnp.float32), jnp.zeros((1,), jnp.float32))["params"]
            params["velocity_head"] = models.velocity_head.init(
                {"params": v_rng}, jnp.zeros((1, chunk, dim), jnp.float32))["params"]
        return {"params": params}

    if head == "flow":
        loss_fn = functools.partial(losses.flow_matching_loss, **models.flow_modules,
                                    time_alpha=float(mc.time_alpha), time_beta=float(mc.time_beta))
        eval_fn = functools.partial(losses.flow_eval_metrics, **models.flow_modules, time_alpha=float(mc.time_alpha),
                                    time_beta=float(mc.time_beta), num_steps=int(mc.flow_steps))
    else:
        # The action targets gathered a row: d examples x A bins (the layout's cap).
        caps = int(layout.row_caps["action"])
        loss_fn = functools.partial(losses.binned_action_loss, backbone=models.backbone, max_targets=caps)
        eval_fn = functools.partial(losses.bins_eval_metrics, backbone=models.backbone, max_targets=caps)

    def train_batches(start_step: int):
        return DataStream(pipeline(True, start_step), packer)

    def eval_batches():
        return (packer(b, eval=True) for b in pipeline(False, seed_offset=1))

    assets = {
        "head": head,
        "chunk": np.asarray(chunk),
        "action_dim": np.asarray(action_dim),
        "execute_steps": np.asarray(int(mc.get("execute_steps", chunk))),
        "flow_steps": np.asarray(int(mc.flow_steps)),
        "image_size": np.asarray(frames.image_size),
        "image_tokens": np.asarray(frames.tokens_per_frame),
        # One example's tokens: a policy builds its sequences at this length and derives the same
        # prompt budget from it (jaxvla.policy.prompt_token_budget).
        "seq_len": np.asarray(layout.example_len),
        "prompt_tokens": np.asarray(int(mc.prompt_tokens)),
        "layout": {"rows": np.asarray(layout.num_rows), "row_len": np.asarray(layout.row_len),
                   "examples_per_row": np.asarray(layout.examples_per_row)},
        "vocab": {"text": np.asarray(vocab.text_size), "image": np.asarray(vocab.image_size),
                  "image_codes": np.asarray(vocab.image_codes), "action": np.asarray(vocab.action_bins),
                  "eof_id": np.asarray(vocab.eof_id), "eov_id": np.asarray(vocab.eov_id)},
        "tokenizer_checkpoint": os.path.abspath(frames.checkpoint),
        "text_tokenizer": str(mc.text_tokenizer or ""),
        "action_normalization": str(config.data.action_normalization or "none"),
        "datasets": dataset_assets,
    }
    if head == "bins":
        name = next(iter(datasets))
        assets["bin_edges"] = datasets[name]["edges"]
        assets["bin_centres"] = datasets[name]["centres"]

    return Stage(
        init_variables=init_variables,
        loss_fn=loss_fn,
        batches=train_batches,
        eval_batches=eval_batches,
        eval_fn=eval_fn,
        assets=assets,
    )
