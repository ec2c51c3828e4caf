"""Packing one training example into fixed-length arrays for the LWM-style backbone (pure numpy).

The backbone has one embedding table and one output head per modality, so every position
carries a ``modality`` and a ``tokens`` id *inside that modality's vocabulary*:

=====  ========  ==============================================================================
id     modality  vocabulary (:class:`Vocab`)
=====  ========  ==============================================================================
0      text      SentencePiece ids (32000; ``<s>`` = 1)
1      image     VQGAN codes ``0..K-1``, then ``eof = K`` (end of frame), ``eov = K+1`` (end of
                 vision); ``image_vocab`` may be larger (LWM: 8192 + 256 rows)
2      latent    latent-action codes ``0..C-1``, then the step separator ``sep = C``
                 (so the latent vocabulary has ``C + 1`` rows)
3      action    quantile bins ``0..B-1``; flow matching uses placeholder token 0
=====  ========  ==============================================================================

Layout markers (``<vision>``, ``</vision>``, ``<delta>``, ``</delta>``, ``<dynamics>``,
``</dynamics>``) are not SentencePiece pieces: they are passed in as the text ids of the plain
strings (``jaxvla.data.text.marker_ids``: "<vision>" -> "▁<", "vision", ">"), so the text vocabulary
stays 32000 and everything is deterministic. Builders take already tokenized ``prompt_ids``
(``jaxvla.data.text.prompt_ids``: ``<s>`` + LAPA's prompt around the instruction).

Every builder returns a dict of arrays of length ``max_len`` (``n`` real tokens, then padding):

* ``tokens``, ``modality`` int32: the input; padding is token 0 of modality text.
* ``positions`` int32: ``0..n-1``, then 0.
* ``segment_ids`` int32: 1 for real tokens, 0 for padding.
* ``bidirectional_ids`` int32: 0 = causal; positions sharing a positive id see each other. The
  attention rule (:func:`attention_mask`): query i sees key j iff both are real and
  ``j <= i or bidirectional_ids[i] == bidirectional_ids[j] > 0``.
* ``targets``, ``target_modality`` int32 and ``loss_weight`` float32: the **target shift is done
  here**: ``targets[i] = tokens[i+1]``, ``target_modality[i] = modality[i+1]`` (0 / 0 at the last
  index), and ``loss_weight[i]`` is the cross-entropy weight of predicting ``tokens[i+1]`` from the
  hidden state at ``i``. The loss is ``sum_i loss_weight[i] * CE(head[target_modality[i]](h_i),
  targets[i])`` per example, with no further shifting or normalisation: each loss group's weight
  is spread evenly over its targets, so that sum equals ``sum_g weight_g * mean_{targets in g} CE``.
  Padding and the last real token have weight 0.

Loss groups (each its own weight, ``group weight / number of its targets`` per target):

* ``text``: every text token after position 0 (the bos): the prompt, and the markers.
* ``latent``: the latent codes (LAPA: the M codes; ViPRA: the H x M codes and the H separators,
  which the model must emit when decoding freely; ``separator_loss=False`` leaves them out).
* ``future``: ViPRA's future frame o_{t+H}: its N codes (not its eov).
* ``action``: action-bin tokens (ACTIONVLA pretraining, bin finetuning).
Image tokens of observed frames and their eof / eov ids are context only (weight 0).

Packing (:func:`pack_examples`): several built examples share a row. The ``k``-th example of a row
has ``segment_ids`` ``k`` (1, 2, ...), its own ``positions`` from 0, its own bidirectional blocks
(the attention rule asks for the same segment too, so equal block ids of two examples never see
each other) and its own target shift (its last token has weight 0); a row also carries
``num_examples``, so a loss can stay a mean over examples. :func:`packing_layout` sizes the rows
from the longest example a batch may hold, and puts several in a row only where that pads less
(rows rounded to a multiple): every example gets the longest one's tokens either way.
``pack_examples(..., with_placement=True)`` also says where each example went (row, slot, first
index), so per-example arrays (bins finetuning's ``action_positions``, its bins and actions) can
follow their examples into the rows.

Extra index arrays (int32, indices into the sequence, i.e. of the tokens themselves; the logits
that predict token ``p`` sit at ``p - 1``): ``latent_positions`` (LAPA, ViPRA: codes only),
``future_positions`` (ViPRA), ``action_positions`` (ACTIONVLA, bins, flow: for flow these are the
placeholder positions whose hidden states the velocity head reads).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

TEXT, IMAGE, LATENT, ACTION = 0, 1, 2, 3
MODALITY_NAMES = ("text", "image", "latent", "action")
FLOW_BLOCK_ID = 2  # bidirectional id of flow matching's action block (1 is the optional prefix)

VISION_OPEN, VISION_CLOSE = "<vision>", "</vision>"
DELTA_OPEN, DELTA_CLOSE = "<delta>", "</delta>"
DYNAMICS_OPEN, DYNAMICS_CLOSE = "<dynamics>", "</dynamics>"
MARKERS = (VISION_OPEN, VISION_CLOSE, DELTA_OPEN, DELTA_CLOSE, DYNAMICS_OPEN, DYNAMICS_CLOSE)

SEQUENCE_KEYS = ("tokens", "modality", "positions", "segment_ids", "bidirectional_ids",
                 "targets", "target_modality", "loss_weight")


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Vocabulary sizes and special ids of the four modalities.

    Defaults are LAPA's with LWM's VQGAN: 32000 text ids, 8192 image codes in a table of 8448
    (``eof`` 8192, ``eov`` 8193), 8 latent codes (+ separator), 256 action bins.
    """

    text_size: int = 32000
    image_codes: int = 8192
    image_vocab: int | None = None  # rows of the image table; None: image_codes + 2
    latent_codes: int = 8
    action_bins: int = 256
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        if self.image_vocab is not None and self.image_vocab < self.image_codes + 2:
            raise ValueError(f"image_vocab {self.image_vocab} < image_codes {self.image_codes} + 2 "
                             "(eof, eov)")
        for name in ("text_size", "image_codes", "latent_codes", "action_bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"Vocab.{name} must be positive, got {getattr(self, name)}")

    @property
    def eof_id(self) -> int:
        return self.image_codes

    @property
    def eov_id(self) -> int:
        return self.image_codes + 1

    @property
    def latent_sep_id(self) -> int:
        return self.latent_codes

    @property
    def image_size(self) -> int:
        return self.image_vocab if self.image_vocab is not None else self.image_codes + 2

    @property
    def latent_size(self) -> int:
        return self.latent_codes + 1

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        """Rows of each modality's embedding table / head, in modality-id order."""
        return (self.text_size, self.image_size, self.latent_size, self.action_bins)


class _Builder:
    """Accumulates parts (tokens, modality, loss group, bidirectional id) and packs them."""

    def __init__(self, vocab: Vocab, kind: str):
        self.vocab = vocab
        self.kind = kind
        self.parts: list[tuple[str, np.ndarray, int, str | None, int]] = []
        self.length = 0
        self.spans: dict[str, list[np.ndarray]] = {}

    def add(self, name: str, tokens, modality: int, group: str | None = None, bidir: int = 0,
            limit: int | None = None, span: str | None = None):
        tokens = np.asarray(tokens)
        if tokens.ndim == 0:
            tokens = tokens[None]
        if tokens.ndim != 1:
            raise ValueError(f"{self.kind}: {name} must be a 1-d array of ids, got shape {tokens.shape}")
        if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"{self.kind}: {name} must hold integer ids, got dtype {tokens.dtype}")
        tokens = tokens.astype(np.int32)
        limit = self.vocab.sizes[modality] if limit is None else limit
        if tokens.size and (tokens.min() < 0 or tokens.max() >= limit):
            raise ValueError(f"{self.kind}: {name} ids must lie in [0, {limit}) "
                             f"({MODALITY_NAMES[modality]}), got [{tokens.min()}, {tokens.max()}]")
        if modality == TEXT and group is None:
            group = "text"
        if span is not None:
            self.spans.setdefault(span, []).append(self.length + np.arange(tokens.size, dtype=np.int32))
        self.parts.append((name, tokens, modality, group, bidir))
        self.length += tokens.size

    def pack(self, max_len: int, weights: Mapping[str, float]) -> dict[str, np.ndarray]:
        n = self.length
        if n > max_len:
            detail = ", ".join(f"{name} {tokens.size}" for name, tokens, *_ in self.parts)
            raise ValueError(f"{self.kind} sequence of {n} tokens ({detail}) exceeds max_len "
                             f"{max_len}")
        tokens = np.zeros(max_len, np.int32)
        modality = np.zeros(max_len, np.int32)
        bidir = np.zeros(max_len, np.int32)
        group = np.full(max_len, "", dtype=object)
        offset = 0
        for _, part, mod, grp, bid in self.parts:
            end = offset + part.size
            tokens[offset:end] = part
            modality[offset:end] = mod
            bidir[offset:end] = bid
            group[offset:end] = grp or ""
            offset = end
        token_weight = np.zeros(max_len, np.float32)
        # Position 0 is never a target (for text that is the bos).
        for name, weight in weights.items():
            members = np.flatnonzero(group == name)
            members = members[members >= 1]
            if weight and members.size:
                token_weight[members] = np.float32(weight / members.size)
        seq = {
            "tokens": tokens,
            "modality": modality,
            "positions": np.where(np.arange(max_len) < n, np.arange(max_len), 0).astype(np.int32),
            "segment_ids": (np.arange(max_len) < n).astype(np.int32),
            "bidirectional_ids": bidir,
            "targets": np.append(tokens[1:], 0).astype(np.int32),
            "target_modality": np.append(modality[1:], 0).astype(np.int32),
            "loss_weight": np.append(token_weight[1:], 0).astype(np.float32),
        }
        for name, chunks in self.spans.items():
            seq[name] = np.concatenate(chunks).astype(np.int32)
        return seq


