"""Named, weighted mixtures of the datasets in ``jaxvla.data.registry``, and the one mixture parser.

A mixture is a tuple of ``(dataset name, weight)``. Weights are *relative sampling weights as
recorded* (not normalised); ``normalize_weights`` makes them sum to 1 and ``balance_weights``
first multiplies each by its dataset's size (Octo's ``balance_weights=True``).

``resolve_mixture`` turns every way of naming datasets into ``[(registry.DatasetSpec, weight)]``;
the pipeline (``config.data.mixture`` / ``config.data.dataset``), the latent-action labeller and
everyone else use it. It accepts

* a mixture name: ``"oxe_magic_soup"``;
* a dataset name or alias of the registry (``jaxvla.data.registry``: the Open-X datasets,
  ``metaworld``, ``video_folder`` and whatever ``register_dataset`` added): ``"bridge_dataset"`` /
  ``"fractal"`` -> weight 1;
* a comma-separated list ``"name1:w1,name2:w2"`` (``:w`` optional, default 1). Each name is a
  dataset (or alias); a mixture name there expands to its datasets with weights scaled by ``w``.
  A dataset may appear only once;
* a sequence of ``(name or DatasetSpec, weight)`` (a spec need not be registered).

Mixtures
--------
``oxe_magic_soup``: Octo's 25-dataset Open-X mixture, weights exactly as Octo records them
(fractal 0.54087122203 and kuka 0.8341046294 are the full-precision values behind "0.54" and
"0.83"). It contains ``nyu_door_opening_surprising_effectiveness`` (1.0) and neither ``fmb`` nor
``dobbe``.

``oxe_magic_soup_plus``: the variant with Octo's list minus nyu_door_opening plus
``fmb_dataset`` (1.0) and ``dobbe`` (0.2), 26 datasets (the OpenVLA-style "magic soup++" without
DROID).

``rtx``: the RT-X robot mixture (the 11 datasets of the Open-X paper's RT-X training set) with
the weights of Octo's ``RT_X_MIX`` as recalled here; check them before relying on the exact
numbers.

``bridge``, ``fractal``: one dataset each, weight 1. ``metaworld_mt10``, ``metaworld_mt50``: the
``metaworld`` dataset, weight 1 (the registry's aliases of the same name resolve to it too).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence, Union

from jaxvla.data.registry import (
    ALIASES,
    DatasetSpec,
    canonical_name,
    dataset_names,
    get_dataset_spec,
    unknown_name_message,
)

Mixture = tuple[tuple[str, float], ...]

OXE_MAGIC_SOUP: Mixture = (
    ("fractal20220817_data", 0.54087122203),
    ("kuka", 0.8341046294),
    ("bridge_dataset", 1.0),
    ("taco_play", 2.0),
    ("jaco_play", 1.0),
    ("berkeley_cable_routing", 1.0),
    ("roboturk", 2.0),
    ("nyu_door_opening_surprising_effectiveness", 1.0),
    ("viola", 2.0),
    ("berkeley_autolab_ur5", 2.0),
    ("toto", 1.0),
    ("language_table", 0.1),
    ("stanford_hydra_dataset_converted_externally_to_rlds", 2.0),
    ("austin_buds_dataset_converted_externally_to_rlds", 1.0),
    ("nyu_franka_play_dataset_converted_externally_to_rlds", 3.0),
    ("furniture_bench_dataset_converted_externally_to_rlds", 0.1),
    ("ucsd_kitchen_dataset_converted_externally_to_rlds", 2.0),
    ("austin_sailor_dataset_converted_externally_to_rlds", 1.0),
    ("austin_sirius_dataset_converted_externally_to_rlds", 1.0),
    ("bc_z", 0.2),
    ("dlr_edan_shared_control_converted_externally_to_rlds", 1.0),
    ("iamlab_cmu_pickup_insert_converted_externally_to_rlds", 1.0),
    ("utaustin_mutex", 1.0),
    ("berkeley_fanuc_manipulation", 2.0),
    ("cmu_stretch", 1.0),
)

OXE_MAGIC_SOUP_PLUS: Mixture = tuple(
    item for item in OXE_MAGIC_SOUP if item[0] != "nyu_door_opening_surprising_effectiveness"
) + (("fmb_dataset", 1.0), ("dobbe", 0.2))

RTX: Mixture = (
    ("fractal20220817_data", 0.54087122203),
    ("kuka", 0.8341046294),
    ("bridge_dataset", 1.0),
    ("taco_play", 2.0),
    ("jaco_play", 2.0),
    ("berkeley_cable_routing", 3.0),
    ("roboturk", 1.0),
    ("nyu_door_opening_surprising_effectiveness", 5.0),
    ("viola", 2.0),
    ("berkeley_autolab_ur5", 1.0),
    ("toto", 1.0),
)

MIXTURES: dict[str, Mixture] = {
    "oxe_magic_soup": OXE_MAGIC_SOUP,
    "oxe_magic_soup_plus": OXE_MAGIC_SOUP_PLUS,
    "rtx": RTX,
    "bridge": (("bridge_dataset", 1.0),),
    "fractal": (("fractal20220817_data", 1.0),),
    "metaworld_mt10": (("metaworld", 1.0),),
    "metaworld_mt50": (("metaworld", 1.0),),
}

for _name, _mixture in MIXTURES.items():
    for _dataset, _weight in _mixture:
        if canonical_name(_dataset) != _dataset:
            raise RuntimeError(f"mixture {_name!r} names {_dataset!r}, which is not a registered dataset")
        if not (_weight >= 0 and math.isfinite(_weight)):
            raise RuntimeError(f"mixture {_name!r}: bad weight {_weight} for {_dataset!r}")

MixtureLike = Union[str, Sequence[tuple[Union[str, DatasetSpec], float]]]


def mixture_names() -> list[str]:
    return sorted(MIXTURES)


def get_mixture(name: str) -> Mixture:
    """The recorded ``(dataset name, weight)`` tuple; KeyError lists the known mixtures."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in MIXTURES:
        raise KeyError(unknown_name_message("mixture", name, {"mixtures": mixture_names()}))
    return MIXTURES[key]


