"""The one trajectory schema every data source is standardised to.

Open-X datasets, the Meta-World datasets and action-free human video all become trajectories of
this form before any trajectory or frame transform runs (Octo's convention, with keys for the
latent-label join and for action-free data). One tf.data element is one trajectory; every tensor
has the trajectory length ``T`` first:

    observation/
        image_<camera>     tf.string [T]       encoded image bytes (JPEG/PNG), "" where the
                                               dataset has no such camera; cameras are
                                               ``IMAGE_CAMERAS`` (primary = third-person)
        proprio            float32 [T, P]      proprioception (P may be 0)
        timestep           int32 [T]           0..T-1, the frame index within the trajectory
    action                 float32 [T, A]      robot action in the dataset's encoding; zeros where
                                               ``has_action`` is False
    has_action             bool [T]            False for action-free video (and dropped actions)
    task/
        language_instruction  tf.string [T]
    dataset_name           tf.string [T]
    traj_key               tf.string [T]       unique, stable id of the trajectory:
                                               "<dataset_name>/<split>/<episode index>"

After frame decoding, ``image_<camera>`` become uint8 [..., H, W, 3]. After trajectory transforms
(pairs, clips, chunks, windows) the leading dim is the number of samples and new keys appear
(documented by each transform).
"""

from __future__ import annotations

from typing import Any, Mapping

IMAGE_CAMERAS = ("primary", "secondary", "wrist")

REQUIRED_KEYS = (
    "observation/proprio",
    "observation/timestep",
    "action",
    "has_action",
    "task/language_instruction",
    "dataset_name",
    "traj_key",
)


class MissingFeatureError(KeyError):
    """A feature a standardize function needs is absent; the message names the dataset and keys.

    ``key`` (the missing feature) and ``available`` (the keys that exist) are set by
    ``missing_feature_error`` when known. The constructor is ``Exception``'s own: inside
    ``tf.data`` maps AutoGraph re-raises an error as its own type only when it can rebuild it that
    way; anything else becomes a StagingError that ``except KeyError`` would not catch.
    """

    __init__ = Exception.__init__
    key: str | None = None
    available: list[str] | None = None

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def missing_feature_error(message: str, key: str | None = None, available=None) -> MissingFeatureError:
    error = MissingFeatureError(message)
    error.key = key
    error.available = list(available) if available is not None else None
    return error


def flat_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            keys.extend(flat_keys(value, path))
        else:
            keys.append(path)
    return keys


def check_standardized(trajectory_spec: Mapping[str, Any], dataset_name: str) -> None:
    """Raises MissingFeatureError naming the dataset, the missing keys and the keys that exist."""
    keys = set(flat_keys(trajectory_spec))
    missing = [k for k in REQUIRED_KEYS if k not in keys]
    if not any(k.startswith("observation/image_") for k in keys):
        missing.append("observation/image_<camera>")
    if missing:
        raise missing_feature_error(
            f"dataset {dataset_name!r}: standardised trajectory lacks {missing}; it has {sorted(keys)}",
            key=missing[0],
            available=sorted(keys),
        )