def _marker(markers: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    if key not in markers:
        raise KeyError(f"marker {key!r} missing from markers (have {sorted(markers)}); "
                       "see jaxvla.data.text.marker_ids")
    return np.asarray(markers[key])


def _check_frame(kind: str, name: str, frame, vocab: Vocab) -> np.ndarray:
    frame = np.asarray(frame).reshape(-1)
    if frame.size and (frame.min() < 0 or frame.max() >= vocab.image_codes):
        raise ValueError(f"{kind}: {name} codes must lie in [0, {vocab.image_codes}) (image codes; "
                         f"eof/eov are added here), got [{frame.min()}, {frame.max()}]")
    return frame


def _prefix(b: _Builder, prompt_ids, image, markers, vocab, vision_group: str | None = None, prev_image=None):
    """prompt, <vision>, [o_{t-k} codes, eof,] o_t codes, eov, </vision>.

    ``prev_image``: the history frame's N codes (None: no history). Like every observed frame it
    is context only (loss weight 0, its eof too); the tokens after it keep their loss groups, so
    the targets and their weights are those of the layout without history, N + 1 positions later.
    """
    b.add("prompt", prompt_ids, TEXT)
    b.add(VISION_OPEN, _marker(markers, VISION_OPEN), TEXT)
    if prev_image is not None:
        b.add("prev_image", _check_frame(b.kind, "prev_image", prev_image, vocab), IMAGE)
        b.add("eof", [vocab.eof_id], IMAGE)
    b.add("image", _check_frame(b.kind, "image", image, vocab), IMAGE, vision_group)
    b.add("eov", [vocab.eov_id], IMAGE)
    b.add(VISION_CLOSE, _marker(markers, VISION_CLOSE), TEXT)


def build_lapa(prompt_ids, image, latent, markers, vocab: Vocab, max_len: int, *, prev_image=None,
               latent_weight: float = 0.99, text_weight: float = 0.01) -> dict[str, np.ndarray]:
    """LAPA: ``prompt <vision> [o_{t-k} eof] o_t eov </vision> <delta> z_1..z_M </delta>``.

    ``image``: the N VQGAN codes of o_t (any shape, flattened); ``prev_image``: optional history
    frame o_{t-k} (N codes; None: none); ``latent``: the M latent codes. Loss: ``latent_weight``
    over the M latent targets, ``text_weight`` over the text targets. Adds ``latent_positions`` [M].
    """
    b = _Builder(vocab, "lapa")
    _prefix(b, prompt_ids, image, markers, vocab, prev_image=prev_image)
    b.add(DELTA_OPEN, _marker(markers, DELTA_OPEN), TEXT)
    b.add("latent", np.asarray(latent).reshape(-1), LATENT, "latent", limit=vocab.latent_codes,
          span="latent_positions")
    b.add(DELTA_CLOSE, _marker(markers, DELTA_CLOSE), TEXT)
    return b.pack(max_len, {"latent": latent_weight, "text": text_weight})


def build_vipra(prompt_ids, image, future_image, latents, markers, vocab: Vocab, max_len: int, *,
                prev_image=None, latent_weight: float = 0.48, future_weight: float = 0.48,
                text_weight: float = 0.02, separator_loss: bool = True) -> dict[str, np.ndarray]:
    """ViPRA: ``prompt <vision> [o_{t-1} eof] o_t eof o_{t+H} eov </vision> <dynamics>
    [z_1..z_M sep] x H </dynamics>``.

    ``image``, ``future_image``, ``prev_image`` (optional history frame, None for none): N codes
    each; ``latents`` [H, M]. Loss: ``future_weight`` over the N codes of o_{t+H},
    ``latent_weight`` over the H x M codes (+ the H separators when ``separator_loss``),
    ``text_weight`` over the text. Adds ``future_positions`` [N] and ``latent_positions`` [H*M].
    """
    kind = "vipra"
    b = _Builder(vocab, kind)
    b.add("prompt", prompt_ids, TEXT)
    b.add(VISION_OPEN, _marker(markers, VISION_OPEN), TEXT)
    if prev_image is not None:
        b.add("prev_image", _check_frame(kind, "prev_image", prev_image, vocab), IMAGE)
        b.add("eof", [vocab.eof_id], IMAGE)
    b.add("image", _check_frame(kind, "image", image, vocab), IMAGE)
    b.add("eof", [vocab.eof_id], IMAGE)
    b.add("future_image", _check_frame(kind, "future_image", future_image, vocab), IMAGE, "future",
          span="future_positions")
    b.add("eov", [vocab.eov_id], IMAGE)
    b.add(VISION_CLOSE, _marker(markers, VISION_CLOSE), TEXT)
    b.add(DYNAMICS_OPEN, _marker(markers, DYNAMICS_OPEN), TEXT)
    latents = np.asarray(latents)
    if latents.ndim != 2:
        raise ValueError(f"vipra: latents must be [H, M], got shape {latents.shape}")
    sep_group = "latent" if separator_loss else None
    for h, step in enumerate(latents):
        b.add(f"latent[{h}]", step, LATENT, "latent", limit=vocab.latent_codes,
              span="latent_positions")
        b.add("sep", [vocab.latent_sep_id], LATENT, sep_group)
    b.add(DYNAMICS_CLOSE, _marker(markers, DYNAMICS_CLOSE), TEXT)
    seq = b.pack(max_len, {"latent": latent_weight, "future": future_weight, "text": text_weight})
    seq.setdefault("latent_positions", np.zeros(0, np.int32))
    return seq


def build_actionvla(prompt_ids, image, actions, markers, vocab: Vocab, max_len: int, *, prev_image=None,
                    action_weight: float = 0.99, text_weight: float = 0.01,
                    open_marker: str = DELTA_OPEN, close_marker: str = DELTA_CLOSE,
                    kind: str = "actionvla") -> dict[str, np.ndarray]:
    """ACTIONVLA (pretraining on action labels): LAPA's layout with the A action-bin ids in place
    of the latent codes: ``prompt <vision> [o_{t-k} eof] o_t eov </vision> <delta> a_1..a_A
    </delta>``. ``actions``: bin ids (any shape, flattened; a chunk [T, A] gives T*A tokens);
    ``prev_image``: optional history frame (N codes). Adds ``action_positions``."""
    b = _Builder(vocab, kind)
    _prefix(b, prompt_ids, image, markers, vocab, prev_image=prev_image)
    b.add(open_marker, _marker(markers, open_marker), TEXT)
    b.add("actions", np.asarray(actions).reshape(-1), ACTION, "action", span="action_positions")
    b.add(close_marker, _marker(markers, close_marker), TEXT)
    return b.pack(max_len, {"action": action_weight, "text": text_weight})


def build_bins(prompt_ids, image, actions, markers, vocab: Vocab, max_len: int, *, prev_image=None,
               action_weight: float = 1.0, text_weight: float = 0.0,
               open_marker: str = DELTA_OPEN, close_marker: str = DELTA_CLOSE) -> dict[str, np.ndarray]:
    """Discrete finetuning: ACTIONVLA's layout (with the optional history frame ``prev_image``),
    the action bins weighted 1.0 and no text loss."""
    return build_actionvla(prompt_ids, image, actions, markers, vocab, max_len, prev_image=prev_image,
                           action_weight=action_weight, text_weight=text_weight,
                           open_marker=open_marker, close_marker=close_marker, kind="bins")


def build_flow(prompt_ids, image, markers, vocab: Vocab, max_len: int, *, chunk: int = 14, prev_image=None,
               text_weight: float = 0.0, prefix_bidirectional: bool = False) -> dict[str, np.ndarray]:
    """Flow-matching finetuning: ``prompt <vision> [o_{t-k} eof] o_t eov </vision>`` as the prefix
    (``prev_image``: the optional history frame's N codes), then ``chunk``
    placeholder positions (modality action, token 0) forming one bidirectional block
    (``bidirectional_ids`` = 2): they see the whole prefix and each other, the prefix never sees
    them. The model replaces their embeddings by the action encoder's and a velocity head reads
    their hidden states at ``action_positions`` [chunk]. No CE on them (loss_weight 0); the text
    CE is off by default. ``prefix_bidirectional`` marks the prefix as block 1 (pi0 style)."""
    if chunk < 1:
        raise ValueError(f"flow: chunk must be positive, got {chunk}")
    b = _Builder(vocab, "flow")
    n0 = len(b.parts)
    _prefix(b, prompt_ids, image, markers, vocab, prev_image=prev_image)
    if prefix_bidirectional:
        b.parts[n0:] = [(n, t, m, g, 1) for n, t, m, g, _ in b.parts[n0:]]
    b.add("action_placeholders", np.zeros(chunk, np.int32), ACTION, None, bidir=FLOW_BLOCK_ID,
          span="action_positions")
    return b.pack(max_len, {"text": text_weight})


def batch_sequences(seqs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack equally shaped sequence dicts (same builder, same ``max_len``) into [B, ...] arrays."""
    if not seqs:
        raise ValueError("batch_sequences: no sequences")
    keys = set(seqs[0])
    for i, seq in enumerate(seqs[1:], 1):
        if set(seq) != keys:
            raise ValueError(f"batch_sequences: sequence {i} has keys {sorted(seq)}, "
                             f"sequence 0 has {sorted(keys)}")
    out = {}
    for key in seqs[0]:
        shapes = {np.shape(seq[key]) for seq in seqs}
        if len(shapes) != 1:
            raise ValueError(f"batch_sequences: {key!r} has different shapes {sorted(shapes)}")
        out[key] = np.stack([np.asarray(seq[key]) for seq in seqs])
    return out


def stack_examples(seqs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Unpacked batch: one built example a row, the ``SEQUENCE_KEYS`` arrays only ([B, max_len])."""
    batch = batch_sequences(seqs)
    return {key: batch[key] for key in SEQUENCE_KEYS}


def example_length(seq: Mapping[str, np.ndarray]) -> int:
    """Real tokens of one built example (its ``segment_ids`` are 1 on them, 0 on padding)."""
    return int(np.count_nonzero(np.asarray(seq["segment_ids"])))


def example_target_counts(seq: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Weighted targets of each modality (by ``MODALITY_NAMES``) in one built example."""
    weighted = np.asarray(seq["loss_weight"]) > 0
    target_modality = np.asarray(seq["target_modality"])
    return {name: int(np.count_nonzero(weighted & (target_modality == index)))
            for index, name in enumerate(MODALITY_NAMES)}


@dataclasses.dataclass(frozen=True)
class PackingLayout:
    """Static shape of packed batches: ``num_rows`` rows of ``row_len`` tokens, each holding at most
    ``examples_per_row`` examples of at most ``example_len`` tokens. ``example_caps``: the most
    weighted targets of each modality in one example; ``row_caps`` (``examples_per_row`` times
    those) are the loss's per-row gather sizes."""

    examples_per_row: int
    row_len: int
    num_rows: int
    example_len: int
    example_caps: Mapping[str, int]

    @property
    def row_caps(self) -> dict[str, int]:
        return {name: self.examples_per_row * int(count) for name, count in self.example_caps.items()}


def packing_layout(num_examples: int, example_len: int, example_caps: Mapping[str, int], max_row_len: int, *,
                   group: int | None = None, row_multiple: int = 1, examples_per_row: int | None = None,
                   where: str = "max_row_len") -> PackingLayout:
    """The layout that packs ``num_examples`` examples of at most ``example_len`` tokens.

    Examples per row ``d``: a divisor of ``group`` (default ``num_examples``; pass a divisor of it
    to keep the row count a multiple of ``num_examples // group``, e.g. the data devices) with ``d *
    example_len <= max_row_len``. Row length: ``d * example_len`` rounded up to ``row_multiple``.
    Of those ``d``, the one with the fewest row tokens per example (``row_len / d``), the smallest
    on a tie. Every example is given the longest example's tokens, so two a row pad exactly as
    much as one a row and only add attention between them that the mask throws away: more than one
    a row wins only where rounding to ``row_multiple`` pads less (e.g. 4 examples of 100 tokens fill
    448 of a 64-multiple, where one pads to 128). ``examples_per_row`` forces ``d`` (tests and
    benchmarks comparing layouts); it must divide ``group`` and fit. Rows: ``num_examples // d``,
    each exactly ``d`` examples when :func:`pack_examples` gets ``max_per_row=d``. ``where`` names
    the setting that bounds ``max_row_len`` in the error raised when one example does not fit.
    """
    group = num_examples if group is None else int(group)
    if num_examples < 1 or group < 1 or num_examples % group:
        raise ValueError(f"packing_layout: num_examples={num_examples} must be a positive multiple of group={group}")
    if row_multiple < 1:
        raise ValueError(f"packing_layout: row_multiple={row_multiple} must be >= 1")
    if example_len > max_row_len:
        raise ValueError(f"an example of {example_len} tokens does not fit in a row of {max_row_len}: raise {where}")

    def row_len(d: int) -> int:
        return min(-(-d * example_len // row_multiple) * row_multiple, max_row_len)

    fitting = [d for d in range(1, group + 1) if group % d == 0 and d * example_len <= max_row_len]
    if examples_per_row is None:
        per_row = min(fitting, key=lambda d: (row_len(d) / d, d))
    elif int(examples_per_row) in fitting:
        per_row = int(examples_per_row)
    else:
        raise ValueError(f"packing_layout: examples_per_row={examples_per_row} must divide group={group} and fit "
                         f"{max_row_len} tokens ({example_len} each): one of {fitting}")
    return PackingLayout(per_row, row_len(per_row), num_examples // per_row, example_len, dict(example_caps))


def pack_examples(examples: Sequence[Mapping[str, np.ndarray]], row_len: int, num_rows: int, *,
                  max_per_row: int | None = None, with_placement: bool = False):
    """Packs built examples (the builders' dicts, any ``max_len``) into ``num_rows`` rows of
    ``row_len`` tokens, greedy first-fit in the given order: each example goes to the first row with
    room for its ``n`` real tokens (and fewer than ``max_per_row`` examples).

    Returns the ``SEQUENCE_KEYS`` arrays ``[num_rows, row_len]`` and ``num_examples`` ``[num_rows]``
    int32 (examples in each row). The ``k``-th example of a row has ``segment_ids`` ``k`` (1, 2, ...;
    0 = padding) and keeps its own ``positions`` (0..n-1), ``bidirectional_ids`` (blocks are per
    segment: the attention rule needs the same segment too), and its shifted ``targets``,
    ``target_modality``, ``loss_weight``: its last real token has weight 0 and target 0, never the
    next example's first token. Span arrays (``latent_positions``, ...) are dropped.

    ``with_placement``: returns ``(packed, placement)``, ``placement`` saying where each example went:
    ``row``, ``slot`` (its index in the row: segment id - 1) and ``start`` (its first token's index in
    the row), each ``[len(examples)]`` int32, so per-example arrays can follow their example (a span
    array ``+ start`` indexes the packed row).
    """
    rows = {key: np.zeros((num_rows, row_len), np.float32 if key == "loss_weight" else np.int32)
            for key in SEQUENCE_KEYS}
    used = np.zeros(num_rows, np.int64)
    count = np.zeros(num_rows, np.int32)
    placed = np.zeros((3, len(examples)), np.int32)  # row, slot, start of each example
    limit = max_per_row or row_len
    for index, example in enumerate(examples):
        n = example_length(example)
        if np.any(np.asarray(example["segment_ids"])[:n] != 1):
            raise ValueError(f"pack_examples: example {index} is not one example (segment_ids must be 1..1 then 0)")
        free = np.flatnonzero((used + n <= row_len) & (count < limit))
        if not free.size:
            raise ValueError(f"pack_examples: example {index} of {n} tokens fits in none of the {num_rows} rows of "
                             f"{row_len} tokens (used {used.tolist()}, at most {limit} examples a row)")
        row, start = int(free[0]), int(used[free[0]])
        for key in SEQUENCE_KEYS:
            rows[key][row, start:start + n] = np.asarray(example[key])[:n]
        placed[:, index] = (row, count[row], start)
        count[row] += 1
        rows["segment_ids"][row, start:start + n] = count[row]
        used[row] += n
    packed = {**rows, "num_examples": count}
    if with_placement:
        return packed, dict(zip(("row", "slot", "start"), placed))
    return packed


def attention_mask(seq: Mapping[str, np.ndarray]) -> np.ndarray:
    """bool [..., L, L] (query, key) mask of a sequence or a batch: causal within the segment,
    plus full attention inside each positive ``bidirectional_ids`` block."""
    seg = np.asarray(seq["segment_ids"])
    bid = np.asarray(seq["bidirectional_ids"])
    length = seg.shape[-1]
    causal = np.tril(np.ones((length, length), bool))
    same_seg = (seg[..., :, None] == seg[..., None, :]) & (seg[..., :, None] > 0)
    block = (bid[..., :, None] == bid[..., None, :]) & (bid[..., :, None] > 0)
    return same_seg & (causal | block)


def synthetic_batch(rng: np.random.Generator, batch_size: int, objective: str, vocab: Vocab, max_len: int, *,
                    frame_tokens: int, latent_shape: tuple[int, int] = (1, 4), history_frames: int = 0,
                    prompt_tokens: int = 24, action_tokens: int = 4) -> dict[str, np.ndarray]:
    """:func:`synthetic_examples` stacked by :func:`stack_examples` ([B, max_len] arrays,
    ``SEQUENCE_KEYS`` only)."""
    return stack_examples(synthetic_examples(rng, batch_size, objective, vocab, max_len, frame_tokens=frame_tokens,
                                             latent_shape=latent_shape, history_frames=history_frames,
                                             prompt_tokens=prompt_tokens, action_tokens=action_tokens))


def synthetic_examples(rng: np.random.Generator, batch_size: int, objective: str, vocab: Vocab, max_len: int, *,
                       frame_tokens: int, latent_shape: tuple[int, int] = (1, 4), history_frames: int = 0,
                       prompt_tokens: int = 24, action_tokens: int = 4) -> list[dict[str, np.ndarray]]:
    """``batch_size`` built examples of ``objective``'s layout (lapa | vipra | actionvla) with
    random ids, each ``max_len`` long (stack them with :func:`batch_sequences` or pack them with
    :func:`pack_examples`).

    The same builders as real data, so positions, masks, loss groups and target counts are those of
    training; only the ids are random. For what needs the shapes and the arithmetic but no data,
    tokenizer or LAQ: memory planning, train-step benchmarks, multi-process tests.
    ``frame_tokens``: VQGAN codes per frame (LWM at 256 px: 256); ``latent_shape``: the [H, M]
    latent codes (LAPA: 1 x 4, flattened; ViPRA: 14 x 16); ``history_frames`` 1 adds a history
    frame o_{t-k} (random codes) before o_t in every objective's vision block."""
    markers = {name: np.array([3 + 2 * i, 4 + 2 * i], np.int32) for i, name in enumerate(MARKERS)}

    def ids(size, high):
        return rng.integers(0, high, size=size, dtype=np.int32)

    seqs = []
    for _ in range(batch_size):
        prompt = np.concatenate([[vocab.bos_id], ids(prompt_tokens - 1, vocab.text_size)]).astype(np.int32)
        image = ids(frame_tokens, vocab.image_codes)
        previous = ids(frame_tokens, vocab.image_codes) if history_frames else None
        if objective == "lapa":
            seqs.append(build_lapa(prompt, image, ids(latent_shape, vocab.latent_codes), markers, vocab, max_len,
                                   prev_image=previous))
        elif objective == "vipra":
            seqs.append(build_vipra(prompt, image, ids(frame_tokens, vocab.image_codes),
                                    ids(latent_shape, vocab.latent_codes), markers, vocab, max_len,
                                    prev_image=previous))
        elif objective == "actionvla":
            seqs.append(build_actionvla(prompt, image, ids(action_tokens, vocab.action_bins), markers, vocab,
                                        max_len, prev_image=previous))
        else:
            raise ValueError(f"synthetic_batch: objective {objective!r}; expected lapa, vipra or actionvla")
    return seqs
