"""Batched Meta-World evaluation: the episodes are those of the unbatched scheme (one policy call
per episode replan, the policy reseeded per episode), whatever the batch size, the slots an
episode lands in or the worker processes the environments live in."""

from __future__ import annotations

import numpy as np
import pytest

from jaxvla import evaluation

RECORD_KEYS = ("task", "episode", "seed", "success", "length", "instruction")


def _settings(checkpoint, max_steps, record_frames=False):
    return evaluation.EvalSettings(checkpoint=checkpoint, max_steps=max_steps, record_frames=record_frames)


def _records(rows):
    return [tuple(r[k] for k in RECORD_KEYS) for r in rows]


def test_bins_batched_episodes_equal_unbatched(finetuned):
    """The greedy bins policy: 3 episodes, 2 at once in 2 environment processes (the third reusing
    a freed slot and acting alone in padded calls), give exactly the unbatched episodes: actions,
    success, length; the GIF episodes' replayed frames equal the frames the unbatched run
    recorded while acting."""
    settings = _settings(finetuned["bins_small"][0], max_steps=4, record_frames=True)
    unbatched, timing = evaluation.rollouts(settings, ["reach"], 3, workers=1, progress=False, batch_envs=0)
    assert timing["calls"] is None
    batched, timing = evaluation.rollouts(settings, ["reach"], 3, workers=2, progress=False, batch_envs=2)
    assert _records(batched) == _records(unbatched)
    assert [r["episode"] for r in batched] == [0, 1, 2]
    for one, many in zip(unbatched, batched):
        np.testing.assert_array_equal(many["actions"], one["actions"])
        assert many["policy_calls"] == -(-many["length"] // 7)  # bins: 7 of each 14-action chunk a call
        assert "slot" not in many
    # GIFs: the first success and the first failure (by index), replayed
    gifs = [(r["success"], r["episode"]) for r in batched if "frames" in r]
    expected = [(s, next(r["episode"] for r in batched if r["success"] == s))
                for s in (False, True) if any(r["success"] == s for r in batched)]
    assert sorted(gifs) == expected
    for row in batched:
        if "frames" in row:
            np.testing.assert_array_equal(row["frames"], unbatched[row["episode"]]["frames"])

    # 2 slots: episodes 0 and 1 act together; episode 2 starts in the first slot to free and,
    # alone, acts in calls padded to 2 rows (4 steps each, all from one chunk: 1 call of 2 rows,
    # then 1 of 1)
    assert timing["batch_size"] == 2 and timing["first_call_seconds"] > 0
    rows = [n for _, n in timing["calls"]]
    assert rows[0] == 2 and rows[-1] == 1 and sum(rows) == sum(r["policy_calls"] for r in batched)
    latency = evaluation.summarize(batched, ["reach"], timing["calls"], timing["batch_size"])["latency"]
    steps = sum(r["length"] for r in batched)
    assert latency["calls"] == len(rows) and latency["rows_per_call"] == sum(rows) / len(rows)
    assert latency["actions_per_call"] == pytest.approx(steps / sum(rows)) and latency["batch_size"] == 2
    assert latency["actions_per_second"] == pytest.approx(steps / sum(s for s, _ in timing["calls"]))
    assert latency["control_hz"] == pytest.approx(1000.0 * latency["actions_per_call"] / latency["ms_per_call"])


def test_flow_episodes_do_not_depend_on_the_batch(finetuned):
    """The flow policy: each row samples from its own episode's stream, the one the unbatched
    scheme reseeds per episode, so two episodes acting alone (unbatched) or together (a batch of
    2) get the same actions up to float rounding, and the same success and lengths; the two
    episodes differ (their seeds). A batch size compiles once."""
    settings = _settings(finetuned["flow_small"][0], max_steps=9)
    unbatched, _ = evaluation.rollouts(settings, ["reach"], 2, workers=1, progress=False, batch_envs=0)
    policy = evaluation._load_policy(settings)
    compiled = policy.compiled_variants()
    pair, timing = evaluation.rollouts(settings, ["reach"], 2, workers=1, progress=False, batch_envs=2)
    assert policy.compiled_variants() <= compiled + 1
    assert _records(pair) == _records(unbatched)
    for alone, shared in zip(unbatched, pair):
        np.testing.assert_allclose(shared["actions"], alone["actions"], rtol=1e-4, atol=1e-4)
        assert shared["policy_calls"] == 2  # 9 steps, 7 executed per call
    assert not np.allclose(unbatched[0]["actions"], unbatched[1]["actions"], atol=1e-3)
    assert [n for _, n in timing["calls"]] == [2, 2]
