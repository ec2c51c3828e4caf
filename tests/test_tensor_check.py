"""The weight converters' one lookup-and-check (``jaxvla.io.tensor_check``): presence, exact shape
and a floating dtype, each problem named with the key and the expected shape; and the converters
(HF LLaMA, LWM LLaMA, LWM VQGAN) all report through it."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from jaxvla.io.hf_llama import hf_to_params
from jaxvla.io.lwm import _rename, _Tensor, lwm_llama_to_params
from jaxvla.io.tensor_check import checked_tensor, is_floating, raise_problems
from jaxvla.models.llama import llama_config


def test_checked_tensor():
    tensors = {
        "a": np.ones((2, 3), np.float16),
        "b": np.ones((2, 3), ml_dtypes.bfloat16),
        "c": np.ones((3, 2), np.float32),
        "d": np.ones((2, 3), np.int32),
    }
    problems: list[str] = []
    a = checked_tensor(tensors, "a", (2, 3), problems)
    b = checked_tensor(tensors, "b", [2, 3], problems)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (2, 3) and not problems
    assert checked_tensor(tensors, "c", (2, 3), problems) is None
    assert checked_tensor(tensors, "d", (2, 3), problems, kind="LWM tensor") is None
    assert checked_tensor(tensors, "e", (4,), problems, kind="parameter") is None
    assert problems == [
        "tensor 'c': expected shape (2, 3), found (3, 2)",
        "LWM tensor 'd' (shape (2, 3)): expected floating point, found int32",
        "missing parameter 'e' (expected shape (4,))",
    ]
    assert is_floating(np.float64) and is_floating(ml_dtypes.float8_e4m3fn) and not is_floating(np.int8)


def test_raise_problems():
    raise_problems([], "never raised", "context")
    with pytest.raises(ValueError) as info:
        raise_problems([f"p{i}" for i in range(23)], "tree does not match", "config: x=1")
    assert str(info.value) == (
        "tree does not match (23 problem(s)):\n  " + "\n  ".join(f"p{i}" for i in range(20))
        + "\n  ... and 3 more\n(config: x=1)"
    )


def test_converters_share_the_check():
    config = llama_config("tiny", latent_vocab=0, action_vocab=0)
    with pytest.raises(ValueError, match=r"missing tensor 'model\.embed_tokens\.weight' \(expected shape \(128, 64\)\)"):
        hf_to_params({}, config)
    with pytest.raises(ValueError, match=r"missing LWM tensor 'transformer/wte/embedding' \(expected shape \(128, 64\)\)"):
        lwm_llama_to_params({}, config)
    # An integer tensor of the right shape is refused by every converter (LWM LLaMA accepted it before).
    with pytest.raises(ValueError, match=r"LWM tensor 'transformer/wte/embedding' \(shape \(128, 64\)\): expected floating point"):
        lwm_llama_to_params({"transformer": {"wte": {"embedding": np.zeros((128, 64), np.int32)}}}, config)
    with pytest.raises(ValueError, match=r"tensor 'model\.embed_tokens\.weight' \(shape \(128, 64\)\): expected floating point"):
        hf_to_params({"model.embed_tokens.weight": np.zeros((128, 64), np.int32)}, config)
    table = [_Tensor("x/kernel", "y/kernel", (2, 2))]
    with pytest.raises(ValueError, match=r"LWM tensor 'x/kernel' \(shape \(2, 2\)\): expected floating point, found int64"):
        _rename({"x": {"kernel": np.zeros((2, 2), np.int64)}}, table, "LWM", to_ours=True, layout="test layout")
    assert _rename({"x": {"kernel": np.eye(2)}}, table, "LWM", to_ours=True, layout="test layout")["y"]["kernel"].dtype == np.float32
