"""Policies from finetuning checkpoints: round trip, cached bin decoding, action chunking, Meta-World
evaluation and serving a real policy on loopback."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxvla.checkpoint import load_checkpoint
from jaxvla.serving.client import Client, ServerError
from jaxvla.serving.server import PolicyServer


def test_inference_imports_no_training_code():
    """jaxvla.policy (and the frozen encoders it reads) import nothing from jaxvla.stages or the
    trainer: inference runs without the training code."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, jaxvla.policy, jaxvla.frozen, jaxvla.latent_actions; "
            "print(sorted(m for m in sys.modules if m.startswith(('jaxvla.stages', 'jaxvla.trainer'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


@pytest.fixture(scope="module")
def policies(finetuned):
    from jaxvla.policy import Policy

    return {head: Policy.from_checkpoint(finetuned[f"{head}_small"][0]) for head in ("flow", "bins")}


def _frames(metaworld_dataset, n=2):
    """Real rendered frames [n, 64, 64, 3] and their instructions from the test dataset."""
    from jaxvla.sim.metaworld_env import MetaWorldEnv

    frames, instructions = [], []
    for seed in range(n):
        with MetaWorldEnv("reach", seed, image_size=64) as env:
            frames.append(env.reset()["image"])
            instructions.append(env.instruction)
    return np.stack(frames), instructions


def test_flow_policy_round_trip(policies, finetuned, metaworld_dataset):
    """act == the checkpoint's velocity field integrated by Euler steps (recomputed here without the
    KV cache or the library's sampler) and unnormalised with the saved statistics; one
    compilation; reseeding reproduces the chunk."""
    from jaxvla.losses.finetune import predict_velocity
    from jaxvla.frozen import FinetuneModels

    policy = policies["flow"]
    frames, instructions = _frames(metaworld_dataset)
    assert policy.metadata["head"] == "flow" and policy.metadata["chunk"] == 14 and policy.metadata["action_dim"] == 4
    assert policy.execute_steps == 7 and policy.observation_spec() == {"image": ((64, 64, 3), "uint8")}
    assert policy.action_normalization == "q01q99" and policy.flow_steps == 10

    compiled = policy.compiled_variants()  # other tests of the module may have compiled other variants
    policy.reseed(5)
    first = policy.act({"image": frames[0]}, instructions[0])
    second = policy.act({"image": frames[1]}, instructions[1])
    assert first.shape == (14, 4) and first.dtype == np.float32
    assert policy.compiled_variants() <= compiled + 1  # jitted once, reused
    policy.reseed(5)
    np.testing.assert_array_equal(policy.act({"image": frames[0]}, instructions[0]), first)
    assert not np.allclose(first, second)

    # Independent path: the restored params' velocity field v(u, s), run over the whole sequence
    # (no KV cache), integrated here by forward Euler in NumPy from s = 1 (noise) to s = 0, then
    # mapped to robot units by the q01 / q99 formula. The noise is the policy's documented stream:
    # reseed(5) = PRNGKey(5), split once per call.
    state, config_dict, assets, _ = load_checkpoint(finetuned["flow_small"][0])
    from jaxvla.config import from_dict

    models = FinetuneModels(from_dict(config_dict), policy.vocab, 4)
    seq = policy.sequences(frames[:1], instructions[:1])
    velocity = jax.jit(functools.partial(predict_velocity, **models.flow_modules))
    _, rng = jax.random.split(jax.random.PRNGKey(5))
    steps = policy.flow_steps
    u = np.asarray(jax.random.normal(rng, (1, 14, 4), np.float32), np.float64)  # u at s = 1
    for i in range(steps):
        s = 1.0 - i / steps
        v = np.asarray(velocity(state["params"], seq, u.astype(np.float32), np.full((1,), s, np.float32)))
        u = u - v / steps  # du/ds = v, stepping s down by 1 / steps
    normalised = u[0]
    entry = assets["datasets"]["metaworld"]
    stats, mask = entry["statistics"]["action"], np.asarray(entry["normalize_mask"], bool)
    lo, hi = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
    expected = np.where(mask, lo + (normalised + 1.0) / 2.0 * (hi - lo), normalised)  # [-1, 1] -> [q01, q99]
    np.testing.assert_allclose(first, expected, rtol=1e-4, atol=1e-4)
    # The gripper dim is not normalised: it comes out as the model's value.
    assert not mask[-1] and mask[:-1].all()
    np.testing.assert_allclose(first[:, -1], normalised[:, -1], rtol=1e-4, atol=1e-4)
    assert np.ptp(normalised) > 0.1  # a chunk that varies: the check above is not 0 == 0


