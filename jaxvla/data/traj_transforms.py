"""Pure tf functions on ONE standardised trajectory (``jaxvla/data/schema.py``).

Each transform takes a trajectory dict (nested: ``traj["observation"]["image_primary"]``, every
tensor with the trajectory length ``T`` first) and returns a dict of *samples* whose leading dim
``N`` is the number of samples (``flatten()`` then turns them into one element each). Images stay
encoded strings here; they are decoded per sample afterwards, so a window of images is a string
tensor ``[N, W]``.

Key groups, and how the windowing transforms treat them:

* ``observation/*`` (images, proprio, timestep): per frame; gathered at the frame indices.
* ``action`` [T, A] and ``has_action`` [T]: per step; gathered over the action window.
* every other key (``task/*``, ``dataset_name``, ``traj_key``, extra per-step keys such as joined
  latent labels): taken at the sample's anchor step ``t``.

Output keys and shapes (``S`` = string, ``P`` proprio dim, ``A`` action dim):

``frame_pairs(traj, gap, action_window=None, history=1, history_stride=1)`` -- LAPA's (x_t,
x_{t+H}) for every t with t + H <= T - 1, so N = max(T - H, 0):
    observation/<key>   [N, 2, ...]   frames t and t + H (image_*: S [N, 2]; timestep [N, 2])
    action              [N, W, A]     actions t .. t+H-1 (W = action_window or H; steps past H or
                                      past the episode are zeros)
    has_action          [N, W]        False for those padded steps and where the step had none
    gap                 int32 [N]     H
    others              [N, ...]      at t

``clips(traj, length, stride=1, history=1, history_stride=1)`` -- ViPRA's L+1 frames t, t+s, ...,
t+L*s, N = max(T - L*s, 0):
    observation/<key>   [N, L+1, ...]
    action              [N, L*s, A]   every step's action from t to t+L*s-1
    has_action          [N, L*s]
    others              [N, ...]      at t

``history_windows(traj, window, stride=1)`` -- observation windows of W frames ending at t, N = T:
    observation/<key>   [N, W, ...]   frames t-(W-1)k, ..., t-k, t (k = ``stride`` control steps);
                                      indices before 0 repeat frame 0
    observation/pad_mask bool [N, W]  False on those repeated (padding) frames
    others              unchanged [N, ...] (so it composes with ``action_chunks``)

Frame history of pairs and clips (``history`` W > 1, ``history_stride`` k): the sample's frames
are preceded by the W - 1 history frames of its anchor t, exactly ``history_windows``' first W - 1:
``observation/<key>`` [N, (W-1) + 2, ...] (pairs: t-(W-1)k, ..., t-k, t, t+H) or
[N, (W-1) + L+1, ...] (clips), indices before 0 repeating frame 0, and ``observation/pad_mask``
bool [N, (W-1) + F] (False on those repeated frames, True on the sample's own F frames). The anchor
t, the actions and every other key are those of the sample without history: one sample per t
still, the history frame is context only. With W = 1 nothing changes (no ``pad_mask``).

``action_chunks(traj, chunk, pad="zero")`` -- action chunks of K steps starting at t, N = T:
    action              [N, K, A]     actions t .. t+K-1
    action_pad_mask     bool [N, K]   False past the episode end and where ``has_action`` is
                                      False (e.g. the RLDS terminal step, action-free video)
    has_action          bool [N]      unchanged: whether step t itself has an action
    others              unchanged [N, ...]
  Masked entries are zeros (``pad="zero"``) or repeat the last unmasked action of the chunk
  (``pad="last"``; zeros when the chunk has none).

``goal_relabel_uniform(traj, seed)`` -- adds per step a goal drawn uniformly from t..T-1:
    task/image_<camera> S [T], task/proprio [T, P], task/goal_timestep int32 [T]

``subsample(traj, max_len, seed)`` -- keeps ``max_len`` random rows (in order) of every key when
N > max_len (use it on a trajectory or on the samples of one trajectory to cap their number).

``drop_actions(traj)`` -- the action-free view: ``action`` zeros, ``has_action`` (and
``action_pad_mask`` when present) False.

Seeds are stateless tf seeds: int tensors of shape [2].
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

Traj = dict[str, Any]

ACTION_KEYS = ("action", "has_action")


def traj_length(traj: Traj) -> tf.Tensor:
    """T of a standardised trajectory (from ``action``, which every schema trajectory has)."""
    if "action" in traj:
        return tf.shape(traj["action"])[0]
    return tf.shape(tf.nest.flatten(traj)[0])[0]


def _gather(tree: Any, indices: tf.Tensor) -> Any:
    return tf.nest.map_structure(lambda x: tf.gather(x, indices), tree)


def _split(traj: Traj) -> tuple[dict, dict, dict]:
    """(observation, action keys, other keys) of a trajectory."""
    observation = dict(traj.get("observation", {}))
    actions = {k: traj[k] for k in ACTION_KEYS if k in traj}
    others = {k: v for k, v in traj.items() if k != "observation" and k not in ACTION_KEYS}
    return observation, actions, others


def _action_window(traj: Traj, starts: tf.Tensor, window: int, valid_len: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Actions starting at ``starts`` [N] for ``window`` steps; steps >= ``valid_len`` into the
    window or past the end are zeros with has_action False. -> ([N, W, A], [N, W])."""
    length = traj_length(traj)
    offsets = tf.range(window, dtype=tf.int32)
    index = starts[:, None] + offsets[None, :]
    valid = tf.logical_and(index < length, (offsets < valid_len)[None, :])
    index = tf.minimum(index, tf.maximum(length - 1, 0))
    action = tf.gather(traj["action"], index)
    has_action = tf.gather(traj["has_action"], index) if "has_action" in traj else tf.ones_like(valid)
    mask = tf.logical_and(valid, has_action)
    action = tf.where(mask[..., None], action, tf.zeros_like(action))
    return action, mask