def _parse_weight(text: str, token: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise ValueError(f"mixture entry {token!r}: weight {text!r} is not a number") from None
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"mixture entry {token!r}: weight must be a finite number >= 0, got {weight}")
    return weight


def _unknown(name: str) -> KeyError:
    known = {"mixtures": mixture_names(), "datasets": dataset_names(), "aliases": sorted(ALIASES)}
    return KeyError(unknown_name_message("dataset or mixture", name, known))


def resolve_mixture(mixture: MixtureLike) -> list[tuple[DatasetSpec, float]]:
    """A mixture name, dataset name, ``"name1:w1,name2:w2"`` string or sequence of
    ``(name or DatasetSpec, weight)`` -> ``[(DatasetSpec, weight), ...]`` (weights as given).

    Raises KeyError for an unknown mixture or dataset (listing close and valid names) and
    ValueError for a malformed entry, a negative or non-numeric weight, a dataset named twice, an
    empty mixture or one whose weights are all zero.
    """
    entries: list[tuple[DatasetSpec, float]] = []
    if isinstance(mixture, str):
        text = mixture.strip()
        if not text:
            raise ValueError(f"empty mixture; use one of {mixture_names()} or 'name1:w1,name2:w2'")
        if "," not in text and ":" not in text:
            if text.lower() in MIXTURES:
                entries = [(get_dataset_spec(n), float(w)) for n, w in MIXTURES[text.lower()]]
            elif canonical_name(text) is not None:
                entries = [(get_dataset_spec(text), 1.0)]
            else:
                raise _unknown(text)
        else:
            for token in text.split(","):
                token = token.strip()
                if not token:
                    raise ValueError(f"mixture {mixture!r} has an empty entry")
                name, sep, weight_text = token.partition(":")
                name = name.strip()
                if not name:
                    raise ValueError(f"mixture entry {token!r} has no name")
                weight = _parse_weight(weight_text.strip(), token) if sep else 1.0
                if canonical_name(name) is not None:
                    entries.append((get_dataset_spec(name), weight))
                elif name.lower() in MIXTURES:
                    entries.extend((get_dataset_spec(n), w * weight) for n, w in MIXTURES[name.lower()])
                else:
                    raise _unknown(name)
    else:
        for item in mixture:
            try:
                name, weight = item
            except (TypeError, ValueError):
                raise ValueError(f"mixture entries must be (name, weight) pairs, got {item!r}") from None
            if isinstance(name, DatasetSpec):
                spec = name
            elif canonical_name(name) is not None:
                spec = get_dataset_spec(name)
            else:
                raise _unknown(name)
            entries.append((spec, _parse_weight(str(weight), f"{name}:{weight}")))
    if not entries:
        raise ValueError("empty mixture")
    seen: dict[str, int] = {}
    for spec, _ in entries:
        seen[spec.name] = seen.get(spec.name, 0) + 1
    duplicates = sorted(name for name, count in seen.items() if count > 1)
    if duplicates:
        raise ValueError(f"mixture {mixture!r} names these datasets more than once: {duplicates}")
    if sum(w for _, w in entries) <= 0:
        raise ValueError(f"mixture {mixture!r}: all weights are zero")
    return entries


