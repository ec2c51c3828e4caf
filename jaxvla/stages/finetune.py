"""Stage 3: action finetuning of the backbone. Config ``configs/finetune.py``; losses
``jaxvla/losses/finetune.py``.

``config.model.head``:

* ``flow`` (ViPRA-FM): params ``{"backbone": Llama (no latent, no action vocabulary),
  "action_encoder": ActionEncoder(width=dim), "velocity_head": VelocityHead(A)}``; sequences of
  ``build_flow`` (prefix + ``chunk`` placeholder slots in one bidirectional block); actions
  normalised by ``data.action_normalization`` (q01q99 -> [-1, 1], gripper untouched).
* ``bins`` (ViPRA-AR; LAPA / OpenVLA with ``chunk`` = 1): params ``{"backbone": Llama (no latent
  vocabulary, 256 action bins)}``; sequences of ``build_bins`` whose targets are the chunk's
  ``chunk`` x A bins flattened time-major (T = K * A tokens), quantile edges from
  ``data.num_bins``; actions unnormalised. Chunk steps past the episode's end
  (``action_pad_mask`` False; the pipeline pads them with zeros, ``data.chunk_pad``) keep their
  tokens in the sequence but get loss weight 0 (:func:`mask_padded_steps`): they are never
  targets, and, coming after the real steps, no real target attends to them.

``init_from`` (a stage 2 workdir whose params are ``{"backbone": ...}`` with the latent table and
head) keeps the backbone, drops ``embed_latent`` / ``head_latent`` (and, for flow, the action
table / head), initialises what is new; the trainer logs every decision.

Frames are tokenized host-side in the batch iterator by the frozen image tokenizer
(``model.tokenizer_checkpoint``: a prerequisite, ``prerequisites``, with the embedded Meta-World
dataset when ``data.generate_metaworld``; the build only checks them, ``python -m jaxvla.train``
trains it from ``model.tokenizer_config`` for ``model.tokenizer_steps`` when missing), the
instruction by the SentencePiece model, then laid out, so the loss sees int arrays only. The
frozen pieces (image tokenizer, text prompts, ``FinetuneModels``) are ``jaxvla.frozen``'s, which
a policy reads too.

Optional prefix inputs (both off by default; the comparison protocol turns both on):

* frame history, ``model.history_frames`` = 1: the vision block is ``<vision> o_{t-k} eof o_t eov
  </vision>`` with k = ``model.history_stride`` control steps (the pipeline's chunk windows, frame 0
  where t < k: what a policy's history buffer feeds too); ViPRA's policy inputs.
* proprioceptive state, ``model.state_dims`` (e.g. "4": Meta-World's hand xyz and gripper opening,
  never the object poses): those dims of o_t's ``observation/proprio`` (raw, so
  ``data.proprio_normalization`` must be "none"), each cut into 256 equal-width bins over the
  finetuning data's q01..q99 (:func:`jaxvla.data.stats.state_bin_edges` /
  ``discretize_state``, clipped) and written into the prompt pi0-FAST style
  (:func:`jaxvla.data.text.prompt_text`: "... take to <instruction>? State: 12 200 45 3.
  ASSISTANT:"). No model change; ``model.prompt_tokens`` must make room for the state text (up to
  19 ids for 4 dims: 36 -> 55 for MT10's prompts, 60 for MT50's; a budget without room is an
  error naming it). An addition of ours for the
  CPU-scale protocol: LAPA's and ViPRA's Meta-World policies read images and text only.

Sequence layout, fixed at build time (:func:`longest_example`, :func:`layout_for`): the longest
example is the one whose prompt has ``model.prompt_tokens`` ids (bos and template included; a
longer instruction is an error naming that key) with the tokenizer's image tokens and the action
part. Its length is every example's budget: the ``seq_len`` asset, from which a policy derives
the same prompt budget.

* flow: one example a row of exactly that length (its fixed prefix layout: the KV-cached sampler
  prefills the prefix once and appends the action block); padding only where a prompt is shorter
  than the budget.
* bins, ``model.pack`` (default): the packed layout of pretraining
  (``jaxvla.data.sequences.pack_examples``, ``packing_layout``): ``d`` examples a row, ``d`` a
  divisor of pretraining's :func:`~jaxvla.stages.pretrain.packing_group` with ``d`` examples in
  ``model.seq_len`` tokens, the one that pads least (1: every example takes the longest one's
  tokens, so more a row would only add attention the mask discards), rows of ``d`` x the longest
  example, the loss's action gather ``d`` x K * A a row and the loss normalised by the examples.
  ``pack=False``: ``d`` = 1.

Batch (numpy, per process): the ``SEQUENCE_KEYS`` arrays ``[R, L]`` (flow: R = B). Flow adds
``action_positions`` ``[B, K]``, ``action`` ``[B, K, A]`` float32 and ``action_pad_mask`` ``[B, K]``.
Bins add ``num_examples`` ``[R]`` (always ``d``) and, by row and slot (example ``r * d + j`` of the
pipeline batch is slot ``j`` of row ``r``, so every array splits along its leading axis with its
rows, across devices and gradient-accumulation micro-batches), ``action_positions`` ``[R, d, K*A]``
(indices in the row), ``action_bins`` ``[R, d, K*A]``, ``action`` ``[R, d, K, A]``, ``action_pad_mask``
``[R, d, K]`` and, in eval batches, ``bin_centres`` ``[R, d, A, V]``.

Assets (everything a policy needs to turn outputs into robot actions): ``head``, ``chunk``,
``action_dim``, ``execute_steps``, ``image_size``, ``seq_len`` (one example's budget, see above),
``prompt_tokens``, ``layout`` (rows, row length, examples a row), ``vocab`` sizes and special ids,
``tokenizer_checkpoint`` (absolute, as configured) with ``tokenizer_relative`` /
``tokenizer_manifest_sha256`` (the copy of the image tokenizer bundled into
``<workdir>/assets/tokenizer`` before training starts, so a copied workdir serves), ``text_tokenizer``, ``action_normalization``, per dataset
``statistics`` (action / proprio mean, std, min, max, q01, q99 (+ ``bin_edges`` when bins)),
``normalize_mask``, ``gripper_dims`` (+ ``state_edges`` [D, 257] with state prompts), for bins
``bin_edges`` / ``bin_centres`` of the first dataset, and the prefix inputs ``history_frames``,
``history_stride``, ``state_dims`` (empty: none) and ``state_size`` (the proprio dim a policy's
observation ``state`` must have); checkpoints without them have neither input.
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
from jaxvla.data import stats as stats_lib
from jaxvla.data.embedded import configured_dataset
from jaxvla.frozen import (LATENT_CODES, TEXT_VOCAB, FinetuneModels, TextPrompts, bundle_image_tokenizer,
                           bundle_text_tokenizer, make_vocab)
from jaxvla.losses import finetune as losses
from jaxvla.losses.actions import bin_centres
from jaxvla.losses.pretrain import target_counts
from jaxvla.stages import (DataStream, Stage, data_with_history, history_settings, image_tokenizer,
                           image_tokenizer_checkpoint, require)
from jaxvla.stages.pretrain import packing_group

log = logging.getLogger("jaxvla")


def parse_state_dims(spec) -> tuple[int, ...]:
    """``config.model.state_dims`` -> the proprio dims written into the prompt (ascending, unique).

    ``""`` / ``0`` / None: none (no state in the prompt); ``"N"`` or N: the first N dims
    (Meta-World's 4: hand xyz and gripper opening, never the object poses); ``"a:b"``: dims a..b-1;
    ``"i,j,k"``: those dims. Errors name the key."""
    where = "config.model.state_dims"
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return ()
    text = str(spec).strip()
    try:
        if ":" in text:
            start, _, stop = text.partition(":")
            dims = list(range(int(start or 0), int(stop)))
            if not dims:
                raise ValueError("empty range")
        elif "," in text:
            dims = [int(part) for part in text.split(",") if part.strip()]
        else:
            count = int(text)
            if count < 0:
                raise ValueError("negative count")
            dims = list(range(count))
    except ValueError:
        raise ValueError(f"{where}={spec!r}: expected '' (off), a count N (the first N proprio dims), 'a:b' or "
                         "'i,j,k'") from None
    if any(d < 0 for d in dims) or len(set(dims)) != len(dims):
        raise ValueError(f"{where}={spec!r}: dims must be distinct and >= 0, got {dims}")
    return tuple(sorted(dims))


def state_dims(model_config) -> tuple[int, ...]:
    """The prompt's proprio dims of a finetuning ``config.model`` (missing key: none)."""
    return parse_state_dims(model_config.get("state_dims", ""))


def check_config(config) -> None:
    mc, data = config.model, config.data
    if mc.head not in ("flow", "bins"):
        raise ValueError(f"config.model.head={mc.head!r}; expected 'flow' or 'bins'")
    if data.sample != "chunks":
        raise ValueError(f"config.data.sample={data.sample!r}; finetuning reads 'chunks'")
    if int(data.chunk_size) != int(mc.chunk):
        raise ValueError(f"config.data.chunk_size={data.chunk_size} but config.model.chunk={mc.chunk}; set them equal")
    data_with_history(data, *history_settings(mc))  # history keys valid and consistent
    if state_dims(mc) and (data.get("proprio_normalization") or "none") != "none":
        raise ValueError(f"config.model.state_dims={mc.state_dims!r} discretizes the raw proprio with its q01 / q99: "
                         f"set config.data.proprio_normalization='none' (got {data.proprio_normalization!r})")
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
STATE_BINS = 256  # jaxvla.data.stats.STATE_BINS: bins of each state dim in the prompt


def state_prompt_tokens(prompts, num_dims: int, instruction: str = "") -> int:
    """Prompt ids of ``instruction`` with the longest state text of ``num_dims`` dims (every bin
    255, three digits; SentencePiece splits digits, so no state is longer)."""
    return int(prompts(instruction, state_bins=np.full(num_dims, STATE_BINS - 1, np.int32)).size)


def _check_state_budget(prompts, num_dims: int, prompt_tokens: int) -> None:
    """The state text must leave room for an instruction: a budget that even an empty one with the
    longest state overflows is an error naming ``config.model.prompt_tokens``."""
    saved, prompts.max_tokens = prompts.max_tokens, None
    try:
        need = state_prompt_tokens(prompts, num_dims)
        added = need - int(prompts("").size)
    finally:
        prompts.max_tokens = saved
    if need >= prompt_tokens:
        raise ValueError(f"config.model.prompt_tokens={prompt_tokens} leaves no room for an instruction: the "
                         f"template with the longest {num_dims}-dim state alone is {need} ids (the state adds "
                         f"{added}); raise it by about {added} over the prompt budget without state")
    log.info("state prompts: the state text adds up to %d ids (the template with an empty instruction: %d of the %d "
             "of config.model.prompt_tokens)", added, need, prompt_tokens)


def longest_example(head: str, prompt_tokens: int, markers, vocab: seq.Vocab, tokens_per_frame: int, *,
                    chunk: int, action_dim: int, history_frames: int = 0) -> dict:
    """The longest example finetuning builds: a ``prompt_tokens``-id prompt (bos, then zeros), a
    frame of ``tokens_per_frame`` codes (preceded by the history frame and its eof when
    ``history_frames`` = 1) and the head's action part (flow: ``chunk`` slots; bins:
    ``chunk`` x A bins, every step real, so its ``chunk * action_dim`` action targets are the most
    an example has). Only its length and its targets count (the builders' layouts do not depend on
    ids)."""
    prompt = np.concatenate([[vocab.bos_id], np.zeros(prompt_tokens - 1)]).astype(np.int32)
    image = np.zeros(tokens_per_frame, np.int32)
    # A bound the example always fits (markers are a few ids each), so the builder never refuses it.
    bound = (prompt_tokens + tokens_per_frame + chunk + chunk * action_dim
             + sum(np.size(m) for m in markers.values()) + 8)
    previous = None
    if history_frames:
        previous = np.zeros(tokens_per_frame, np.int32)
        bound += tokens_per_frame + 1
    if head == "flow":
        return seq.build_flow(prompt, image, markers, vocab, bound, chunk=chunk, prev_image=previous)
    return seq.build_bins(prompt, image, np.zeros((chunk, action_dim), np.int32), markers, vocab, bound,
                          prev_image=previous)


def layout_for(config, longest: dict, num_examples: int, group: int | None = None) -> seq.PackingLayout:
    """The rows of ``num_examples`` (a process's batch) examples no longer than ``longest``.
    bins with ``model.pack``: ``d`` a row, ``d`` dividing ``group`` (default pretraining's
    :func:`~jaxvla.stages.pretrain.packing_group`, which keeps rows divisible by processes and data
    x fsdp x gradient accumulation), ``d`` examples within ``model.seq_len``, chosen by
    :func:`~jaxvla.data.sequences.packing_layout` to pad least (one a row: every example takes the
    longest one's tokens anyway); flow: one a row. Rows hold ``d`` x the longest example's tokens;
    one longer than ``model.seq_len`` is an error naming it."""
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


def mask_padded_steps(example: dict, step_valid, action_dim: int) -> dict:
    """A ``build_bins`` example of a K-step chunk (``action_positions`` ``[K * A]``, time-major) with
    the loss weight of every bin of a padded step (``step_valid`` ``[K]`` False: past the episode's
    end) set to 0: those bins stay in the sequence as inputs but are never targets (the loss
    gathers weighted targets only). The real steps' bins keep the builder's weight 1 / (K * A)
    each, so a real bin token weighs the same in every example. ``example`` is untouched (returned
    as is when every step is real, else a copy with new ``loss_weight``)."""
    step_valid = np.asarray(step_valid, bool).reshape(-1)
    slots = np.asarray(example["action_positions"]).reshape(step_valid.size, int(action_dim))  # [K, A]
    if step_valid.all():
        return example
    weights = np.array(example["loss_weight"], np.float32, copy=True)
    weights[slots[~step_valid].reshape(-1) - 1] = 0.0  # loss_weight[p - 1] weighs predicting token p
    return dict(example, loss_weight=weights)


def pack_bins(built: list, per_example: dict, layout: seq.PackingLayout) -> dict:
    """Bins examples (``build_bins`` dicts, any ``max_len``) -> the packed batch of ``layout``:
    ``SEQUENCE_KEYS`` ``[R, row_len]``, ``num_examples`` ``[R]``, ``action_positions``
    ``[R, d, K * A]`` (indices in the row) and every ``per_example`` array ``[N, ...]`` as
    ``[R, d, ...]``."""
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
                         f"example's, times {per_row}): an example has more action targets (chunk x action dims) "
                         f"than the longest one")

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

    def __init__(self, config, frames, prompts, vocab, datasets: dict, layout: seq.PackingLayout,
                 state_edges: dict | None = None):
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
        self.history_frames, self.history_stride = history_settings(config.model)
        self.state_dims = state_dims(config.model)
        self.state_edges = dict(state_edges or {})  # dataset name -> float32 [D, 257] (state prompts)
        if self.state_dims and not self.state_edges:
            raise ValueError("config.model.state_dims is set but no state bin edges were given (proprio statistics)")

    def _dataset(self, name) -> dict:
        if isinstance(name, bytes):
            name = name.decode("utf-8")
        return self.datasets.get(str(name)) or self.datasets[self.default]

    def _state_edges(self, name) -> np.ndarray:
        if isinstance(name, bytes):
            name = name.decode("utf-8")
        return self.state_edges.get(str(name), next(iter(self.state_edges.values())))

    def prefixes(self, batch: dict) -> tuple[list, np.ndarray, np.ndarray | None]:
        """(prompt ids per example, o_t codes ``[B, N]``, o_{t-k} codes ``[B, N]`` or None) of a
        pipeline batch: images ``[B, S, S, 3]`` or, with history, ``[B, 2, S, S, 3]`` (o_{t-k}, o_t);
        with ``state_dims`` each prompt carries the state of o_t (``observation/proprio``
        ``[B, P]``, with history ``[B, 2, P]``: its last frame's), discretized by
        :func:`~jaxvla.data.stats.discretize_state` with its dataset's edges."""
        images = np.asarray(_lookup(batch, "observation/image_primary"))
        tokens = self.frames.tokens(images)  # [B, N], with history [B, 2, N]
        if self.history_frames:
            if tokens.ndim != 3 or tokens.shape[1] != 2:
                raise ValueError(f"finetuning with config.model.history_frames=1 expects frame windows "
                                 f"[B, 2, S, S, 3] (o_{{t-k}}, o_t), got images {images.shape}")
            codes, previous = tokens[:, 1], tokens[:, 0]
        else:
            codes, previous = tokens, None
        instructions = _lookup(batch, "task/language_instruction")
        if not self.state_dims:
            return [self.prompts(instruction) for instruction in instructions], codes, previous
        proprio = np.asarray(_lookup(batch, "observation/proprio"), np.float32)
        if proprio.ndim == 3:
            proprio = proprio[:, -1]  # the window's last frame: o_t
        if proprio.shape[-1] <= max(self.state_dims):
            raise ValueError(f"config.model.state_dims={self.state_dims} but the batch's proprio has "
                             f"{proprio.shape[-1]} dims")
        names = batch.get("dataset_name", [None] * len(instructions))
        prompts = []
        for i, instruction in enumerate(instructions):
            bins = stats_lib.discretize_state(proprio[i, list(self.state_dims)], self._state_edges(names[i]))
            prompts.append(self.prompts(instruction, state_bins=bins))
        return prompts, codes, previous

    def __call__(self, batch: dict, eval: bool = False) -> dict:
        prompts, codes, previous = self.prefixes(batch)
        actions = np.asarray(batch["action"], np.float32)
        pad_mask = np.asarray(batch["action_pad_mask"], bool)
        names = batch.get("dataset_name", [None] * len(actions))
        markers, layout = self.prompts.markers, self.layout

        def prev(i):
            return None if previous is None else previous[i]

        if self.head == "flow":
            seqs = [seq.build_flow(prompts[i], codes[i], markers, self.vocab, layout.row_len, chunk=self.chunk,
                                   prev_image=prev(i)) for i in range(len(actions))]
            return dict(seq.batch_sequences(seqs), action=actions, action_pad_mask=pad_mask)
        built, bins, centres = [], [], []
        for i in range(len(actions)):
            info = self._dataset(names[i])
            # The chunk's K x A bins, flattened time-major by the builder (K = 1: LAPA's one action).
            bins.append(stats_lib.bin_actions(actions[i], info["edges"], info["gripper_dims"]).astype(np.int32))
            centres.append(info["centres"])
            built.append(seq.build_bins(prompts[i], codes[i], bins[-1], markers, self.vocab, layout.example_len,
                                        prev_image=prev(i)))
            built[-1] = mask_padded_steps(built[-1], pad_mask[i], actions.shape[-1])
        per_example = {"action_bins": np.stack(bins).reshape(len(actions), -1), "action": actions,
                       "action_pad_mask": pad_mask}
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