def _history_offsets(window: int, stride: int, where: str) -> list[int]:
    """Offsets -(W-1)k, ..., -k, 0 of a history window of W frames, k control steps apart."""
    window, stride = int(window), int(stride)
    if window < 1 or stride < 1:
        raise ValueError(f"{where}: history window and stride must be >= 1, got window={window}, stride={stride}")
    return [-(window - 1 - i) * stride for i in range(window)]


def _with_history(observation: dict, frame_index: tf.Tensor, history: int, history_stride: int,
                  where: str) -> dict:
    """``observation`` gathered at ``frame_index`` [N, F], preceded by the W - 1 history frames of
    each row's anchor ``frame_index[:, 0]`` (clamped to frame 0, ``pad_mask`` False there)."""
    offsets = _history_offsets(history, history_stride, where)[:-1]
    if not offsets:
        return _gather(observation, frame_index)
    past = frame_index[:, :1] + tf.constant(offsets, tf.int32)[None, :]  # [N, W-1], may be < 0
    index = tf.concat([tf.maximum(past, 0), frame_index], axis=1)
    out = _gather(observation, index)
    out["pad_mask"] = tf.concat([past >= 0, tf.ones_like(frame_index, tf.bool)], axis=1)
    return out


def frame_pairs(traj: Traj, gap: int, action_window: int | None = None, history: int = 1,
                history_stride: int = 1) -> Traj:
    """(x_t, x_{t+gap}) for every valid t, preceded by ``history`` - 1 history frames k =
    ``history_stride`` steps apart; see the module docstring for keys and shapes."""
    gap = int(gap)
    if gap < 1:
        raise ValueError(f"frame_pairs: gap must be >= 1, got {gap}")
    window = gap if action_window is None else int(action_window)
    if window < gap:
        raise ValueError(f"frame_pairs: action_window ({window}) must be >= gap ({gap})")
    observation, _, others = _split(traj)
    num = tf.maximum(traj_length(traj) - gap, 0)
    starts = tf.range(num, dtype=tf.int32)
    frame_index = tf.stack([starts, starts + gap], axis=1)
    out = _gather(others, starts)
    out["observation"] = _with_history(observation, frame_index, history, history_stride, "frame_pairs")
    out["action"], out["has_action"] = _action_window(traj, starts, window, gap)
    out["gap"] = tf.fill([num], tf.constant(gap, tf.int32))
    return out


def clips(traj: Traj, length: int, stride: int = 1, history: int = 1, history_stride: int = 1,
          action_window: int | None = None) -> Traj:
    """L+1 = ``length + 1`` frames t, t+stride, ..., with every step's action in between (zero-padded
    to ``action_window`` >= L * stride steps, so datasets of a mixture with different strides share
    one shape), preceded by ``history`` - 1 history frames ``history_stride`` steps apart (module
    docstring)."""
    length, stride = int(length), int(stride)
    if length < 1 or stride < 1:
        raise ValueError(f"clips: length and stride must be >= 1, got length={length}, stride={stride}")
    observation, _, others = _split(traj)
    span = length * stride
    window = span if action_window is None else int(action_window)
    if window < span:
        raise ValueError(f"clips: action_window ({window}) must be >= clip_length * stride ({span})")
    num = tf.maximum(traj_length(traj) - span, 0)
    starts = tf.range(num, dtype=tf.int32)
    frame_index = starts[:, None] + tf.range(0, span + 1, stride, dtype=tf.int32)[None, :]
    out = _gather(others, starts)
    out["observation"] = _with_history(observation, frame_index, history, history_stride, "clips")
    out["action"], out["has_action"] = _action_window(traj, starts, window, span)
    return out