def _entry_name(entry: Any) -> str:
    return entry.name if isinstance(entry, DatasetSpec) else str(entry)


def normalize_weights(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if not total > 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def balance_weights(
    mixture: MixtureLike, dataset_sizes: Mapping[str, float] | Sequence[float]
) -> list[tuple[Any, float]]:
    """Octo's balancing: ``w_i * n_i / sum_j (w_j * n_j)``, ``n_i`` = number of transitions
    (frames) of dataset ``i``, so the weights sum to 1 and a dataset's share of *samples* is
    proportional to weight x size (weight 1 everywhere samples every transition equally often).

    ``mixture`` is anything ``resolve_mixture`` takes; a sequence of ``(name or spec, w)`` comes
    back with the same first elements, a string comes back as ``(DatasetSpec, weight)`` pairs.
    ``dataset_sizes`` maps dataset names (registry names or aliases) to sizes, or lists them in
    mixture order. Raises ValueError for missing, negative or non-finite sizes.
    """
    if isinstance(mixture, str):
        entries: list[tuple[Any, float]] = resolve_mixture(mixture)
    else:
        entries = [(entry, float(weight)) for entry, weight in mixture]
        resolve_mixture(entries)  # validates names and weights
    if isinstance(dataset_sizes, Mapping):
        by_name: dict[str, float] = {}
        for key, value in dataset_sizes.items():
            by_name[canonical_name(key) or str(key)] = value
        sizes, missing = [], []
        for entry, _ in entries:
            name = _entry_name(entry)
            key = canonical_name(name) or name
            if key not in by_name:
                missing.append(name)
            else:
                sizes.append(by_name[key])
        if missing:
            raise ValueError(f"balance_weights: no size for {missing}; sizes given for {sorted(dataset_sizes)}")
    else:
        sizes = list(dataset_sizes)
        if len(sizes) != len(entries):
            raise ValueError(f"balance_weights: {len(sizes)} sizes for {len(entries)} datasets")
    for (entry, _), size in zip(entries, sizes):
        if not (math.isfinite(float(size)) and float(size) >= 0):
            raise ValueError(f"balance_weights: size of {_entry_name(entry)!r} must be finite and >= 0, got {size}")
    products = [float(w) * float(n) for (_, w), n in zip(entries, sizes)]
    if not sum(products) > 0:
        raise ValueError("balance_weights: every weight x size is zero")
    return [(entry, p) for (entry, _), p in zip(entries, normalize_weights(products))]