def prerequisites(config) -> list:
    """What finetuning reads, in the order to make it: the embedded Meta-World dataset (when
    ``config.data`` asks for it) and the image tokenizer (after the config checks, so a bad config
    fails before anything is rendered or trained)."""
    check_config(config)
    data = configured_dataset(config.data)
    return ([data] if data is not None else []) + [image_tokenizer_checkpoint(config)]


def _bundle_tokenizers(image_tokenizer: str, text_tokenizer: str, workdir: str) -> dict:
    """The tokenizers travel with the checkpoints: the image tokenizer under
    ``<workdir>/assets/tokenizer``, a custom SentencePiece model under
    ``<workdir>/assets/text_tokenizer`` (``jaxvla.frozen``)."""
    return {**bundle_image_tokenizer(image_tokenizer, workdir), **bundle_text_tokenizer(text_tokenizer, workdir)}


def build(config) -> Stage:
    from jaxvla.data.pipeline import make_batches as pipeline_batches  # TensorFlow

    require(prerequisites(config), "finetuning")  # checks the config first
    mc = config.model
    head = mc.head
    frames = image_tokenizer(config)
    prompts = TextPrompts(mc.text_tokenizer)
    action_bins = int(config.data.num_bins) if head == "bins" else 256
    vocab = make_vocab(mc.size, frames, LATENT_CODES, action_bins, text_size=TEXT_VOCAB)

    per_process = config.batch_size // jax.process_count()
    history_frames, history_stride = history_settings(mc)
    # With history the chunks' frames are windows (o_{t-k}, o_t): frame 0 where t < k.
    data_config = data_with_history(config.data, history_frames, history_stride)

    def pipeline(train: bool, start_step: int = 0, seed_offset: int = 0):
        return pipeline_batches(data_config, batch_size=per_process, train=train, seed=config.seed + seed_offset,
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
    state = state_dims(mc)
    state_edges, state_size = {}, 0
    if state:
        for spec in specs:
            proprio = statistics.get(spec.name, {}).get("observation/proprio")
            if proprio is None:
                raise ValueError(f"config.model.state_dims={mc.state_dims!r}: no proprio statistics for dataset "
                                 f"{spec.name!r} (they come with action normalisation or bins)")
            size = int(np.asarray(proprio["q01"]).size)
            if max(state) >= size:
                raise ValueError(f"config.model.state_dims={mc.state_dims!r} selects dims {list(state)} but dataset "
                                 f"{spec.name!r} has {size} proprio dims")
            state_size = max(state_size, size)
            state_edges[spec.name] = stats_lib.state_bin_edges(proprio, state)
            dataset_assets[spec.name]["state_edges"] = state_edges[spec.name]
        _check_state_budget(prompts, len(state), int(mc.prompt_tokens))
    if head == "flow" and (config.data.action_normalization or "none") == "none":
        log.warning("flow finetuning on unnormalised actions (config.data.action_normalization='none')")

    models = FinetuneModels(config, vocab, action_dim)
    chunk = int(mc.chunk)
    longest = longest_example(head, int(mc.prompt_tokens), prompts.markers, vocab, frames.tokens_per_frame,
                              chunk=chunk, action_dim=action_dim, history_frames=history_frames)
    layout = layout_for(config, longest, per_process)
    packer = SequencePacker(config, frames, prompts, vocab, datasets, layout, state_edges)
    log.info(
        "finetune (%s): backbone %s dim %d x %d layers, vocab text %d / image %d / action %d (no latent); "
        "chunk %d x %d action dims, image tokenizer %s (%d tokens per frame)",
        head, mc.size, models.llama_config.dim, models.llama_config.num_layers, vocab.text_size, vocab.image_size,
        models.llama_config.action_vocab, chunk, action_dim, frames.checkpoint, frames.tokens_per_frame,
    )
    log.info("finetune layout: %s (a %d-id prompt budget, config.model.prompt_tokens; rows of at most "
             "config.model.seq_len=%d)", describe_layout(head, layout), int(mc.prompt_tokens), int(mc.seq_len))
    log.info("finetune inputs: %s; %s", f"o_{{t-{history_stride}}} before o_t" if history_frames else "o_t only",
             f"proprio dims {list(state)} in the prompt ({STATE_BINS} bins over q01..q99)" if state else "no state")

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
        # Policy inputs: history_frames (0 / 1) frames o_{t-k} before o_t, k = history_stride
        # control steps; state_dims: the proprio dims written into the prompt (empty: none) of a
        # state_size-dim observation state, with each dataset's state_edges [D, 257].
        "history_frames": np.asarray(history_frames),
        "history_stride": np.asarray(history_stride),
        "state_dims": np.asarray(state, np.int32),
        "state_size": np.asarray(state_size),
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
        # The image tokenizer travels with the checkpoints: <workdir>/assets/tokenizer.
        workdir_assets=functools.partial(_bundle_tokenizers, frames.checkpoint, str(mc.text_tokenizer or "")),
    )