def history_windows(traj: Traj, window: int, stride: int = 1) -> Traj:
    """Observation windows of ``window`` frames ``stride`` control steps apart ending at each t
    (frames t-(W-1)k, ..., t-k, t; indices before 0 repeat frame 0)."""
    offsets = _history_offsets(window, stride, "history_windows")
    out = {k: v for k, v in traj.items() if k != "observation"}
    length = traj_length(traj)
    index = tf.range(length, dtype=tf.int32)[:, None] + tf.constant(offsets, tf.int32)[None, :]
    observation = _gather(dict(traj["observation"]), tf.maximum(index, 0))
    observation["pad_mask"] = index >= 0
    out["observation"] = observation
    return out


def action_chunks(traj: Traj, chunk: int, pad: str = "zero") -> Traj:
    """The K = ``chunk`` actions starting at each t with ``action_pad_mask``."""
    chunk = int(chunk)
    if chunk < 1:
        raise ValueError(f"action_chunks: chunk must be >= 1, got {chunk}")
    if pad not in ("zero", "last"):
        raise ValueError(f"action_chunks: pad must be 'zero' or 'last', got {pad!r}")
    out = dict(traj)
    starts = tf.range(traj_length(traj), dtype=tf.int32)
    action, mask = _action_window(traj, starts, chunk, chunk)
    if pad == "last":
        # For each position k: the last unmasked position j <= k of the same chunk (-1: none).
        positions = tf.range(chunk, dtype=tf.int32)
        usable = tf.logical_and(mask[:, None, :], (positions[None, :] <= positions[:, None])[None])  # [N, k, j]
        last = tf.reduce_max(tf.where(usable, positions[None, None, :], -1), axis=-1)  # [N, K]
        filled = tf.gather(action, tf.maximum(last, 0), batch_dims=1)
        action = tf.where((last >= 0)[..., None], filled, tf.zeros_like(action))
    out["action"] = action
    out["action_pad_mask"] = mask
    return out


def goal_relabel_uniform(traj: Traj, seed: tf.Tensor) -> Traj:
    """Adds a goal per step, uniform over the current and future frames (t..T-1)."""
    out = dict(traj)
    length = traj_length(traj)
    steps = tf.range(length, dtype=tf.int32)
    u = tf.random.stateless_uniform([length], tf.cast(seed, tf.int64), dtype=tf.float32)
    remaining = tf.cast(length - steps, tf.float32)
    goal = steps + tf.minimum(tf.cast(tf.floor(u * remaining), tf.int32), length - steps - 1)
    observation = traj["observation"]
    task = dict(traj.get("task", {}))
    for key, value in observation.items():
        if key.startswith("image_") or key == "proprio":
            task[key] = tf.gather(value, goal)
    task["goal_timestep"] = goal
    out["task"] = task
    return out


def subsample(traj: Traj, max_len: int, seed: tf.Tensor) -> Traj:
    """At most ``max_len`` rows of every key, chosen uniformly without replacement, kept in order."""
    max_len = int(max_len)
    if max_len < 1:
        raise ValueError(f"subsample: max_len must be >= 1, got {max_len}")
    length = tf.shape(tf.nest.flatten(traj)[0])[0]
    keys = tf.random.stateless_uniform([length], tf.cast(seed, tf.int64), dtype=tf.float32)
    chosen = tf.sort(tf.argsort(keys)[: tf.minimum(length, max_len)])
    return _gather(traj, chosen)


def drop_actions(traj: Traj) -> Traj:
    """Action-free view: zero actions, ``has_action`` / ``action_pad_mask`` False."""
    out = dict(traj)
    out["action"] = tf.zeros_like(traj["action"])
    if "has_action" in traj:
        out["has_action"] = tf.zeros_like(traj["has_action"])
    else:
        out["has_action"] = tf.zeros(tf.shape(traj["action"])[:1], tf.bool)
    if "action_pad_mask" in traj:
        out["action_pad_mask"] = tf.zeros_like(traj["action_pad_mask"])
    return out