def test_per_row_keys_make_rows_independent(policies, metaworld_dataset):
    """With per-row keys a flow row's chunk is the one its key gives: the same whichever row it
    sits in and whatever the other row holds, and the same (to float rounding) as the policy's
    own call with that key: ``seed_keys`` / ``split_keys`` give row i what a policy reseeded with
    ``seeds[i]`` draws at each call. The bins head is greedy: keys change nothing."""
    from jaxvla.policy import seed_keys, split_keys

    frames, instructions = _frames(metaworld_dataset)
    streams = seed_keys([7, 4_000_000_000])
    np.testing.assert_array_equal(streams[1], np.asarray(jax.random.PRNGKey(4_000_000_000)))
    streams, keys = split_keys(streams)
    policy = policies["flow"]
    both = policy.act_batch(frames, instructions, keys)
    policy.reseed(7)  # its stream's first key is keys[0]
    np.testing.assert_allclose(both[0], policy.act({"image": frames[0]}, instructions[0]), rtol=1e-4, atol=1e-4)
    swapped = policy.act_batch(frames[::-1].copy(), instructions[::-1], keys[::-1].copy())
    np.testing.assert_allclose(swapped[::-1], both, rtol=1e-5, atol=1e-5)
    _, later = split_keys(streams)  # the streams' second keys: other noise
    other = policy.act_batch(frames[::-1].copy(), instructions[::-1], np.stack([later[0], keys[0]]))
    np.testing.assert_allclose(other[1], both[0], rtol=1e-5, atol=1e-5)  # row 0's episode, now row 1
    assert not np.allclose(other[0], both[1], atol=1e-3)  # frame 1 with another key
    with pytest.raises(ValueError, match="keys must be uint32"):
        policy.act_batch(frames, instructions, keys[:1])
    with pytest.raises(ValueError, match=r"seeds must be in \[0, 2\*\*32\)"):
        seed_keys([-1])
    bins = policies["bins"]
    np.testing.assert_array_equal(bins.act_batch(frames, instructions, keys), bins.act_batch(frames, instructions))


def test_bins_policy_decodes_bin_centres(policies, finetuned, metaworld_dataset):
    from jaxvla.losses.finetune import predict_bins_cached, predict_bins_greedy
    from jaxvla.frozen import FinetuneModels
    from jaxvla.config import from_dict

    policy = policies["bins"]
    frames, instructions = _frames(metaworld_dataset)
    assert policy.chunk == 14 and policy.execute_steps == 7 and policy.metadata["chunk"] == 14
    actions = policy.act({"image": frames[0]}, instructions[0])
    assert actions.shape == (14, 4) and actions.dtype == np.float32
    _, config_dict, assets, _ = load_checkpoint(finetuned["bins_small"][0])
    centres = np.asarray(assets["bin_centres"])
    for d in range(4):  # every value of every step is one of its dim's bin centres
        assert np.abs(centres[d][None, :] - actions[:, d, None]).min(axis=1).max() < 1e-6

    # The KV-cached greedy decoder picks the same 14 x 4 bins as re-running the sequence per token.
    models = FinetuneModels(from_dict(config_dict), policy.vocab, 4)
    seq = policy.sequences(frames, instructions)
    assert seq["action_positions"].shape == (2, 14 * 4)
    cached = np.asarray(jax.jit(functools.partial(predict_bins_cached, backbone=models.backbone))(policy.params, seq))
    greedy = np.asarray(jax.jit(functools.partial(predict_bins_greedy, backbone=models.backbone))(policy.params, seq))
    assert cached.shape == (2, 14 * 4)
    np.testing.assert_array_equal(cached, greedy)
    batch = policy.act_batch(frames, instructions)
    assert batch.shape == (2, 14, 4)
    steps = cached.reshape(2, 14, 4)  # time-major: step k's 4 bins are tokens 4k .. 4k + 3
    np.testing.assert_array_equal(batch, centres[np.arange(4), steps])


