"""A finetuned VLA as a robot policy: observation + instruction -> a chunk of actions in the
robot's units.

    policy = Policy.from_checkpoint("runs/ft_flow")          # a stage 3 (finetune) workdir
    actions = policy.act({"image": frame}, "press the button")   # float32 [K, A]

    chunker = ActionChunker(policy)                           # executes 7 of every 14, replans
    chunker.reset()
    action = chunker.step({"image": frame}, "press the button")  # float32 [A]

What the checkpoint's assets give (``jaxvla.stages.finetune`` writes them; the policy reads the
frozen pieces from ``jaxvla.frozen`` and imports no training code): the head (``flow`` / ``bins``),
the frozen image tokenizer's checkpoint (a copy bundled in the workdir, ``assets/tokenizer``, found
relative to the checkpoint so a copied workdir serves; ``tokenizer_checkpoint=`` overrides it,
``jaxvla.frozen.resolve_image_tokenizer``), the text tokenizer (the wheel's default, or a custom
SentencePiece file bundled in ``assets/text_tokenizer``; ``text_tokenizer=`` overrides it), the
sequence layout and vocabulary
sizes, per-dataset action statistics and normalisation mask (flow), and the bin centres (bins).

* ``flow``: the prefix (prompt + image tokens) is prefilled once into a KV cache, then
  ``flow_steps`` Euler steps run only the K action tokens; the normalised chunk ``[K, A]`` is
  mapped back with the dataset's q01 / q99 (dims outside ``normalize_mask``, the gripper, are
  already in robot units).
* ``bins``: the K x A bins of the chunk (time-major; K = ``chunk``: 14 for ViPRA-AR, 1 for
  LAPA / OpenVLA checkpoints) are decoded greedily with the prefix in a KV cache and mapped to
  their bins' centres: ``[K, A]``. ``ActionChunker`` executes ``execute_steps`` of them (the
  checkpoint's, clipped to K) before replanning, as for flow.

Optional inputs, as the checkpoint was finetuned (its assets; ``observation_spec`` lists them):

* frame history (``history_frames`` 1): the observation also holds ``"prev_image"``, the frame
  ``history_stride`` control steps before ``"image"`` (the episode's first frame while t < k), laid
  out ``<vision> o_{t-k} eof o_t eov </vision>``. ``ActionChunker`` keeps each episode's frames
  (:class:`~jaxvla.frame_history.FrameHistory`) and adds it; batched evaluation's environment
  slots keep one ``FrameHistory`` each.
* proprioceptive state (``state_dims``): the observation also holds ``"state"`` float32
  ``[state_size]`` (Meta-World's 39-d state); its ``state_dims`` entries are discretized with the
  checkpoint's ``state_edges`` (256 bins over the finetuning data's q01..q99) and written into
  the prompt ("... State: 12 200 45 3. ASSISTANT:"), exactly as in finetuning.

A missing input the checkpoint needs is an error naming it.

Inference is one jitted function per batch size (compiled on first use); the image tokenizer is
jitted too. ``act_batch`` acts for B observations at once (``[B, K, A]``).

Sampler noise (flow): without ``keys`` a call draws it from the policy's own stream (``seed`` /
``reseed``: ``stream, key = split(stream)`` per call, the key shared by the batch). With per-row
``keys`` (``[B, 2]`` uint32) row i's noise comes from ``keys[i]`` alone, as if it were called
alone with that key, so its actions do not depend on which other rows share the batch (up to
float rounding between batch sizes). ``seed_keys`` / ``split_keys`` run one stream per row:
``streams = seed_keys(seeds)``, then per call ``streams, keys = split_keys(streams)`` gives row i
the key a policy reseeded with ``seeds[i]`` would use at that call (what batched evaluation does
to reproduce each episode of the unbatched scheme).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Mapping, Protocol, Sequence

import jax
import numpy as np

from jaxvla import checkpoint as ckpt
from jaxvla.config import from_dict
from jaxvla.data import stats as stats_lib
from jaxvla.data.sequences import Vocab, batch_sequences, build_bins, build_flow
from jaxvla.frame_history import FrameHistory
from jaxvla.frozen import (DEFAULT_TEXT_CACHE_SIZE, LATENT_CODES, FinetuneModels, FrameTokenizer, TextPrompts,
                           resolve_image_tokenizer, resolve_text_tokenizer)
from jaxvla.losses import finetune as losses

log = logging.getLogger("jaxvla")

SEQUENCE_INPUTS = ("tokens", "modality", "positions", "segment_ids", "bidirectional_ids", "action_positions")


def _scalar(value) -> int:
    return int(np.asarray(value))


_seed_rows = jax.jit(jax.vmap(jax.random.PRNGKey))
_split_rows = jax.jit(jax.vmap(jax.random.split))


def seed_keys(seeds: Sequence[int]) -> np.ndarray:
    """``PRNGKey(seed)`` of every row, ``[B, 2]`` uint32: the streams of policies reseeded with
    ``seeds`` (each in [0, 2**32))."""
    seeds = np.asarray(seeds, np.int64).reshape(-1)
    if seeds.size and (seeds.min() < 0 or seeds.max() >= 2**32):
        raise ValueError(f"sampler seeds must be in [0, 2**32), got {seeds.min()}..{seeds.max()}")
    return np.asarray(_seed_rows(seeds.astype(np.uint32)))


def split_keys(streams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One call's step of every row's stream, ``[B, 2]`` uint32 -> (the streams after it, this
    call's keys): ``stream, key = split(stream)``, what ``act_batch`` does to its own stream."""
    pairs = np.asarray(_split_rows(np.asarray(streams, np.uint32)))
    return pairs[:, 0], pairs[:, 1]


