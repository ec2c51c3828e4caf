"""``config.data`` defaults are written once (``default_data_config``) and applied once
(``make_batches`` -> ``with_defaults``); unknown keys are refused, naming them."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jaxvla.config import load_config
from jaxvla.data.pipeline import STAGE_DATA_KEYS, default_data_config, make_batches, with_defaults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_partial_configs_get_every_default():
    full = with_defaults(default_data_config())
    assert set(full) == set(default_data_config().keys())
    partial = with_defaults({"sample": "pairs", "augmentation": {"hue": 0.0}})
    assert partial["sample"] == "pairs" and partial["image_size"] == default_data_config().image_size
    assert partial["augmentation"] == {**default_data_config().augmentation.to_dict(), "hue": 0.0}
    assert with_defaults(None) == full


@pytest.mark.parametrize("config", ["laq.py:lapa_small", "laq.py:vipra_small", "pretrain.py:vipra_small",
                                    "pretrain.py:lapa_small", "finetune.py:flow_small", "finetune.py:bins_small"])
def test_stage_configs_pass_the_key_check(config):
    data = load_config(os.path.join(REPO, "configs", config)).data
    resolved = with_defaults(data)
    assert not set(STAGE_DATA_KEYS) & set(resolved)
    assert resolved["sample"] == data.sample and resolved["chunk_size"] == data.chunk_size


def test_unknown_key_is_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['gap_secs'\]"):
        make_batches({"gap_secs": 1.0}, batch_size=2, process_index=0, process_count=1)
    data = default_data_config()
    data.unlock()
    data.chunksize = 3
    with pytest.raises(ValueError, match="chunksize"):
        make_batches(data, batch_size=2, process_index=0, process_count=1)


def test_partial_dict_gives_the_same_batches_as_the_full_config(metaworld_dataset):
    full = default_data_config()
    full.data_dir = str(metaworld_dataset["out"])
    full.shuffle_buffer = 16
    partial = {"data_dir": str(metaworld_dataset["out"]), "shuffle_buffer": 16, "metaworld_tasks": "ignored"}
    a = next(iter(make_batches(full, batch_size=4, seed=3, process_index=0, process_count=1)))
    b = next(iter(make_batches(partial, batch_size=4, seed=3, process_index=0, process_count=1)))
    np.testing.assert_array_equal(a["observation"]["image_primary"], b["observation"]["image_primary"])
    np.testing.assert_array_equal(a["traj_key"], b["traj_key"])
