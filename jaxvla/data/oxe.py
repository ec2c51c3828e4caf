"""Raw RLDS layouts of the Open-X Embodiment datasets (and Meta-World): one ``RawLayout`` each.

A ``RawLayout`` says where a dataset keeps its cameras, proprioception, action and language, how
its action and gripper are encoded, and how fast it is controlled; ``layout.standardize`` (also
``layout(trajectory)``: a layout is callable) maps a raw RLDS trajectory to the schema of
``jaxvla.data.schema``. Layouts are plain frozen data (no callables), so ``layout.to_dict()`` /
``layout.fingerprint()`` can key caches such as normalisation statistics.

This module holds the layouts, not the registry: ``OXE_LAYOUTS`` (name -> layout, the Open-X
datasets) and ``METAWORLD_LAYOUT``. ``jaxvla.data.registry`` turns each into the dataset's one
``DatasetSpec`` (``standardize_fn`` = the layout, ``spec.layout`` = the layout) and resolves names
and aliases (``registry.get_dataset_spec("bridge").layout``); mixtures are in
``jaxvla.data.mixtures``.

Input convention of ``standardize``
-----------------------------------
One trajectory whose step fields are stacked along time, i.e. the RLDS ``steps`` dict with a
leading ``T`` on every tensor, plus ``episode_metadata`` (unstacked scalars, or broadcast to
``[T]``) when the reader keeps it. Both layouts are accepted: the step fields at the top level
(below), or nested as ``{"steps": {...[T]...}, "episode_metadata": {...}}`` (what
``TrajDataset.from_rlds`` passes); layout paths are relative to the steps either way::

    {"observation": {"image": tf.string [T], "state": float32 [T, 7], ...},
     "action": float32 [T, 7]  or  {"world_vector": [T, 3], ...},
     "language_instruction": tf.string [T], "is_first": bool [T], "is_last": bool [T], ...,
     "episode_metadata": {...}}                                   # optional

Images should arrive *encoded* (read the TFDS ``Image`` features with
``tfds.decode.SkipDecoding()``); a decoded ``uint8 [T, H, W, 3]`` image is re-encoded as JPEG
(quality 95), which works but is slow. Keys are looked up by path (``"observation/image_0"``);
feature names that themselves contain ``/`` (kuka's ``clip_function_input/base_pose_tool_reached``,
bc_z's ``present/xyz``) and dlimp-style flattened keys (``{"observation/image": ...}``) both
resolve. ``traj_key``, ``dataset_name`` and ``observation/timestep`` are carried over when the
reader has set them; ``dataset_name`` (= ``layout.name``) and ``timestep`` (``0..T-1``) are filled
in otherwise. Nothing else is passed through, so every dataset of a mixture has the same structure.

Output (see ``jaxvla.data.schema``)::

    observation/image_{primary,secondary,wrist}  tf.string [T]  ("" where the camera is absent)
    observation/proprio    float32 [T, layout.proprio_dim]  (P = 0 when the dataset has none)
    observation/timestep   int32 [T]
    action                 float32 [T, layout.action_dim]   (zeros where has_action is False)
    has_action             bool [T]
    task/language_instruction  tf.string [T]  ("" when the dataset has no language)
    dataset_name           tf.string [T]
    traj_key               tf.string [T]      (only when the input had it)

Features the layout needs but the trajectory lacks raise a ``KeyError`` (the pipeline's
``MissingFeatureError``) naming the dataset, every missing key and the keys that exist, at trace
time when used inside ``tf.data`` maps. ``layout.raw_keys()`` lists what a layout reads, so a reader
can check a builder's features before building anything.

Action and gripper conventions
------------------------------
``action_encoding``:

* ``eef_pos``: end-effector delta, xyz (3) + rotation delta roll/pitch/yaw (3) + gripper (1).
* ``eef_pos_abs``: absolute end-effector target, xyz (3) + roll/pitch/yaw (3) + gripper (1).
* ``joint_pos``: joint positions + gripper.
* ``xyz_gripper``: Meta-World, xyz delta (3) + gripper effort (1).

After standardisation the gripper dimension (``layout.gripper_dims``) of every dataset whose
``gripper_convention`` is in ``CONVERTED_GRIPPER_CONVENTIONS`` is *absolute, 1 = open,
0 = closed*. The raw conventions and the conversion applied to each:

* ``relative_close_positive`` (RT-1 / fractal, kuka, jaco_play, nyu_door, berkeley_autolab_ur5):
  ``+1`` = close, ``-1`` = open, ``0`` = keep. Converted by ``relative_to_absolute_gripper``:
  a value ``>= REL_GRIPPER_THRESHOLD`` is a close event, ``<= -REL_GRIPPER_THRESHOLD`` an open
  event; the absolute state at ``t`` is the last event at or before ``t``. Before the first
  event the gripper is taken to be in the state opposite to that event (the first event changes
  it); a trajectory without events is open throughout.
* ``absolute_open_continuous`` (bridge): commanded opening in ``[0, 1]``, 1 = open. Converted by
  ``binarize_gripper``: ``> 0.95`` -> 1, ``< 0.05`` -> 0, values in between take the value of
  the next decided step (the command is ramping towards it); trailing undecided values are
  thresholded at 0.5.
* ``signed_open_positive`` (taco_play, nyu_franka_play): ``+1`` open, ``-1`` close -> clip to
  ``[0, 1]``.
* ``signed_close_positive`` (viola, roboturk, austin_*, furniture_bench, utaustin_mutex):
  ``+1`` close, ``-1`` open -> ``1 - clip(x, 0, 1)``.
* ``absolute_close_one`` (stanford_hydra, dlr_edan, bc_z, berkeley_fanuc's gripper state):
  1 = closed -> ``1 - clip(x, 0, 1)``.
* ``absolute_open_one`` (toto, bridge_oxe: ``open_gripper``): kept (clipped to ``[0, 1]``).
* ``constant``: the dataset has no gripper action; a constant is padded (language_table: 1 =
  open; berkeley_cable_routing: 0 = closed, the gripper holds the cable).
* ``as_released``: kept as stored; the raw convention of these datasets (ucsd_kitchen,
  iamlab_cmu_pickup_insert, cmu_stretch, fmb, dobbe) is not verified here.
* ``effort_close_positive`` (Meta-World): gripper effort in ``[-1, 1]``, ``+1`` closes; kept so
  that a policy's output can be sent to the simulator unchanged.

``normalize_mask`` marks the action dims that get normalised: False for gripper dims and for
constant padding (language_table's rotation, jaco_play's rotation), True otherwise.

Control frequency and the LAPA frame gap
----------------------------------------
``control_hz`` is the rate of the dataset's steps as published. The LAPA window ``H`` (``x_t`` ->
``x_{t+H}``, about 0.6 s for robot videos) is ``registry.dataset_gap(spec)``, i.e.
``gaps.frame_gap(control_hz, gaps.ROBOT_GAP_SECONDS)``: e.g. 3 for bridge (5 Hz), 2 for fractal
(3 Hz). Meta-World (v3, installed package) steps the simulator ``frame_skip = 5`` times per
action with ``timestep = 0.0025`` s, so one step is 0.0125 s = 80 Hz (``METAWORLD_CONTROL_HZ``)
and 0.6 s is 48 steps (a whole expert episode is ~50-80 steps).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Callable, Mapping

from jaxvla.data.schema import IMAGE_CAMERAS, flat_keys, missing_feature_error

# --------------------------------------------------------------------------- vocabularies

EEF_POS = "eef_pos"
EEF_POS_ABS = "eef_pos_abs"
JOINT_POS = "joint_pos"
XYZ_GRIPPER = "xyz_gripper"
ACTION_ENCODINGS = frozenset({EEF_POS, EEF_POS_ABS, JOINT_POS, XYZ_GRIPPER})

PROPRIO_ENCODINGS = frozenset(
    {
        "none",  # no proprioception (P = 0)
        "eef_pos_euler",  # xyz + roll/pitch/yaw (+ gripper)
        "eef_pos_quat",  # xyz + quaternion (+ gripper)
        "eef_pos_axis_angle",  # xyz + axis-angle (+ gripper)
        "joint",  # joint positions (+ gripper)
        "xy",  # planar effector position (language_table)
        "raw",  # the dataset's state vector as stored
        "metaworld_state",  # Meta-World's 39-d state: hand xyz, gripper, objects, previous, goal
    }
)

CONVERTED_GRIPPER_CONVENTIONS = frozenset(
    {
        "relative_close_positive",
        "absolute_open_continuous",
        "signed_open_positive",
        "signed_close_positive",
        "absolute_close_one",
        "absolute_open_one",
        "constant",
    }
)
GRIPPER_CONVENTIONS = CONVERTED_GRIPPER_CONVENTIONS | {"as_released", "effort_close_positive"}

# Part transforms (applied to the sliced [T, k] float32 values).
TRANSFORMS = frozenset(
    {
        "identity",
        "rel_to_abs_gripper",  # relative_close_positive -> absolute open=1
        "binarize_gripper",  # absolute_open_continuous -> {0, 1}
        "clip01",  # signed_open_positive -> [0, 1]
        "clip01_invert",  # signed_close_positive / absolute_close_one -> 1 - clip(x, 0, 1)
        "quat_to_euler",  # [T, 4] quaternion (x, y, z, w) -> [T, 3] roll, pitch, yaw
    }
)
LANGUAGE_ENCODINGS = frozenset({"string", "codepoints"})

REL_GRIPPER_THRESHOLD = 0.5


# --------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class Part:
    """One piece of a concatenated vector (proprio or action).

    ``key`` is a path in the raw trajectory (``"action/world_vector"``, ``"observation/state"``);
    the feature is cast to float32 (bool -> 0/1; a ZLIB-compressed ``tf.string`` holding raw
    float32 bytes, as in some copies of kuka, is decompressed), made ``[T, k]`` and sliced
    ``[:, start:stop]`` before ``transform`` runs. ``key=None`` is a constant ``value`` of width
    ``size``.
    """

    key: str | None
    start: int | None = None
    stop: int | None = None
    transform: str = "identity"
    value: float = 0.0
    size: int = 0

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}; known: {sorted(TRANSFORMS)}")
        if self.key is None and self.size <= 0:
            raise ValueError("a constant Part (key=None) needs size > 0")


def _parts(*items: Any) -> tuple[Part, ...]:
    """Shorthand: "path", ("path", start, stop[, transform]) or a Part."""
    out = []
    for item in items:
        if isinstance(item, Part):
            out.append(item)
        elif isinstance(item, str):
            out.append(Part(item))
        else:
            out.append(Part(*item))
    return tuple(out)


def const(value: float, size: int = 1) -> Part:
    return Part(None, value=float(value), size=int(size))


@dataclasses.dataclass(frozen=True, repr=False)
class RawLayout:
    """How one RLDS dataset maps onto the standard trajectory (see the module docstring).

    Camera keys are relative to ``observation`` (None: the dataset has no such camera).
    ``image_present_flags`` lists ``(camera, path)`` of per-episode booleans (e.g. bridge's
    ``episode_metadata/has_image_3``): where present and False the camera becomes "".
    """

    name: str
    tfds_name: str
    primary_image: str | None
    secondary_image: str | None
    wrist_image: str | None
    action: tuple[Part, ...]
    action_encoding: str
    action_dim: int
    gripper_dims: tuple[int, ...]
    normalize_mask: tuple[bool, ...]
    gripper_convention: str
    control_hz: float
    language_key: str | None
    proprio: tuple[Part, ...] = ()
    proprio_encoding: str = "none"
    proprio_dim: int = 0
    language_encoding: str = "string"
    depth_keys: tuple[str, ...] = ()  # recorded for reference; ignored by standardize
    image_present_flags: tuple[tuple[str, str], ...] = ()
    action_on_last_step: bool = True  # False: the last step's action is padding (has_action False)
    notes: str = ""

    def __post_init__(self):
        where = f"RawLayout {self.name!r}"
        if self.action_encoding not in ACTION_ENCODINGS:
            raise ValueError(f"{where}: action_encoding {self.action_encoding!r} not in {sorted(ACTION_ENCODINGS)}")
        if self.proprio_encoding not in PROPRIO_ENCODINGS:
            raise ValueError(f"{where}: proprio_encoding {self.proprio_encoding!r} not in {sorted(PROPRIO_ENCODINGS)}")
        if self.gripper_convention not in GRIPPER_CONVENTIONS:
            raise ValueError(f"{where}: gripper_convention {self.gripper_convention!r} not in {sorted(GRIPPER_CONVENTIONS)}")
        if self.language_encoding not in LANGUAGE_ENCODINGS:
            raise ValueError(f"{where}: language_encoding {self.language_encoding!r} not in {sorted(LANGUAGE_ENCODINGS)}")
        if len(self.normalize_mask) != self.action_dim:
            raise ValueError(f"{where}: normalize_mask has {len(self.normalize_mask)} entries, action_dim is {self.action_dim}")
        for d in self.gripper_dims:
            if not 0 <= d < self.action_dim:
                raise ValueError(f"{where}: gripper dim {d} outside action_dim {self.action_dim}")
            if self.normalize_mask[d]:
                raise ValueError(f"{where}: gripper dim {d} must not be normalised")
        if (self.proprio_dim == 0) != (not self.proprio):
            raise ValueError(f"{where}: proprio_dim {self.proprio_dim} inconsistent with proprio parts {self.proprio}")
        if not self.action:
            raise ValueError(f"{where}: no action parts")
        if not (self.control_hz > 0):
            raise ValueError(f"{where}: control_hz must be > 0, got {self.control_hz}")
        for camera, _ in self.image_present_flags:
            if camera not in IMAGE_CAMERAS:
                raise ValueError(f"{where}: image_present_flags names unknown camera {camera!r}")
        if all(k is None for k in self.image_keys.values()):
            raise ValueError(f"{where}: no camera")

    def __repr__(self) -> str:
        return f"RawLayout({self.name!r})"

    # -- derived ----------------------------------------------------------------------

    @property
    def image_keys(self) -> dict[str, str | None]:
        """camera (``IMAGE_CAMERAS``) -> raw key under ``observation`` (or None)."""
        return {"primary": self.primary_image, "secondary": self.secondary_image, "wrist": self.wrist_image}

    @property
    def gripper_output(self) -> str:
        """The gripper convention after ``standardize``."""
        if self.gripper_convention in CONVERTED_GRIPPER_CONVENTIONS:
            return "absolute_open_one"
        return self.gripper_convention

    def raw_keys(self) -> tuple[str, ...]:
        """Every raw path ``standardize`` reads (flags excepted: they are optional)."""
        keys = [f"observation/{k}" for k in self.image_keys.values() if k is not None]
        keys += [p.key for p in self.proprio + self.action if p.key is not None]
        if self.language_key is not None:
            keys.append(self.language_key)
        if not self.action_on_last_step:
            keys.append("is_last")
        return tuple(dict.fromkeys(keys))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the spec's JSON: changes whenever the mapping changes."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # -- the transform ----------------------------------------------------------------

    def standardize(self, trajectory: Mapping[str, Any]) -> dict[str, Any]:
        """Raw stacked RLDS trajectory -> standard trajectory (module docstring). Runs as plain
        Python inside ``tf.data`` maps (AutoGraph off: nothing here branches on tensor values)."""
        return _unconverted_standardize()(self, trajectory)

    __call__ = standardize  # a layout is the ``standardize_fn`` of its registry entry


# --------------------------------------------------------------------------- TF helpers


def _tf():
    import tensorflow as tf

    return tf


def _lookup(trajectory: Mapping[str, Any], path: str, dataset: str, required: bool = True):
    """``path`` in a nested (or partly flattened) dict; names may themselves contain ``/``."""
    parts = path.split("/")
    node: Any = trajectory
    i = 0
    while node is not None and i < len(parts):
        found = None
        if isinstance(node, Mapping):
            for j in range(len(parts), i, -1):  # the longest name first
                if "/".join(parts[i:j]) in node:
                    found = j
                    break
        node = None if found is None else node["/".join(parts[i:found])]
        i = len(parts) if found is None else found
    if node is None or isinstance(node, Mapping):
        if not required:
            return None
        raise missing_feature_error(
            f"dataset {dataset!r}: feature {path!r} not found in the trajectory; "
            f"it has {sorted(flat_keys(trajectory))}"
        )
    return node


def _has(trajectory: Mapping[str, Any], path: str) -> bool:
    return _lookup(trajectory, path, "", required=False) is not None


def _length(trajectory: Mapping[str, Any], spec: RawLayout):
    tf = _tf()
    for path in ("action", "observation", "is_first", "is_last"):
        node = _lookup(trajectory, path, spec.name, required=False)
        if node is None:
            node = trajectory.get(path) if isinstance(trajectory, Mapping) else None
        if node is None:
            continue
        leaves = tf.nest.flatten(node)
        if leaves:
            return tf.shape(leaves[0])[0]
    raise missing_feature_error(
        f"dataset {spec.name!r}: cannot find the trajectory length (no 'action', 'observation', "
        f"'is_first' or 'is_last'); it has {sorted(flat_keys(trajectory))}"
    )


def _to_float(x, spec: RawLayout, path: str):
    tf = _tf()
    x = tf.convert_to_tensor(x)
    if x.dtype == tf.string:  # raw float32 bytes, ZLIB-compressed (kuka)
        x = tf.io.decode_raw(tf.io.decode_compressed(x, compression_type="ZLIB"), tf.float32)
    elif x.dtype != tf.float32:
        x = tf.cast(x, tf.float32)
    if x.shape.rank == 1:
        x = x[:, None]
    elif x.shape.rank is not None and x.shape.rank > 2:
        raise ValueError(f"dataset {spec.name!r}: feature {path!r} has shape {x.shape}; expected [T] or [T, k]")
    return x


def relative_to_absolute_gripper(relative):
    """[T] relative gripper (+1 close, -1 open, 0 keep) -> [T] absolute (1 open, 0 closed).

    See the module docstring for the rule (events at ``|x| >= REL_GRIPPER_THRESHOLD``).
    """
    tf = _tf()
    r = tf.convert_to_tensor(relative, tf.float32)
    signed = tf.where(r >= REL_GRIPPER_THRESHOLD, -1.0, tf.where(r <= -REL_GRIPPER_THRESHOLD, 1.0, 0.0))
    is_event = tf.not_equal(signed, 0.0)
    events = tf.boolean_mask(signed, is_event)
    # State before the first event: the opposite of that event; open when there is none.
    initial = tf.cond(tf.size(events) > 0, lambda: -events[0], lambda: tf.constant(1.0))
    count = tf.cumsum(tf.cast(is_event, tf.int32))  # events at or before t
    state = tf.gather(tf.concat([initial[None], events], 0), count)
    return (state + 1.0) / 2.0


def binarize_gripper(opening, low: float = 0.05, high: float = 0.95):
    """[T] continuous gripper opening in [0, 1] (1 = open) -> [T] in {0, 1}.

    ``> high`` -> 1, ``< low`` -> 0; values in between take the next decided value; trailing
    undecided values are thresholded at 0.5.
    """
    tf = _tf()
    x = tf.convert_to_tensor(opening, tf.float32)
    decided = tf.logical_or(x > high, x < low)
    value = tf.cast(x > 0.5, tf.float32)
    rev_decided, rev_value = decided[::-1], value[::-1]
    count = tf.cumsum(tf.cast(rev_decided, tf.int32))  # decided steps at or after t (reversed)
    filled = tf.gather(tf.concat([[0.0], tf.boolean_mask(rev_value, rev_decided)], 0), count)
    filled = tf.where(count > 0, filled, rev_value)
    return filled[::-1]


def quaternion_to_euler(quaternion):
    """[..., 4] quaternion (x, y, z, w) -> [..., 3] (roll, pitch, yaw), R = Rz(yaw) Ry(pitch) Rx(roll)."""
    tf = _tf()
    q = tf.convert_to_tensor(quaternion, tf.float32)
    q = q / tf.maximum(tf.norm(q, axis=-1, keepdims=True), 1e-12)
    x, y, z, w = tf.unstack(q, axis=-1)
    roll = tf.atan2(2.0 * (w * x + y * z), 1.0 - 2.0 * (x * x + y * y))
    pitch = tf.asin(tf.clip_by_value(2.0 * (w * y - z * x), -1.0, 1.0))
    yaw = tf.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))
    return tf.stack([roll, pitch, yaw], axis=-1)


def decode_codepoints(codepoints):
    """int32 [T, L] unicode codepoints, zero-padded -> tf.string [T] (UTF-8, up to the first 0)."""
    tf = _tf()
    c = tf.cast(tf.convert_to_tensor(codepoints), tf.int32)
    width = tf.shape(c)[1]
    positions = tf.broadcast_to(tf.range(width)[None, :], tf.shape(c))
    lengths = tf.reduce_min(tf.where(tf.equal(c, 0), positions, width), axis=1)
    ragged = tf.RaggedTensor.from_tensor(c, lengths=lengths)
    return tf.strings.unicode_encode(ragged, output_encoding="UTF-8")


def _apply(transform: str, x, spec: RawLayout):
    tf = _tf()
    if transform == "identity":
        return x
    if transform == "clip01":
        return tf.clip_by_value(x, 0.0, 1.0)
    if transform == "clip01_invert":
        return 1.0 - tf.clip_by_value(x, 0.0, 1.0)
    if transform in ("rel_to_abs_gripper", "binarize_gripper"):
        fn = relative_to_absolute_gripper if transform == "rel_to_abs_gripper" else binarize_gripper
        return tf.stack([fn(x[:, i]) for i in range(_static_width(x, spec, transform))], axis=1)
    if transform == "quat_to_euler":
        width = _static_width(x, spec, transform)
        if width != 4:
            raise ValueError(f"dataset {spec.name!r}: quat_to_euler needs 4 values, got {width}")
        return quaternion_to_euler(x)
    raise ValueError(f"unknown transform {transform!r}")


def _static_width(x, spec: RawLayout, what: str) -> int:
    width = x.shape[-1]
    if width is None:
        raise ValueError(f"dataset {spec.name!r}: {what} needs a static width, got shape {x.shape}")
    return int(width)


def _concat(spec: RawLayout, trajectory, parts, length, dim: int, what: str):
    tf = _tf()
    pieces = []
    for part in parts:
        if part.key is None:
            pieces.append(tf.fill(tf.stack([length, part.size]), tf.constant(part.value, tf.float32)))
            continue
        x = _to_float(_lookup(trajectory, part.key, spec.name), spec, part.key)
        x = x[:, part.start : part.stop]
        pieces.append(_apply(part.transform, x, spec))
    if not pieces:
        return tf.zeros(tf.stack([length, 0]), tf.float32)
    out = tf.concat(pieces, axis=-1)
    width = out.shape[-1]
    if width is not None and int(width) != dim:
        raise ValueError(
            f"dataset {spec.name!r}: {what} has {int(width)} dims after standardisation, the spec "
            f"says {dim} (parts {[(p.key, p.start, p.stop) for p in parts]})"
        )
    return tf.ensure_shape(out, [None, dim])


def _images(spec: RawLayout, trajectory, length):
    tf = _tf()
    flags = dict(spec.image_present_flags)
    out = {}
    for camera in IMAGE_CAMERAS:
        key = spec.image_keys[camera]
        if key is None:
            out[f"image_{camera}"] = tf.fill(tf.reshape(length, [1]), "")
            continue
        path = f"observation/{key}"
        image = tf.convert_to_tensor(_lookup(trajectory, path, spec.name))
        if image.dtype != tf.string:
            if image.dtype != tf.uint8 or image.shape.rank != 4:
                raise ValueError(
                    f"dataset {spec.name!r}: image {path!r} is {image.dtype.name} {image.shape}; expected "
                    "encoded tf.string [T] or uint8 [T, H, W, 3]"
                )
            image = tf.map_fn(
                lambda im: tf.io.encode_jpeg(im, quality=95), image, fn_output_signature=tf.string
            )
        if camera in flags:
            flag = _lookup(trajectory, flags[camera], spec.name, required=False)
            if flag is not None:
                flag = tf.broadcast_to(tf.cast(tf.reshape(flag, [-1])[:1], tf.bool), tf.shape(image))
                image = tf.where(flag, image, tf.fill(tf.shape(image), ""))
        out[f"image_{camera}"] = image
    return out


def _language(spec: RawLayout, trajectory, length):
    tf = _tf()
    if spec.language_key is None:
        return tf.fill(tf.reshape(length, [1]), "")
    raw = tf.convert_to_tensor(_lookup(trajectory, spec.language_key, spec.name))
    if spec.language_encoding == "codepoints":
        return decode_codepoints(raw)
    if raw.dtype != tf.string:
        raise ValueError(f"dataset {spec.name!r}: language {spec.language_key!r} is {raw.dtype.name}, expected tf.string")
    return tf.broadcast_to(raw, tf.reshape(length, [1]))


_UNCONVERTED: list[Callable[..., Any]] = []


def _unconverted_standardize() -> Callable[..., Any]:
    if not _UNCONVERTED:
        _UNCONVERTED.append(_tf().autograph.experimental.do_not_convert(standardize_trajectory))
    return _UNCONVERTED[0]


def standardize_trajectory(spec: RawLayout, trajectory: Mapping[str, Any]) -> dict[str, Any]:
    """``spec.standardize``: see the module docstring for the input and output."""
    tf = _tf()
    if not isinstance(trajectory, Mapping):
        raise TypeError(f"dataset {spec.name!r}: expected a trajectory dict, got {type(trajectory).__name__}")
    steps = trajectory.get("steps")
    if isinstance(steps, Mapping):  # {"steps": {...[T]...}, "episode_metadata": ...}: unwrap
        trajectory = {**steps, **{k: v for k, v in trajectory.items() if k != "steps"}}
    missing = [key for key in spec.raw_keys() if key != "is_last" and not _has(trajectory, key)]
    if missing:
        raise missing_feature_error(
            f"dataset {spec.name!r}: feature{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(k) for k in missing)} not found in the trajectory; "
            f"it has {sorted(flat_keys(trajectory))}"
        )
    length = _length(trajectory, spec)
    observation = _images(spec, trajectory, length)
    observation["proprio"] = _concat(spec, trajectory, spec.proprio, length, spec.proprio_dim, "proprio")
    timestep = _lookup(trajectory, "observation/timestep", spec.name, required=False)
    observation["timestep"] = tf.range(length, dtype=tf.int32) if timestep is None else tf.cast(timestep, tf.int32)

    action = _concat(spec, trajectory, spec.action, length, spec.action_dim, "action")
    if spec.action_on_last_step:
        has_action = tf.ones(tf.reshape(length, [1]), tf.bool)
    else:
        is_last = _lookup(trajectory, "is_last", spec.name, required=False)
        if is_last is None:
            has_action = tf.range(length) < length - 1
        else:
            has_action = tf.logical_not(tf.cast(is_last, tf.bool))
    action = action * tf.cast(has_action, tf.float32)[:, None]

    out = {
        "observation": observation,
        "action": action,
        "has_action": has_action,
        "task": {"language_instruction": _language(spec, trajectory, length)},
    }
    name = _lookup(trajectory, "dataset_name", spec.name, required=False)
    out["dataset_name"] = tf.fill(tf.reshape(length, [1]), spec.name) if name is None else name
    traj_key = _lookup(trajectory, "traj_key", spec.name, required=False)
    if traj_key is not None:
        out["traj_key"] = traj_key
    return out


# --------------------------------------------------------------------------- the layouts

_OXE_7D_MASK = (True,) * 6 + (False,)
_OBS_LANG = "observation/natural_language_instruction"
_STEP_LANG = "language_instruction"


def _eef7(**kwargs) -> dict[str, Any]:
    """Defaults shared by the 7-d end-effector-delta datasets (gripper last)."""
    base = dict(
        action_encoding=EEF_POS,
        action_dim=7,
        gripper_dims=(6,),
        normalize_mask=_OXE_7D_MASK,
        secondary_image=None,
        wrist_image=None,
    )
    base.update(kwargs)
    return base


def _rt1_style(gripper_transform: str = "rel_to_abs_gripper") -> tuple[Part, ...]:
    """RT-1-format action dict: world_vector (3), rotation_delta (3), gripper_closedness_action (1)."""
    return _parts(
        "action/world_vector",
        "action/rotation_delta",
        ("action/gripper_closedness_action", 0, 1, gripper_transform),
    )


def _flat7(gripper_transform: str) -> tuple[Part, ...]:
    """A flat 7-d action: 6 end-effector dims, then the gripper."""
    return _parts(("action", 0, 6), ("action", 6, 7, gripper_transform))


_LAYOUTS: list[RawLayout] = [
    # ---- the 25 datasets of Octo's oxe_magic_soup -------------------------------------
    RawLayout(
        name="fractal20220817_data",
        tfds_name="fractal20220817_data",
        **_eef7(
            primary_image="image",
            action=_rt1_style(),
            gripper_convention="relative_close_positive",
            control_hz=3.0,
            language_key=_OBS_LANG,
            proprio=_parts("observation/base_pose_tool_reached", "observation/gripper_closed"),
            proprio_encoding="eef_pos_quat",
            proprio_dim=8,
            notes="RT-1 (Google robot). Image 256x320.",
        ),
    ),
    RawLayout(
        name="kuka",
        tfds_name="kuka",
        **_eef7(
            primary_image="image",
            action=_rt1_style(),
            gripper_convention="relative_close_positive",
            control_hz=10.0,
            language_key=_OBS_LANG,
            proprio=_parts("observation/clip_function_input/base_pose_tool_reached", "observation/gripper_closed"),
            proprio_encoding="eef_pos_quat",
            proprio_dim=8,
            notes="QT-Opt grasping in RT-1 format; contains many failed episodes. Image 512x640. "
            "Proprio fields may be float32 or ZLIB-compressed float32 bytes (both handled).",
        ),
    ),
    RawLayout(
        name="bridge_dataset",
        tfds_name="bridge_dataset",
        **_eef7(
            primary_image="image_0",
            secondary_image="image_1",
            wrist_image="image_3",
            image_present_flags=(
                ("secondary", "episode_metadata/has_image_1"),
                ("wrist", "episode_metadata/has_image_3"),
            ),
            action=_flat7("binarize_gripper"),
            gripper_convention="absolute_open_continuous",
            control_hz=5.0,
            language_key=_STEP_LANG,
            proprio=_parts("observation/state"),
            proprio_encoding="eef_pos_euler",
            proprio_dim=7,
            notes="BridgeData V2 (Berkeley copy, image_0..3 at 256x256). image_0 is the fixed "
            "over-the-shoulder view, image_3 the wrist camera (only in part of the data; blank "
            "frames where episode_metadata/has_image_3 is False, dropped to ''). Actions are the "
            "commanded deltas as stored (Octo additionally relabels them from state differences "
            "and drops the first step; not done here).",
        ),
    ),
    RawLayout(
        name="taco_play",
        tfds_name="taco_play",
        **_eef7(
            primary_image="rgb_static",
            wrist_image="rgb_gripper",
            depth_keys=("depth_static", "depth_gripper"),
            action=_parts(("action/rel_actions_world", 0, 6), ("action/rel_actions_world", 6, 7, "clip01")),
            gripper_convention="signed_open_positive",
            control_hz=15.0,
            language_key=_OBS_LANG,
            proprio=_parts(("observation/robot_obs", 0, 6), ("observation/robot_obs", 6, 7)),
            proprio_encoding="eef_pos_euler",
            proprio_dim=7,
            notes="CALVIN-style robot_obs: tcp xyz (0:3), tcp euler (3:6), gripper width (6), "
            "joints (7:14), gripper action (14).",
        ),
    ),
    RawLayout(
        name="jaco_play",
        tfds_name="jaco_play",
        **_eef7(
            primary_image="image",
            wrist_image="image_wrist",
            action=_parts(
                "action/world_vector",
                const(0.0, 3),
                ("action/gripper_closedness_action", 0, 1, "rel_to_abs_gripper"),
            ),
            normalize_mask=(True, True, True, False, False, False, False),
            gripper_convention="relative_close_positive",
            control_hz=10.0,
            language_key=_OBS_LANG,
            proprio=_parts("observation/end_effector_cartesian_pos"),
            proprio_encoding="raw",
            proprio_dim=7,
            notes="No rotation action: dims 3:6 are zero padding.",
        ),
    ),
    RawLayout(
        name="berkeley_cable_routing",
        tfds_name="berkeley_cable_routing",
        **_eef7(
            primary_image="image",
            secondary_image="top_image",
            wrist_image="wrist45_image",
            action=_parts("action/world_vector", "action/rotation_delta", const(0.0)),
            gripper_convention="constant",
            control_hz=10.0,
            language_key=_OBS_LANG,
            proprio=_parts("observation/robot_state"),
            proprio_encoding="raw",
            proprio_dim=7,
            notes="No gripper action: padded with 0 (closed, the gripper holds the cable). "
            "A second wrist view, wrist225_image, is not used.",
        ),
    ),
    RawLayout(
        name="roboturk",
        tfds_name="roboturk",
        **_eef7(
            primary_image="front_rgb",
            action=_rt1_style("clip01_invert"),
            gripper_convention="signed_close_positive",
            control_hz=10.0,
            language_key=_OBS_LANG,
            notes="No proprioception.",
        ),
    ),
    RawLayout(
        name="nyu_door_opening_surprising_effectiveness",
        tfds_name="nyu_door_opening_surprising_effectiveness",
        **_eef7(
            primary_image=None,
            wrist_image="image",
            action=_rt1_style(),
            gripper_convention="relative_close_positive",
            control_hz=3.0,
            language_key=_OBS_LANG,
            notes="The only camera is on the grabber (wrist); primary is ''.",
        ),
    ),
    RawLayout(
        name="viola",
        tfds_name="viola",
        **_eef7(
            primary_image="agentview_rgb",
            wrist_image="eye_in_hand_rgb",
            action=_rt1_style("clip01_invert"),
            gripper_convention="signed_close_positive",
            control_hz=20.0,
            language_key=_OBS_LANG,
            proprio=_parts("observation/joint_states", "observation/gripper_states"),
            proprio_encoding="joint",
            proprio_dim=9,
        ),
    ),
    RawLayout(
        name="berkeley_autolab_ur5",
        tfds_name="berkeley_autolab_ur5",
        **_eef7(
            primary_image="image",
            wrist_image="hand_image",
            depth_keys=("image_with_depth",),
            action=_rt1_style(),
            gripper_convention="relative_close_positive",
            control_hz=5.0,
            language_key=_OBS_LANG,
            proprio=_parts(("observation/robot_state", 6, 14)),
            proprio_encoding="eef_pos_quat",
            proprio_dim=8,
            notes="robot_state: joints (0:6), eef xyz (6:9), quaternion (9:13), gripper closed "
            "(13), action blocked (14).",
        ),
    ),
    RawLayout(
        name="toto",
        tfds_name="toto",
        **_eef7(
            primary_image="image",
            action=_parts("action/world_vector", "action/rotation_delta", ("action/open_gripper", 0, 1, "clip01")),
            gripper_convention="absolute_open_one",
            control_hz=30.0,
            language_key=_OBS_LANG,
            proprio=_parts("observation/state"),
            proprio_encoding="joint",
            proprio_dim=7,
            notes="Pouring/scooping; the instruction is nearly constant (Octo blanks it).",
        ),
    ),
    RawLayout(
        name="language_table",
        tfds_name="language_table",
        **_eef7(
            primary_image="rgb",
            action=_parts(("action", 0, 2), const(0.0, 4), const(1.0, 1)),
            normalize_mask=(True, True, False, False, False, False, False),
            gripper_convention="constant",
            control_hz=10.0,
            language_key="observation/instruction",
            language_encoding="codepoints",
            proprio=_parts("observation/effector_translation"),
            proprio_encoding="xy",
            proprio_dim=2,
            notes="Planar pushing: the 2-d effector translation is padded with 4 zeros (z, "
            "rotation) and a constant gripper 1 (open). The instruction is int32 [512] unicode "
            "codepoints, zero-padded, decoded to UTF-8.",
        ),
    ),
    RawLayout(
        name="stanford_hydra_dataset_converted_externally_to_rlds",
        tfds_name="stanford_hydra_dataset_converted_externally_to_rlds",
        **_eef7(
            primary_image="image",
            wrist_image="wrist_image",
            action=_flat7("clip01_invert"),
            gripper_convention="absolute_close_one",
            control_hz=10.0,
            language_key=_STEP_LANG,
            proprio=_parts(("observation/state", 0, 3), ("observation/state", 7, 10), ("observation/state", 24, 25)),
            proprio_encoding="eef_pos_euler",
            proprio_dim=7,
            notes="state (27): eef xyz (0:3), quaternion (3:7), euler (7:10), ..., gripper (24).",
        ),
    ),
    RawLayout(
        name="austin_buds_dataset_converted_externally_to_rlds",
        tfds_name="austin_buds_dataset_converted_externally_to_rlds",
        **_eef7(
            primary_image="image",
            wrist_image="wrist_image",
            action=_flat7("clip01_invert"),
            gripper_convention="signed_close_positive",
            control_hz=20.0,
            language_key=_STEP_LANG,
            proprio=_parts(("observation/state", 0, 8)),
            proprio_encoding="joint",
            proprio_dim=8,
            notes="state (24): joints (0:7), gripper (7), eef 4x4 matrix (8:24).",
        ),
    ),
    RawLayout(
        name="nyu_franka_play_dataset_converted_externally_to_rlds",
        tfds_name="nyu_franka_play_dataset_converted_externally_to_rlds",
        **_eef7(
            primary_image="image",
            secondary_image="image_additional_view",
            depth_keys=("depth", "depth_additional_view"),
            action=_parts(("action", -8, -2), ("action", -2, -1, "clip01")),
            gripper_convention="signed_open_positive",
            control_hz=3.0,
            language_key=_STEP_LANG,
            proprio=_parts("observation/state"),
            proprio_encoding="raw",
            proprio_dim=13,
            notes="action (15): joint velocities (0:7), eef delta xyz+rpy (7:13), gripper (13), "
            "terminate (14); the eef delta and gripper are used. state (13): joints, eef xyz+rpy.",
        ),
    ),
    RawLayout(
        name="furniture_bench_dataset_converted_externally_to_rlds",
        tfds_name="furniture_bench_dataset_converted_externally_to_rlds",
        **_eef7(
            primary_image="image",
            wrist_image="wrist_image",
            action=_parts(("action", 0, 3), ("action", 3, 7, "quat_to_euler"), ("action", 7, 8, "clip01_invert")),
            gripper_convention="signed_close_positive",
            control_hz=10.0,
            language_key=_STEP_LANG,
            proprio=_parts(("observation/state", 0, 7), ("observation/state", -1, None)),
            proprio_encoding="eef_pos_quat",
            proprio_dim=8,
            notes="action (8): eef delta xyz, delta quaternion (x, y, z, w) -> roll/pitch/yaw, gripper.",
        ),
    ),
    RawLayout(
        name="ucsd_kitchen_dataset_converted_externally_to_rlds",
        tfds_name="ucsd_kitchen_dataset_converted_externally_to_rlds",
        **_eef7(
            primary_image="image",
            action=_parts(("action", 0, 7)),
            action_encoding=EEF_POS_ABS,
            gripper_convention="as_released",
            control_hz=2.0,
            language_key=_STEP_LANG,
            proprio=_parts(("observation/state", 0, 7)),
            proprio_encoding="joint",
            proprio_dim=7,
            notes="action (8): absolute eef target xyz, rpy, gripper, terminate (dropped). Gripper "
            "convention not verified; kept as stored.",
        ),
    ),
    RawLayout(
        name="austin_sailor_dataset_converted_externally_to_rlds",
        tfds_name="austin_sailor_dataset_converted_externally_to_rlds",
        **_eef7(
            primary_image="image",
            wrist_image="wrist_image",
            action=_flat7("clip01_invert"),
            gripper_convention="signed_close_positive",
            control_hz=20.0,
            language_key=_STEP_LANG,
            proprio=_parts("observation/state"),
            proprio_encoding="raw",
            proprio_dim=8,
        ),
    ),
    RawLayout(
        name="austin_sirius_dataset_converted_externally_to_rlds",
        tfds_name="austin_sirius_dataset_converted_externally_to_rlds",
        **_eef7(
            primary_image="image",
            wrist_image="wrist_image",
            action=_flat7("clip01_invert"),
            gripper_convention="signed_close_positive",
            control_hz=20.0,
            language_key=_STEP_LANG,
            proprio=_parts("observation/state"),
            proprio_encoding="raw",
            proprio_dim=8,
        ),
    ),
    RawLayout(
        name="bc_z",
        tfds_name="bc_z",
        **_eef7(
            primary_image="image",
            action=_parts(
                ("action/future/xyz_residual", 0, 3),
                ("action/future/axis_angle_residual", 0, 3),
                ("action/future/target_close", 0, 1, "clip01_invert"),
            ),
            gripper_convention="absolute_close_one",
            control_hz=10.0,
            language_key=_OBS_LANG,
            proprio=_parts("observation/present/xyz", "observation/present/axis_angle", "observation/present/sensed_close"),
            proprio_encoding="eef_pos_axis_angle",
            proprio_dim=7,
            notes="Actions are 10-step future residuals; the first step of each is used. The "
            "rotation is axis-angle (not roll/pitch/yaw).",
        ),
    ),
    RawLayout(
        name="dlr_edan_shared_control_converted_externally_to_rlds",
        tfds_name="dlr_edan_shared_control_converted_externally_to_rlds",
        **_eef7(
            primary_image="image",
            action=_flat7("clip01_invert"),
            gripper_convention="absolute_close_one",
            control_hz=5.0,
            language_key=_STEP_LANG,
            proprio=_parts("observation/state"),
            proprio_encoding="eef_pos_euler",
            proprio_dim=7,
        ),
    ),
    RawLayout(
        name="iamlab_cmu_pickup_insert_converted_externally_to_rlds",
        tfds_name="iamlab_cmu_pickup_insert_converted_externally_to_rlds",
        **_eef7(
            primary_image="image",
            wrist_image="wrist_image",
            action=_parts(("action", 0, 3), ("action", 3, 7, "quat_to_euler"), ("action", 7, 8)),
            action_encoding=EEF_POS_ABS,
            gripper_convention="as_released",
            control_hz=20.0,
            language_key=_STEP_LANG,
            proprio=_parts(("observation/state", 0, 8)),
            proprio_encoding="joint",
            proprio_dim=8,
            notes="action (8): absolute eef xyz, quaternion (x, y, z, w) -> roll/pitch/yaw, "
            "gripper (kept as stored).",
        ),
    ),
    RawLayout(
        name="utaustin_mutex",
        tfds_name="utaustin_mutex",
        **_eef7(
            primary_image="image",
            wrist_image="wrist_image",
            action=_flat7("clip01_invert"),
            gripper_convention="signed_close_positive",
            control_hz=20.0,
            language_key=_STEP_LANG,
            proprio=_parts(("observation/state", 0, 8)),
            proprio_encoding="joint",
            proprio_dim=8,
        ),
    ),
    RawLayout(
        name="berkeley_fanuc_manipulation",
        tfds_name="berkeley_fanuc_manipulation",
        **_eef7(
            primary_image="image",
            wrist_image="wrist_image",
            action=_parts(("action", 0, 6), ("observation/state", 6, 7, "clip01_invert")),
            gripper_convention="absolute_close_one",
            control_hz=10.0,
            language_key=_STEP_LANG,
            proprio=_parts(("observation/state", 0, 7)),
            proprio_encoding="joint",
            proprio_dim=7,
            notes="action (6) has no gripper: the gripper state (observation/state[6], 1 = "
            "closed) stands in for it, inverted.",
        ),
    ),
    RawLayout(
        name="cmu_stretch",
        tfds_name="cmu_stretch",
        **_eef7(
            primary_image="image",
            action=_parts(("action", 0, 7)),
            gripper_convention="as_released",
            control_hz=10.0,
            language_key=_STEP_LANG,
            proprio=_parts(("observation/state", 0, 3), ("observation/state", -1, None)),
            proprio_encoding="raw",
            proprio_dim=4,
            notes="action (8): eef delta xyz, rotation (unused), gripper, terminate (dropped).",
        ),
    ),
    # ---- further Open-X datasets ------------------------------------------------------
    RawLayout(
        name="bridge_orig",
        tfds_name="bridge_orig",
        **_eef7(
            primary_image="image_0",
            secondary_image="image_1",
            wrist_image="image_3",
            image_present_flags=(
                ("secondary", "episode_metadata/has_image_1"),
                ("wrist", "episode_metadata/has_image_3"),
            ),
            action=_flat7("binarize_gripper"),
            gripper_convention="absolute_open_continuous",
            control_hz=5.0,
            language_key=_STEP_LANG,
            proprio=_parts("observation/state"),
            proprio_encoding="eef_pos_euler",
            proprio_dim=7,
            notes="bridge_dataset under the name OpenVLA uses; same features.",
        ),
    ),
    RawLayout(
        name="bridge_oxe",
        tfds_name="bridge",
        **_eef7(
            primary_image="image",
            action=_parts("action/world_vector", "action/rotation_delta", ("action/open_gripper", 0, 1, "clip01")),
            gripper_convention="absolute_open_one",
            control_hz=5.0,
            language_key=_OBS_LANG,
            proprio=_parts("observation/state"),
            proprio_encoding="eef_pos_euler",
            proprio_dim=7,
            notes="The Open-X release of Bridge (TFDS name 'bridge'): one camera, RT-1-style action dict.",
        ),
    ),
    RawLayout(
        name="fmb_dataset",
        tfds_name="fmb_dataset",
        **_eef7(
            primary_image="image_side_1",
            secondary_image="image_side_2",
            wrist_image="image_wrist_1",
            action=_parts(("action", 0, 7)),
            gripper_convention="as_released",
            control_hz=10.0,
            language_key=_STEP_LANG,
            proprio=_parts("observation/eef_pose", "observation/state_gripper_pose"),
            proprio_encoding="eef_pos_quat",
            proprio_dim=8,
            notes="Berkeley Functional Manipulation Benchmark. A second wrist view (image_wrist_2) is not used.",
        ),
    ),
    RawLayout(
        name="dobbe",
        tfds_name="dobbe",
        **_eef7(
            primary_image=None,
            wrist_image="wrist_image",
            action=_parts(("action", 0, 7)),
            gripper_convention="as_released",
            control_hz=3.75,
            language_key=_STEP_LANG,
            proprio=_parts("observation/state"),
            proprio_encoding="raw",
            proprio_dim=7,
            notes="Dobb-E (HoNY): hand-held stick camera, mapped to wrist; primary is ''. "
            "control_hz is approximate.",
        ),
    ),
]

# Meta-World (v3, installed package): frame_skip 5 x MuJoCo timestep 0.0025 s = 12.5 ms per env step.
METAWORLD_CONTROL_HZ = 80.0
METAWORLD_GRIPPER_DIM = 3  # action = xyz delta (3) + gripper effort (1)

# Not an Open-X dataset: jaxvla.data.registry registers it as "metaworld" (aliases metaworld_mt10 /
# metaworld_mt50: every task set is the same builder and mapping).
METAWORLD_LAYOUT = RawLayout(
    name="metaworld",
    tfds_name="metaworld",
    primary_image="image",
    secondary_image=None,
    wrist_image=None,
    action=_parts(("action", 0, 4)),
    action_encoding=XYZ_GRIPPER,
    action_dim=4,
    gripper_dims=(METAWORLD_GRIPPER_DIM,),
    normalize_mask=(True, True, True, False),
    gripper_convention="effort_close_positive",
    control_hz=METAWORLD_CONTROL_HZ,
    language_key=_STEP_LANG,
    proprio=_parts("observation/state"),
    proprio_encoding="metaworld_state",
    proprio_dim=39,
    action_on_last_step=False,
    notes="Meta-World expert episodes rendered by jaxvla.data.metaworld_rlds (any task set). "
    "The last RLDS step holds only the final frame (zero action, has_action False). "
    "Proprio is the full 39-d state, which includes object and goal positions. 80 Hz: "
    "frame_skip 5 x timestep 0.0025 s.",
)

OXE_LAYOUTS: dict[str, RawLayout] = {layout.name: layout for layout in _LAYOUTS}
if len(OXE_LAYOUTS) != len(_LAYOUTS):
    raise RuntimeError("duplicate dataset names in the Open-X layouts")
if not all(math.isfinite(layout.control_hz) for layout in (*_LAYOUTS, METAWORLD_LAYOUT)):
    raise RuntimeError("non-finite control frequency in the Open-X layouts")