def prompt_token_budget(head: str, seq_len: int, markers, vocab, tokens_per_frame: int, *, chunk: int,
                        action_dim: int, history_frames: int = 0) -> int:
    """How many prompt ids (bos and template included) fit in one ``seq_len`` sequence of ``head``:
    ``seq_len`` minus the image, marker and action tokens (measured by building an empty prompt's;
    bins: ``chunk`` x ``action_dim`` bin tokens)."""
    empty, image = np.zeros(0, np.int32), np.zeros(tokens_per_frame, np.int32)
    previous = image if history_frames else None  # the history frame and its eof
    if head == "flow":
        seq = build_flow(empty, image, markers, vocab, seq_len, chunk=chunk, prev_image=previous)
    else:
        seq = build_bins(empty, image, np.zeros((chunk, action_dim), np.int32), markers, vocab, seq_len,
                         prev_image=previous)
    return seq_len - int(seq["segment_ids"].sum())


class Policy:
    """Restored finetuned model + everything needed to turn its outputs into robot actions.

    Build with :meth:`from_checkpoint`. ``act`` / ``act_batch`` are deterministic given the
    constructor's ``seed`` and the sequence of calls (the flow sampler's noise comes from a key
    split at every call), or given the per-row ``keys`` when those are passed.
    """

    def __init__(self, params: Any, config, assets: Mapping[str, Any], *, step: int = 0, checkpoint: str = "",
                 dataset: str | None = None, execute_steps: int | None = None, seed: int = 0,
                 tokenizer_checkpoint: str | None = None, flow_steps: int | None = None,
                 text_cache_size: int | None = None, text_tokenizer: str | None = None):
        self.checkpoint = checkpoint
        self.step = int(step)
        self.head = str(assets["head"])
        if self.head not in ("flow", "bins"):
            raise ValueError(f"{checkpoint}: assets 'head' is {self.head!r}; expected 'flow' or 'bins'")
        self.chunk = _scalar(assets["chunk"])
        self.action_dim = _scalar(assets["action_dim"])
        self.seq_len = _scalar(assets["seq_len"])
        self.flow_steps = int(flow_steps or _scalar(assets["flow_steps"]))
        if execute_steps is not None and not 1 <= int(execute_steps) <= self.chunk:
            raise ValueError(f"execute_steps={execute_steps} must be in [1, {self.chunk}] (the policy's chunk)")
        # The config's default (7) is for 14-action chunks; a chunk=1 bins policy (LAPA) predicts one.
        self.execute_steps = int(execute_steps or min(max(_scalar(assets["execute_steps"]), 1), self.chunk))
        self.action_normalization = str(assets.get("action_normalization", "none"))

        datasets = dict(assets["datasets"])
        if not datasets:
            raise ValueError(f"{checkpoint}: assets hold no dataset statistics")
        self.dataset = dataset or next(iter(datasets))
        if self.dataset not in datasets:
            raise ValueError(f"{checkpoint}: no statistics for dataset {self.dataset!r}; "
                             f"the checkpoint has {sorted(datasets)}")
        entry = datasets[self.dataset]
        self._normalize_mask = np.asarray(entry["normalize_mask"], bool)
        self._action_stats = entry.get("statistics", {}).get("action")
        if self.head == "flow" and self.action_normalization != "none" and self._action_stats is None:
            raise ValueError(f"{checkpoint}: flow actions are normalised ({self.action_normalization}) but the "
                             f"assets hold no action statistics for {self.dataset!r}")
        if self.head == "bins":
            self._bin_centres = np.asarray(assets["bin_centres"], np.float32)  # [A, V]
        # Prefix inputs (written by jaxvla.stages.finetune; checkpoints without these assets have neither):
        # the history frame o_{t-k} before o_t, and the discretized proprio dims in the prompt.
        self.history_frames = _scalar(assets.get("history_frames", 0))
        self.history_stride = _scalar(assets.get("history_stride", 1)) if self.history_frames else 0
        if self.history_frames not in (0, 1) or (self.history_frames and self.history_stride < 1):
            raise ValueError(f"{checkpoint}: assets history_frames={self.history_frames}, history_stride="
                             f"{self.history_stride}; expected 0 or 1 frames, stride >= 1")
        self.state_dims = tuple(int(d) for d in np.asarray(assets.get("state_dims", []), np.int64).reshape(-1))
        self.state_size = _scalar(assets.get("state_size", 0))
        self._state_edges = None
        if self.state_dims:
            if "state_edges" not in entry:
                raise ValueError(f"{checkpoint}: the prompts carry proprio dims {list(self.state_dims)} but the "
                                 f"assets hold no state_edges for dataset {self.dataset!r}")
            self._state_edges = np.asarray(entry["state_edges"], np.float32)  # [D, 257]
            if self._state_edges.shape[0] != len(self.state_dims) or max(self.state_dims) >= self.state_size:
                raise ValueError(f"{checkpoint}: state_edges {self._state_edges.shape} / state_size {self.state_size} "
                                 f"do not match state_dims {list(self.state_dims)}")

        # tokenizer_checkpoint= > the bundle in the checkpoint's workdir > the path finetuning recorded.
        tokenizer_dir = resolve_image_tokenizer(checkpoint, self.step if checkpoint else None, assets,
                                                tokenizer_checkpoint)
        self.frames = FrameTokenizer.from_checkpoint(tokenizer_dir)
        self.image_size = int(self.frames.image_size)
        if self.image_size != _scalar(assets["image_size"]):
            raise ValueError(f"{checkpoint}: trained on {_scalar(assets['image_size'])} px frames but the image "
                             f"tokenizer {tokenizer_dir} reads {self.image_size} px")
        # text_tokenizer= > the copy bundled in the workdir > the path finetuning recorded ("": default).
        self.prompts = TextPrompts(resolve_text_tokenizer(checkpoint, self.step if checkpoint else None, assets,
                                                          text_tokenizer),
                                   cache_size=DEFAULT_TEXT_CACHE_SIZE if text_cache_size is None else text_cache_size)

        v = assets["vocab"]
        image_rows = _scalar(v["image"])
        image_codes = _scalar(v["image_codes"])
        self.vocab = Vocab(text_size=_scalar(v["text"]), image_codes=image_codes,
                           image_vocab=image_rows if image_rows != image_codes + 2 else None,
                           latent_codes=LATENT_CODES, action_bins=_scalar(v["action"]))
        self.prompt_budget = prompt_token_budget(self.head, self.seq_len, self.prompts.markers, self.vocab,
                                                 self.frames.tokens_per_frame, chunk=self.chunk,
                                                 action_dim=self.action_dim, history_frames=self.history_frames)
        self.prompts.set_budget(self.prompt_budget, f"the checkpoint's seq_len {self.seq_len} minus "
                                f"{self.seq_len - self.prompt_budget} image, marker and action tokens")
        models = FinetuneModels(config, self.vocab, self.action_dim)
        self.params = jax.device_put(params)
        self._rng = jax.random.PRNGKey(seed)
        self._infer, self._infer_rows = self._make_infer(models)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoint(cls, path: str, **kwargs) -> "Policy":
        """The latest (or the given step directory's) finetuning checkpoint under ``path``.
        ``kwargs``: ``dataset`` (whose statistics map actions back; default the first),
        ``execute_steps``, ``seed``, ``tokenizer_checkpoint``, ``flow_steps``, ``text_cache_size``
        (instructions whose prompt ids are kept; default 1024), ``text_tokenizer`` (a SentencePiece
        file overriding the checkpoint's)."""
        state, config_dict, assets, step = ckpt.load_checkpoint(path)
        if config_dict.get("stage") != "finetune":
            raise ValueError(f"{path}: a {config_dict.get('stage')!r} checkpoint; a policy needs a finetuning "
                             "(configs/finetune.py) checkpoint")
        missing = [k for k in ("head", "chunk", "action_dim", "seq_len", "vocab", "datasets", "tokenizer_checkpoint")
                   if k not in assets]
        if missing:
            raise ValueError(f"{path}: checkpoint assets lack {missing}")
        config = from_dict(config_dict)
        policy = cls(state["params"], config, assets, step=step, checkpoint=path, **kwargs)
        log.info("policy: %s (step %d), head %s, chunk %d x %d, executes %d per plan, %d px frames", path, step,
                 policy.head, policy.chunk, policy.action_dim, policy.execute_steps, policy.image_size)
        return policy

    def _make_infer(self, models):
        """(batch key, per-row keys) inference functions ``(params, seq, rng or keys [B, 2])``."""
        if self.head == "flow":
            sample = functools.partial(losses.sample_action_chunk, **models.flow_modules, num_steps=self.flow_steps)

            def row(params, seq_row, key):  # one sequence as a batch of 1, its own noise
                return sample(params, jax.tree.map(lambda x: x[None], seq_row), key)[0]

            return jax.jit(sample), jax.jit(jax.vmap(row, in_axes=(None, 0, 0)))
        decode = functools.partial(losses.predict_bins_cached, backbone=models.backbone)
        infer = jax.jit(lambda params, seq, rng: decode(params, seq))
        return infer, infer  # greedy: no noise, rows are independent already

    # ------------------------------------------------------------------ description

    @property
    def metadata(self) -> dict[str, Any]:
        """What a client needs to know (plain JSON types)."""
        return {
            "head": self.head,
            "chunk": self.chunk,
            "action_dim": self.action_dim,
            "execute_steps": self.execute_steps,
            "image_size": self.image_size,
            "flow_steps": self.flow_steps if self.head == "flow" else 0,
            "dataset": self.dataset,
            "action_normalization": self.action_normalization,
            "checkpoint": os.path.abspath(self.checkpoint) if self.checkpoint else "",
            "step": self.step,
            # Prefix inputs: the frame history_stride control steps earlier ("prev_image"; 0: none)
            # and the proprio dims of "state" written into the prompt ([]: none).
            "history_frames": self.history_frames,
            "history_stride": self.history_stride,
            "state_dims": list(self.state_dims),
        }

    def observation_spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Required observation keys -> (shape, dtype name): ``image`` o_t; with frame history
        ``prev_image`` o_{t-k} (k = ``history_stride`` control steps earlier; the episode's first
        frame while t < k); with state prompts ``state`` float32 ``[state_size]`` (Meta-World's
        39-d observation state, of which ``state_dims`` are used)."""
        frame = ((self.image_size, self.image_size, 3), "uint8")
        spec = {"image": frame}
        if self.history_frames:
            spec["prev_image"] = frame
        if self.state_dims:
            spec["state"] = ((self.state_size,), "float32")
        return spec

    # ------------------------------------------------------------------ acting

    def _check_images(self, images: np.ndarray, name: str = "image") -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"observation {name!r} must be uint8 RGB, got dtype {images.dtype}")
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"observation {name!r} must be [{self.image_size}, {self.image_size}, 3] per frame "
                             f"(this policy's tokenizer reads {self.image_size} px RGB), got {images.shape[1:]}")
        return images

    def _check_inputs(self, images: np.ndarray, prev_images, states):
        """(prev_images or None, states float32 or None) checked against what the checkpoint reads:
        a missing input it needs, or one it was not trained with, is an error saying which."""
        n = len(images)
        if self.history_frames:
            if prev_images is None:
                raise ValueError(f"this policy reads frame history (o_{{t-{self.history_stride}}} before o_t): pass "
                                 f"observation 'prev_image' / prev_images [B, {self.image_size}, {self.image_size}, 3] "
                                 "(the frame history_stride control steps earlier, the episode's first frame while "
                                 "t < history_stride; ActionChunker and FrameHistory keep them)")
            prev_images = self._check_images(prev_images, "prev_image")
            if len(prev_images) != n:
                raise ValueError(f"{n} frames but {len(prev_images)} previous frames")
        elif prev_images is not None:
            raise ValueError("this policy was trained without frame history (history_frames 0): pass no prev_images")
        if self.state_dims:
            if states is None:
                raise ValueError(f"this policy writes proprio dims {list(self.state_dims)} into its prompt: pass "
                                 f"observation 'state' / states float32 [B, {self.state_size}] (the robot's "
                                 "observation state, e.g. Meta-World's 39-d obs['state'])")
            states = np.asarray(states)
            if not np.issubdtype(states.dtype, np.floating) or states.shape != (n, self.state_size):
                raise ValueError(f"observation 'state' must be float [{self.state_size}] per row (states "
                                 f"[{n}, {self.state_size}]), got {states.dtype} {states.shape}")
            if not np.isfinite(states).all():
                raise ValueError("observation 'state' holds non-finite values")
            states = states.astype(np.float32)
        elif states is not None:
            raise ValueError("this policy was trained without state prompts (state_dims empty): pass no states")
        return prev_images, states

    def state_bins(self, states: np.ndarray) -> np.ndarray:
        """Observation states float ``[B, state_size]`` -> the prompt's int32 bins ``[B, D]``: the
        ``state_dims`` entries discretized with the checkpoint's ``state_edges`` (256 bins over the
        finetuning data's q01..q99, clipped), exactly as finetuning did."""
        states = np.asarray(states, np.float32)
        return stats_lib.discretize_state(states[:, list(self.state_dims)], self._state_edges)

    def sequences(self, images: np.ndarray, instructions: Sequence[str], prev_images: np.ndarray | None = None,
                  states: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The backbone's inputs ``[B, L]`` (and ``action_positions``) for B frames ``[B, S, S, 3]``
        (uint8), with the previous frames ``prev_images`` ``[B, S, S, 3]`` (history policies) and
        the observation states ``states`` float32 ``[B, state_size]`` (state prompts)."""
        if self.history_frames:
            tokens = self.frames.tokens(np.stack([prev_images, images], axis=1))  # [B, 2, N]: o_{t-k}, o_t
            codes, previous = tokens[:, 1], tokens[:, 0]
        else:
            codes, previous = self.frames.tokens(images), None  # [B, N]
        bins = self.state_bins(states) if self.state_dims else None
        seqs = []
        for i, (code, instruction) in enumerate(zip(codes, instructions)):
            prompt = self.prompts(instruction) if bins is None else self.prompts(instruction, state_bins=bins[i])
            prev = None if previous is None else previous[i]
            if self.head == "flow":
                seqs.append(build_flow(prompt, code, self.prompts.markers, self.vocab, self.seq_len, chunk=self.chunk,
                                       prev_image=prev))
            else:
                seqs.append(build_bins(prompt, code, np.zeros((self.chunk, self.action_dim), np.int32),
                                       self.prompts.markers, self.vocab, self.seq_len, prev_image=prev))
        packed = batch_sequences(seqs)
        return {k: packed[k] for k in SEQUENCE_INPUTS}

    def act_batch(self, images: np.ndarray, instructions: Sequence[str], keys: np.ndarray | None = None,
                  prev_images: np.ndarray | None = None, states: np.ndarray | None = None) -> np.ndarray:
        """float32 ``[B, K, A]`` in the robot's units for frames ``[B, S, S, 3]`` (K = ``chunk``).
        ``keys`` (flow): per-row sampler keys ``[B, 2]`` uint32 (``split_keys``); None draws one
        key from the policy's stream. The bins head is greedy and ignores them. ``prev_images``
        uint8 ``[B, S, S, 3]``: each row's frame ``history_stride`` control steps earlier (its
        episode's first frame while t < k), required exactly when the checkpoint has frame history;
        ``states`` float ``[B, state_size]``: the observation states, required exactly when it has
        state prompts (``observation_spec``)."""
        images = self._check_images(images)
        prev_images, states = self._check_inputs(images, prev_images, states)
        instructions = list(instructions)
        if len(instructions) != len(images):
            raise ValueError(f"{len(images)} frames but {len(instructions)} instructions")
        for i, instruction in enumerate(instructions):
            if not isinstance(instruction, (str, bytes)):
                raise TypeError(f"instruction {i} must be a string, got {type(instruction).__name__}")
        if keys is not None:
            keys = np.asarray(keys)
            if keys.shape != (len(images), 2) or keys.dtype != np.uint32:
                raise ValueError(f"keys must be uint32 [{len(images)}, 2] (one per row), got {keys.dtype} {keys.shape}")
        seq = self.sequences(images, instructions, prev_images, states)
        if keys is None:
            self._rng, rng = jax.random.split(self._rng)
            out = np.asarray(self._infer(self.params, seq, rng))
        else:
            out = np.asarray(self._infer_rows(self.params, seq, keys))
        return self.to_robot_units(out)

    def check_instruction(self, instruction: str) -> None:
        """Raise TypeError / ValueError (naming the limit) unless ``instruction``'s prompt fits the
        sequence (``prompt_budget`` ids; with state prompts, with the longest state text: every
        bin 255); a fitting one stays cached for the next ``act``."""
        if not isinstance(instruction, (str, bytes)):
            raise TypeError(f"instruction must be a string, got {type(instruction).__name__}")
        self.prompts(instruction)
        if self.state_dims:
            self.prompts(instruction, state_bins=np.full(len(self.state_dims), 255, np.int32))

    def act(self, observation: Mapping[str, Any], instruction: str, key: np.ndarray | None = None) -> np.ndarray:
        """float32 ``[K, A]`` for one observation ``{"image": uint8 [S, S, 3]}`` (plus
        ``"prev_image"`` and / or ``"state"`` when the checkpoint reads them: ``observation_spec``;
        other keys are ignored); ``key``: this call's sampler key ``[2]`` uint32 (as a row of
        ``act_batch``'s ``keys``), else the policy's stream."""
        needed = list(self.observation_spec())
        missing = [name for name in needed if name not in observation]
        if missing:
            spec = self.observation_spec()
            raise KeyError("observation needs " + ", ".join(f"{n!r} ({spec[n][1]} {list(spec[n][0])})" for n in needed)
                           + f"; missing {missing}, got keys {sorted(observation)}")
        keys = None if key is None else np.asarray(key)[None]
        prev = np.asarray(observation["prev_image"])[None] if self.history_frames else None
        state = np.asarray(observation["state"])[None] if self.state_dims else None
        return self.act_batch(np.asarray(observation["image"])[None], [instruction], keys, prev_images=prev,
                              states=state)[0]

    def to_robot_units(self, out: np.ndarray) -> np.ndarray:
        """Model outputs -> actions ``[B, K, A]`` float32: flow ``[B, K, A]`` normalised ->
        unnormalised; bins ``[B, K * A]`` ints (time-major, as ``predict_bins_cached`` returns them)
        -> ``[B, K, A]`` bin centres."""
        if self.head == "bins":
            bins = np.clip(out.astype(np.int64), 0, self._bin_centres.shape[1] - 1)
            bins = bins.reshape(len(bins), self.chunk, self.action_dim)  # [B, K, A]
            actions = np.take_along_axis(self._bin_centres[None, None], bins[..., None], axis=-1)[..., 0]
            return actions.astype(np.float32)
        if self.action_normalization == "none":
            return out.astype(np.float32)
        return np.asarray(stats_lib.unnormalize(out, self._action_stats, self.action_normalization,
                                                mask=self._normalize_mask), np.float32)

    def reseed(self, seed: int) -> None:
        """Restart the sampler's noise stream (flow) from ``seed``: an episode's actions then do
        not depend on what the policy did before (unbatched evaluation reseeds per episode; batched
        evaluation runs the same stream per row, ``seed_keys`` / ``split_keys``)."""
        self._rng = jax.random.PRNGKey(int(seed))

    def compiled_variants(self) -> int:
        """How many times inference was compiled: one per batch size used, with and without
        per-row ``keys`` counted apart (flow; the bins head shares one function)."""
        rows = self._infer_rows is not self._infer
        return int(self._infer._cache_size()) + (int(self._infer_rows._cache_size()) if rows else 0)


class ChunkedPolicy(Protocol):
    """What :class:`ActionChunker` drives (a :class:`Policy`, or a test's stand-in): ``chunk`` K
    actions per call, ``execute_steps`` executed by default, and the frame-history inputs
    (``history_frames`` 0 or 1, ``history_stride`` k; 0 and 0 for a policy without them)."""

    chunk: int
    execute_steps: int
    history_frames: int
    history_stride: int

    def act(self, observation: Mapping[str, Any], instruction: str) -> np.ndarray: ...


class ActionChunker:
    """Executes ``execute`` actions of each predicted chunk before asking the policy again
    (LAPA / ViPRA / openpi "action chunking"). ``step`` returns one action ``[A]``; ``replans``
    counts policy calls since ``reset``. For a frame-history policy (``policy.history_frames``)
    it keeps the episode's frames (:class:`FrameHistory`: ``step`` must see every control step's
    observation, as it does) and adds ``"prev_image"`` (o_{t-k}, the first frame while t < k) to
    the observation of each policy call; ``reset`` starts a new episode."""

    def __init__(self, policy: ChunkedPolicy, execute: int | None = None):
        self.policy = policy
        chunk = int(policy.chunk)
        self.execute = int(execute or policy.execute_steps)
        if not 1 <= self.execute <= chunk:
            raise ValueError(f"execute={self.execute} must be in [1, {chunk}] (the policy's chunk)")
        self.history_frames = int(policy.history_frames)
        self.history_stride = int(policy.history_stride)
        self.reset()

    def reset(self) -> None:
        self._queue: list[np.ndarray] = []
        self.replans = 0
        self.call_seconds: list[float] = []
        # Every step's frame is pushed, but only those a replan reads are kept.
        self.history = FrameHistory(self.history_stride, self.execute) if self.history_frames else None

    def step(self, observation: Mapping[str, Any], instruction: str) -> np.ndarray:
        if self.history is not None:
            if "image" not in observation:
                raise KeyError(f"observation needs 'image' (a frame-history policy's chunker keeps every step's "
                               f"frame); got keys {sorted(observation)}")
            self.history.push(observation["image"])
        if not self._queue:
            if self.history is not None:
                observation = {**observation, "prev_image": self.history.previous()}
            start = time.perf_counter()
            chunk = np.asarray(self.policy.act(observation, instruction))
            self.call_seconds.append(time.perf_counter() - start)
            self._queue = list(chunk[: self.execute])
            self.replans += 1
        return self._queue.pop(0)