def test_bins_chunker_replans_every_execute_steps(policies, metaworld_dataset):
    """The chunked bins policy executes 7 of its 14 actions before asking again: 10 steps are 2
    calls, the actions those of the two chunks in order."""
    from jaxvla.policy import ActionChunker

    policy = policies["bins"]
    frames, instructions = _frames(metaworld_dataset)
    chunker = ActionChunker(policy)
    assert chunker.execute == 7
    observations = [{"image": frames[i // 7 % 2]} for i in range(10)]  # the frame changes at the replan
    actions = np.stack([chunker.step(o, instructions[0]) for o in observations])
    assert chunker.replans == 2 and actions.shape == (10, 4)
    first = policy.act({"image": frames[0]}, instructions[0])
    second = policy.act({"image": frames[1]}, instructions[0])
    np.testing.assert_array_equal(actions[:7], first[:7])
    np.testing.assert_array_equal(actions[7:], second[:3])


def test_bins_policy_of_a_single_action_checkpoint(policies, finetuned, metaworld_dataset):
    """An older (LAPA-style) checkpoint, ``chunk`` = 1 and its 117-token sequences: the policy reads
    one action ``[1, A]``, executes it alone (the asset's execute_steps 7 is clipped to 1) and
    decodes the same bins as the greedy decoder on its 4-token layout."""
    from jaxvla.config import apply_overrides, from_dict
    from jaxvla.losses.finetune import predict_bins_greedy
    from jaxvla.policy import ActionChunker, Policy
    from jaxvla.frozen import FinetuneModels

    state, config_dict, assets, step = load_checkpoint(finetuned["bins_small"][0])
    config = apply_overrides(from_dict(config_dict), {"model.chunk": 1})
    old_assets = dict(assets, chunk=np.asarray(1), seq_len=np.asarray(117))  # what chunk=1 training saved
    policy = Policy(state["params"], config, old_assets, step=step)
    assert policy.chunk == 1 and policy.execute_steps == 1 and policy.prompt_budget == 36
    frames, instructions = _frames(metaworld_dataset, n=1)
    actions = policy.act_batch(frames, instructions)
    assert actions.shape == (1, 1, 4)
    seq = policy.sequences(frames, instructions)
    assert seq["tokens"].shape == (1, 117) and seq["action_positions"].shape == (1, 4)
    models = FinetuneModels(config, policy.vocab, 4)
    greedy = np.asarray(jax.jit(functools.partial(predict_bins_greedy, backbone=models.backbone))(policy.params, seq))
    centres = np.asarray(assets["bin_centres"])
    np.testing.assert_array_equal(actions[:, 0], centres[np.arange(4), greedy])
    chunker = ActionChunker(policy)
    for _ in range(3):
        chunker.step({"image": frames[0]}, instructions[0])
    assert chunker.replans == 3


def test_policy_rejects_bad_input(policies, tmp_path):
    from jaxvla.policy import Policy

    policy = policies["bins"]
    with pytest.raises(ValueError, match=r"'image' must be \[64, 64, 3\]"):
        policy.act({"image": np.zeros((32, 32, 3), np.uint8)}, "reach")
    with pytest.raises(ValueError, match="uint8"):
        policy.act({"image": np.zeros((64, 64, 3), np.float32)}, "reach")
    with pytest.raises(KeyError, match="needs 'image'"):
        policy.act({"rgb": np.zeros((64, 64, 3), np.uint8)}, "reach")
    with pytest.raises(TypeError, match="instruction 0 must be a string"):
        policy.act({"image": np.zeros((64, 64, 3), np.uint8)}, 3)
    with pytest.raises(FileNotFoundError):
        Policy.from_checkpoint(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match=r"execute_steps=15 must be in \[1, 14\]"):
        Policy.from_checkpoint(policy.checkpoint, execute_steps=15)


def test_policy_refuses_other_stages(tiny_tokenizer):
    from jaxvla.policy import Policy

    with pytest.raises(ValueError, match="needs a finetuning"):
        Policy.from_checkpoint(tiny_tokenizer)


class CountingPolicy:
    """A chunk whose action k of call c is (c, k, ...): shows which call produced each action."""

    chunk, execute_steps, action_dim = 6, 4, 2
    history_frames, history_stride = 0, 0  # no frame history

    def __init__(self):
        self.calls = 0

    def act(self, observation, instruction):
        self.calls += 1
        return np.stack([np.array([self.calls, k], np.float32) for k in range(self.chunk)])


def test_chunker_replans_every_execute_steps():
    from jaxvla.policy import ActionChunker

    policy = CountingPolicy()
    chunker = ActionChunker(policy, execute=4)
    actions = np.stack([chunker.step({}, "x") for _ in range(10)])
    assert policy.calls == 3 and chunker.replans == 3
    np.testing.assert_array_equal(actions[:, 0], [1, 1, 1, 1, 2, 2, 2, 2, 3, 3])
    np.testing.assert_array_equal(actions[:, 1], [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    chunker.reset()
    chunker.step({}, "x")
    assert policy.calls == 4 and chunker.replans == 1  # reset drops the rest of the chunk
    assert ActionChunker(policy).execute == 4  # the policy's default
    with pytest.raises(ValueError, match="execute=7 must be in"):
        ActionChunker(policy, execute=7)


def test_wilson_interval():
    from jaxvla.evaluation import wilson_interval

    np.testing.assert_allclose(wilson_interval(5, 10), (0.2366, 0.7634), atol=1e-4)
    np.testing.assert_allclose(wilson_interval(0, 10), (0.0, 0.2775), atol=1e-4)
    np.testing.assert_allclose(wilson_interval(10, 10), (0.7225, 1.0), atol=1e-4)
    # The interval always holds the rate itself, exactly: computed in floats, 10 / 10's upper bound
    # came out 1 - 1e-16, and the success plot's error bars (rate - lo, hi - rate) went negative,
    # which matplotlib refuses after every episode had run.
    for trials in range(1, 201):
        for successes in range(trials + 1):
            lo, hi = wilson_interval(successes, trials)
            assert 0.0 <= lo <= successes / trials <= hi <= 1.0, (successes, trials, lo, hi)


def test_success_plot_of_perfect_and_failed_tasks(tmp_path):
    """A task at 10 / 10 and one at 0 / 10 plot (their error bars are one-sided)."""
    from PIL import Image

    from jaxvla.evaluation import bar_plot, wilson_interval

    cis = [wilson_interval(10, 10), wilson_interval(0, 10), wilson_interval(4, 10)]
    path = bar_plot(str(tmp_path / "success.png"), ["a", "b", "c"], [1.0, 0.0, 0.4], cis, "t")
    assert Image.open(path).size[0] > 100


def test_evaluate_one_short_episode(finetuned, tmp_path):
    from jaxvla.evaluation import evaluate, format_table

    out = str(tmp_path / "eval")
    summary = evaluate(finetuned["flow_small"][0], "reach", 1, max_steps=9, workers=1, out_dir=out, progress=False)
    assert summary["settings"]["mode"] == "batched" and summary["settings"]["batch_envs"] == 1
    task = summary["tasks"]["reach"]
    assert task["episodes"] == 1 and task["successes"] in (0, 1)
    assert task["success_rate"] == task["successes"]
    lo, hi = task["ci95"]
    assert 0.0 <= lo <= task["success_rate"] <= hi <= 1.0
    (episode,) = summary["episodes"]
    assert 1 <= episode["length"] <= 9 and episode["instruction"]
    # up to 9 steps executing 7 per call: 2 calls (a 1-call episode: 1); the compiling call is
    # made once before them and kept out of the latency figures
    assert episode["policy_calls"] == -(-episode["length"] // 7)
    latency = summary["latency"]
    assert latency["calls"] == episode["policy_calls"] and latency["first_call_seconds"] > 0
    assert latency["ms_per_call"] > 0 and latency["control_hz"] > 0 and latency["rows_per_call"] == 1
    assert latency["actions_per_call"] == episode["length"] / episode["policy_calls"]
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["mean"]["episodes"] == 1 and saved["settings"]["max_steps"] == 9
    # per-episode records, for paired comparisons later
    assert saved["episodes"] == summary["episodes"]
    assert {"task", "episode", "seed", "success", "length"} <= set(saved["episodes"][0])
    assert os.path.getsize(os.path.join(out, "success.png")) > 1000
    (gif,) = summary["files"]["gifs"]
    from PIL import Image

    with Image.open(gif) as image:
        # every 2nd frame (GIF writers may merge identical consecutive frames), upscaled 2x
        assert 2 <= image.n_frames <= 1 + episode["length"] // 2 and image.size == (128, 128)
    assert "| reach |" in format_table(summary)


class ScriptedPolicy:
    """Stands in for a checkpoint's Policy in ``evaluation.run_episode``: Meta-World's scripted
    expert for the task (or, ``expert=False``, a policy that never moves), one action per call,
    logging every action it returns and every reseed."""

    chunk = execute_steps = 1
    history_frames = history_stride = 0  # no frame history
    image_size = 16  # frames are rendered but unused: the smallest size keeps the episode fast

    def __init__(self, task, expert):
        from jaxvla.sim.metaworld_env import ExpertPolicy

        self.expert = ExpertPolicy(task) if expert else None
        self.actions, self.reseeds = [], []

    def act(self, observation, instruction):
        action = self.expert.act(observation["state"]) if self.expert else np.zeros(4, np.float32)
        self.actions.append(np.array(action, np.float32))
        return action[None]

    def reseed(self, seed):
        self.reseeds.append(seed)


@pytest.mark.parametrize("expert", [True, False], ids=["scripted_expert", "do_nothing"])
def test_recorded_success_is_metaworlds_own(monkeypatch, expert):
    """An evaluated episode's success and length are what Meta-World itself reports: the actions
    the evaluation executed are replayed on a fresh environment from the episode's seed, stepping
    the raw Meta-World env, and its own ``info["success"]`` decides. The expert solves reach
    (success at its first successful step, episode cut there); doing nothing fails (full length)."""
    from jaxvla import evaluation
    from jaxvla.sim.metaworld_env import MetaWorldEnv, episode_seed

    task, max_steps = "reach", 60
    policy = ScriptedPolicy(task, expert)
    monkeypatch.setattr(evaluation, "_worker_state", {})  # no environment cached by other tests
    monkeypatch.setattr(evaluation, "_load_policy", lambda settings: policy)
    settings = evaluation.EvalSettings(checkpoint="scripted", max_steps=max_steps, record_frames=False)
    try:
        row = evaluation.run_episode(settings, task, 0)
    finally:
        evaluation._close_worker()

    seed = episode_seed(evaluation.EVAL_SEED_BASE + settings.seed, task, 0)
    assert row["seed"] == seed and policy.reseeds == [seed]
    assert row["length"] == len(policy.actions)  # one action per step, none left over
    np.testing.assert_array_equal(row["actions"], np.stack(policy.actions))

    # Meta-World's verdict on the same actions from the same placement.
    with MetaWorldEnv(task, seed, image_size=16) as env:
        env.reset(seed=seed)
        raw = env.unwrapped  # the SawyerXYZEnv: info straight from Meta-World
        flags = [float(raw.step(action)[4]["success"]) for action in policy.actions]
    successes = [i for i, flag in enumerate(flags) if flag > 0]
    if expert:
        assert successes, "the scripted expert must solve reach within the cap for this test to mean anything"
        assert row["success"] is True
        assert row["length"] == successes[0] + 1 < max_steps  # ends at Meta-World's first success
    else:
        assert not successes
        assert row["success"] is False and row["length"] == max_steps
    summary = evaluation.summarize([row], [task])
    assert summary["tasks"][task]["successes"] == int(expert)


def test_serve_real_policy_on_loopback(policies, metaworld_dataset):
    policy = policies["bins"]  # deterministic: the served actions equal a direct call's
    frames, instructions = _frames(metaworld_dataset, 1)
    expected = policy.act({"image": frames[0]}, instructions[0])
    # The checkpoint's text slots: a prompt of exactly prompt_budget ids is served, one more is
    # refused at parse time (never queued, never cached), naming the budget.
    from jaxvla.data.text import prompt_ids

    tokenizer = policy.prompts.tokenizer
    words = {prompt_ids(tokenizer, " ".join(["robot"] * k)).size: k for k in range(1, 300)}  # ids -> words
    fitting = " ".join(["robot"] * words[policy.prompt_budget])
    too_long = " ".join(["robot"] * words[policy.prompt_budget + 1])
    expected_fitting = policy.act({"image": frames[0]}, fitting)
    server = PolicyServer(policy, port=0).start()
    try:
        with Client(port=server.port) as client:
            assert client.metadata["head"] == "bins" and client.metadata["observation_spec"]["image"]["shape"] == [64, 64, 3]
            np.testing.assert_array_equal(client.act({"image": frames[0]}, instructions[0]), expected)
            with pytest.raises(ServerError, match="image"):  # 2 channels (other sizes are resized)
                client.act({"image": frames[0][..., :2]}, instructions[0])
            # A 128 px frame (each pixel 2 x 2) is shrunk by area averaging back to the 64 px frame.
            np.testing.assert_array_equal(
                client.act({"image": frames[0].repeat(2, axis=0).repeat(2, axis=1)}, instructions[0]), expected)
            assert client.health()["status"] == "ok"
            np.testing.assert_array_equal(client.act({"image": frames[0]}, instructions[0]), expected)
            np.testing.assert_array_equal(client.act({"image": frames[0]}, fitting), expected_fitting)
            with pytest.raises(RuntimeError, match=rf"'instruction' refused by the policy: .* is "
                               rf"{policy.prompt_budget + 1} prompt tokens .* at most {policy.prompt_budget} fit "
                               rf"\(the checkpoint's seq_len {policy.seq_len} minus"):
                client.act({"image": frames[0]}, too_long)
            assert fitting in policy.prompts.cached() and too_long not in policy.prompts.cached()
            assert client.health()["requests"] == 4
    finally:
        server.stop()


def test_moved_image_tokenizer_is_named_by_the_caller(policies, finetuned, tiny_tokenizer, metaworld_dataset, tmp_path,
                                                      monkeypatch):
    """A policy whose image tokenizer is no longer where finetuning recorded it (another machine):
    ``tokenizer_checkpoint=`` (``--tokenizer_checkpoint`` of the server and of scripts/evaluate.py)
    loads the copy, which acts exactly as the original; a path that does not exist is refused
    naming it, and the server's CLI hands its flag to the policy."""
    import shutil

    from jaxvla.policy import Policy
    from jaxvla.serving import cli

    moved = tmp_path / "elsewhere" / "tokenizer"
    shutil.copytree(tiny_tokenizer, moved)
    policy = Policy.from_checkpoint(finetuned["bins_small"][0], tokenizer_checkpoint=str(moved))
    assert policy.frames.checkpoint == str(moved)
    frames, instructions = _frames(metaworld_dataset)
    np.testing.assert_array_equal(policy.act({"image": frames[0]}, instructions[0]),
                                  policies["bins"].act({"image": frames[0]}, instructions[0]))
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Policy.from_checkpoint(finetuned["bins_small"][0], tokenizer_checkpoint=missing)

    seen = {}

    def record(path, **kwargs):
        seen.update(kwargs, path=path)
        raise KeyboardInterrupt  # stop before compiling and serving

    monkeypatch.setattr(Policy, "from_checkpoint", staticmethod(record))
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--checkpoint=/ckpt", f"--tokenizer_checkpoint={moved}", "--compilation_cache=off"])
    assert seen["path"] == "/ckpt" and seen["tokenizer_checkpoint"] == str(moved)


def test_copied_checkpoint_serves_without_the_original_tokenizer(policies, finetuned, tiny_tokenizer,
                                                                 metaworld_dataset, tmp_path):
    """Checkpoints that travel: finetuning bundles its image tokenizer into ``<workdir>/assets/tokenizer``
    and records it relative to the checkpoint, so a workdir copied elsewhere, with the original
    tokenizer gone, loads and serves exactly the original's actions; a bundle that was changed is
    refused (digests), and one that is missing is an error naming the paths tried and the flag."""
    import shutil

    from jaxvla.checkpoint import CorruptCheckpointError
    from jaxvla.policy import Policy

    frames, instructions = _frames(metaworld_dataset)
    key = np.asarray([7, 11], np.uint32)
    expected = {head: policies[head].act({"image": frames[0]}, instructions[0], key=key) for head in ("flow", "bins")}
    copies = {}
    for head in ("flow", "bins"):
        workdir = finetuned[f"{head}_small"][0]
        _, _, assets, _ = load_checkpoint(workdir)
        assert assets["tokenizer_relative"].startswith("../../assets/tokenizer/checkpoints/")
        copies[head] = str(tmp_path / "elsewhere" / head)
        shutil.copytree(workdir, copies[head])
    away = tiny_tokenizer + ".moved-away"
    os.rename(tiny_tokenizer, away)  # the original tokenizer is gone (restored for the other tests)
    try:
        for head in ("flow", "bins"):
            policy = Policy.from_checkpoint(copies[head])
            assert policy.frames.checkpoint.startswith(os.path.join(copies[head], "assets", "tokenizer"))
            np.testing.assert_array_equal(policy.act({"image": frames[0]}, instructions[0], key=key), expected[head])
        server = PolicyServer(policy, port=0).start()  # the bins copy, served
        try:
            with Client(port=server.port) as client:
                np.testing.assert_array_equal(client.act({"image": frames[0]}, instructions[0]), expected["bins"])
        finally:
            server.stop()
        # A step directory of the copy finds the bundle too.
        step_dir = os.path.join(copies["bins"], "checkpoints", str(policy.step))
        np.testing.assert_array_equal(
            Policy.from_checkpoint(step_dir).act({"image": frames[0]}, instructions[0]), expected["bins"])

        bundle = os.path.join(copies["bins"], "assets", "tokenizer")
        manifest = os.path.join(policy.frames.checkpoint, "jaxvla_digests.json")
        with open(manifest, "a") as f:
            f.write(" ")  # the bundle's manifest no longer matches the one the checkpoint recorded
        with pytest.raises(CorruptCheckpointError, match="bundled image tokenizer was replaced or changed"):
            Policy.from_checkpoint(copies["bins"])
        shutil.rmtree(bundle)
        with pytest.raises(FileNotFoundError, match=r"tried .*assets/tokenizer/checkpoints/.* \(bundled") as error:
            Policy.from_checkpoint(copies["bins"])
        assert tiny_tokenizer in str(error.value) and "--tokenizer_checkpoint" in str(error.value)
        # The override still wins over everything.
        policy = Policy.from_checkpoint(copies["bins"], tokenizer_checkpoint=away)
        np.testing.assert_array_equal(policy.act({"image": frames[0]}, instructions[0]), expected["bins"])
    finally:
        os.rename(away, tiny_tokenizer)


def test_tokenizer_bundle_on_resume(finetuned, tiny_tokenizer, tmp_path):
    """A resumed finetuning run keeps the bundle it made (same assets, nothing rewritten), rewrites
    a damaged one (setting the bad step aside), and refuses one made from another tokenizer."""
    import shutil

    from jaxvla.checkpoint import find_checkpoint
    from jaxvla.frozen import bundle_image_tokenizer

    workdir = str(tmp_path / "run")
    shutil.copytree(finetuned["bins_small"][0], workdir)
    _, _, assets, _ = load_checkpoint(workdir)
    checkpoints = os.path.join(workdir, "assets", "tokenizer", "checkpoints")
    before = {name: os.stat(os.path.join(checkpoints, name)).st_mtime_ns for name in os.listdir(checkpoints)}
    again = bundle_image_tokenizer(tiny_tokenizer, workdir)
    assert again == {k: assets[k] for k in again}
    assert {name: os.stat(os.path.join(checkpoints, name)).st_mtime_ns for name in os.listdir(checkpoints)} == before

    other = os.path.join(finetuned["flow_small"][0], "assets", "tokenizer")  # another tokenizer checkpoint
    with pytest.raises(ValueError, match="bundles the image tokenizer .* but this run reads"):
        bundle_image_tokenizer(other, workdir)

    (step,) = [name for name in before if name.isdigit()]
    with open(os.path.join(checkpoints, step, "config", "metadata"), "a") as f:
        f.write(" ")  # damaged: fails its digests
    rewritten = bundle_image_tokenizer(tiny_tokenizer, workdir)
    assert rewritten["tokenizer_relative"] == assets["tokenizer_relative"]
    find_checkpoint(os.path.join(checkpoints, step))  # verifies
    assert any(name.startswith(f"unverified-{step}-") for name in os.listdir(checkpoints))


def test_custom_text_tokenizer_travels_with_the_checkpoint(policies, finetuned, metaworld_dataset, tmp_path):
    """A custom SentencePiece file (config.model.text_tokenizer) is copied into
    <workdir>/assets/text_tokenizer and found relative to the checkpoint when the original is gone;
    a changed copy is refused by its SHA-256; text_tokenizer= overrides both; the default ("")
    bundles nothing."""
    import shutil

    from jaxvla.checkpoint import CorruptCheckpointError
    from jaxvla.data.text import default_tokenizer_path
    from jaxvla.frozen import bundle_text_tokenizer, resolve_text_tokenizer
    from jaxvla.policy import Policy

    workdir = str(tmp_path / "copy")
    shutil.copytree(finetuned["bins_small"][0], workdir)
    _, _, assets, step = load_checkpoint(workdir)
    assert assets["text_tokenizer"] == "" and "text_tokenizer_relative" not in assets
    assert bundle_text_tokenizer("", workdir) == {}

    custom = str(tmp_path / "mine.model")
    shutil.copyfile(default_tokenizer_path(), custom)
    bundled_assets = {**assets, "text_tokenizer": custom, **bundle_text_tokenizer(custom, workdir)}
    copy = os.path.join(workdir, "assets", "text_tokenizer", "mine.model")
    with open(copy, "rb") as a, open(custom, "rb") as b:
        assert a.read() == b.read()
    assert bundled_assets["text_tokenizer_relative"] == "../../assets/text_tokenizer/mine.model"
    os.remove(custom)  # the original is gone: the bundled copy is found from the step directory
    assert resolve_text_tokenizer(workdir, step, bundled_assets) == copy
    assert resolve_text_tokenizer(workdir, step, bundled_assets, default_tokenizer_path()) == default_tokenizer_path()
    with open(copy, "ab") as f:
        f.write(b"\0")
    with pytest.raises(CorruptCheckpointError, match="bundled text tokenizer .*mine.model"):
        resolve_text_tokenizer(workdir, step, bundled_assets)
    os.remove(copy)
    with pytest.raises(FileNotFoundError, match=r"mine.model \(bundled.*mine.model \(recorded"):
        resolve_text_tokenizer(workdir, step, bundled_assets)

    # The policy's override: the same SentencePiece model under another path acts identically.
    frames, instructions = _frames(metaworld_dataset)
    shutil.copyfile(default_tokenizer_path(), custom)
    policy = Policy.from_checkpoint(workdir, text_tokenizer=custom)
    np.testing.assert_array_equal(policy.act({"image": frames[0]}, instructions[0]),
                                  policies["bins"].act({"image": frames[0]}, instructions[0]))
