"""The two optional prefix inputs of finetuning and policies: frame history (o_{t-k} before o_t)
and the proprioceptive state written into the prompt. Training and acting must build the same
sequences: the same previous frame (k steps earlier, the first frame while t < k), the same
discretized state, the same prompt text."""

from __future__ import annotations

import numpy as np
import pytest

from jaxvla.serving.client import Client
from jaxvla.serving.server import PolicyServer

K = 7  # the protocol's history stride
STATE_PROMPT_TOKENS = 55  # 36 + the 4-dim state text's 19 ids at most


# --------------------------------------------------------------------------- state discretization


def test_state_discretization_vs_numpy():
    """Equal-width bins over q01..q99, clipped: against floor((x - q01) / (q99 - q01) * 256) in
    float64, bin centres map back to their own bins, and a value decodes to within half a bin of
    itself (clipped into [q01, q99])."""
    from jaxvla.data.stats import discretize_state, state_bin_centres, state_bin_edges

    rng = np.random.default_rng(0)
    q01 = rng.normal(size=39)
    q99 = q01 + rng.uniform(0.05, 2.0, size=39)
    stats = {"q01": q01.astype(np.float32), "q99": q99.astype(np.float32)}
    dims = [0, 1, 2, 3]
    edges = state_bin_edges(stats, dims)
    assert edges.shape == (4, 257) and edges.dtype == np.float32
    lo, hi = stats["q01"][dims].astype(np.float64), stats["q99"][dims].astype(np.float64)
    np.testing.assert_array_equal(edges[:, 0], stats["q01"][dims])
    np.testing.assert_allclose(edges[:, -1], hi, rtol=1e-6)

    span = hi - lo
    values = (lo - 0.2 * span + rng.uniform(size=(5000, 4)) * 1.4 * span).astype(np.float32)  # some outside
    bins = discretize_state(values, edges)
    assert bins.dtype == np.int32 and bins.shape == (5000, 4)
    fraction = (values.astype(np.float64) - lo) / span * 256
    expected = np.clip(np.floor(fraction), 0, 255).astype(np.int32)
    near_edge = np.abs(fraction - np.round(fraction)) < 1e-3  # float32 edges may round either way there
    assert near_edge.mean() < 0.01
    np.testing.assert_array_equal(bins[~near_edge], expected[~near_edge])
    assert (bins[values < lo] == 0).all() and (bins[values >= hi] == 255).all()
    assert 0 < (bins == 0).mean() and 0 < (bins == 255).mean()

    centres = state_bin_centres(edges)  # [4, 256]
    np.testing.assert_array_equal(discretize_state(centres.T, edges), np.tile(np.arange(256), (4, 1)).T)
    decoded = np.take_along_axis(centres.T, bins, axis=0)  # [N, 4]: each row's bins' centres
    width = span / 256
    assert (np.abs(decoded - np.clip(values, lo, hi)) <= width / 2 + 1e-5 * span).all()

    with pytest.raises(ValueError, match="non-finite"):
        discretize_state(np.array([np.nan, 0, 0, 0], np.float32), edges)
    with pytest.raises(ValueError, match="state has"):
        discretize_state(np.zeros(3, np.float32), edges)
    with pytest.raises(ValueError, match=r"dims \[39\] must be non-empty indices in \[0, 39\)"):
        state_bin_edges(stats, [39])


def test_state_prompt_text_and_ids():
    """The documented format: LAPA's question, then " State: <bins>." before " ASSISTANT:"; the
    ids are the tokenizer's own encoding of exactly that string; the budget error says so."""
    from jaxvla.data import text
    from jaxvla.frozen import TextPrompts

    expected = ("You are a helpful assistant. USER: What action should the robot take to open the drawer? "
                "State: 12 200 45 3. ASSISTANT:")
    bins = np.array([12, 200, 45, 3], np.int32)
    assert text.prompt_text("open the drawer.", state_bins=bins) == expected
    assert text.prompt_text(" open the drawer ") == ("You are a helpful assistant. USER: What action should the "
                                                    "robot take to open the drawer? ASSISTANT:")
    assert text.state_text([0, 255]) == "0 255"
    with pytest.raises(ValueError, match="integers"):
        text.state_text(np.array([0.5, 1.0]))
    try:
        prompts = TextPrompts()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    ids = prompts("open the drawer", state_bins=bins)
    np.testing.assert_array_equal(ids, text.encode_text(prompts.tokenizer, expected, add_bos=True))
    assert ids[0] == prompts.tokenizer.bos_token_id
    assert prompts.tokenizer.decode(ids.tolist(), skip_special_tokens=True) == expected
    assert prompts.cached() == []  # state prompts are never cached (states rarely repeat)
    # SentencePiece splits digits: three-digit bins give the longest state text (what the budget
    # checks assume): " State:" 2 ids, then "▁" + the digits per dim, "." 1 id: 19 for 4 dims
    lengths = {v: prompts("x", state_bins=np.full(4, v)).size - prompts("x").size for v in (0, 7, 10, 99, 100, 255)}
    assert lengths == {0: 11, 7: 11, 10: 15, 99: 15, 100: 19, 255: 19}
    # always held to the budget
    prompts.set_budget(int(ids.size) - 1, "config.model.prompt_tokens")
    with pytest.raises(ValueError, match=r"with the state's 4 bins is \d+ prompt tokens .* "
                                         r"\(config.model.prompt_tokens\)"):
        prompts("open the drawer", state_bins=bins)


def test_parse_state_dims():
    from jaxvla.stages.finetune import parse_state_dims

    for spec in ("4", "0:4", "0,1,2,3", " 3,1,0,2 ", 4):
        assert parse_state_dims(spec) == (0, 1, 2, 3), spec
    for spec in ("", None, "0", 0):
        assert parse_state_dims(spec) == (), spec
    assert parse_state_dims("36:39") == (36, 37, 38)
    for spec in ("2:2", "x", "-1", "1,1"):
        with pytest.raises(ValueError, match="config.model.state_dims"):
            parse_state_dims(spec)


# --------------------------------------------------------------------------- frame history buffers


class RecordingPolicy:
    """Records the observation of every call; a frame-history policy of chunk 14."""

    chunk, action_dim = 14, 4

    def __init__(self, execute_steps, history_frames=1, history_stride=K):
        self.execute_steps = execute_steps
        self.history_frames, self.history_stride = history_frames, history_stride
        self.calls = []

    def act(self, observation, instruction):
        self.calls.append(observation)
        return np.zeros((self.chunk, self.action_dim), np.float32)


def _episode_and_windows(data_dir):
    """The first eval episode's decoded frames [T, 64, 64, 3] (pipeline, history 1) and its chunk
    samples with history 2, stride K: {t: (o_{t-K} or o_0, o_t)} from the finetuning pipeline."""
    from jaxvla.data.pipeline import default_data_config, make_batches

    def batches(**overrides):
        cfg = default_data_config()
        cfg.update(dict(data_dir=str(data_dir), shuffle_buffer=0, **overrides))
        return iter(make_batches(cfg, batch_size=8, train=False, seed=0, process_index=0, process_count=1))

    frames, key = [], None
    for batch in batches(sample="frames"):
        for row in range(8):
            if key is None:
                key = batch["traj_key"][row]
            if batch["traj_key"][row] != key:
                break
            assert batch["observation"]["timestep"][row] == len(frames)
            frames.append(batch["observation"]["image_primary"][row])
        else:
            continue
        break
    windows = {}
    for batch in batches(sample="chunks", chunk_size=14, history=2, history_stride=K):
        rows = [r for r in range(8) if batch["traj_key"][r] == key]
        for row in rows:
            windows[int(batch["observation"]["timestep"][row, 1])] = batch["observation"]["image_primary"][row]
        if len(rows) < 8:
            break
    return np.stack(frames), windows


@pytest.fixture(scope="module")
def episode_windows(metaworld_dataset):
    return _episode_and_windows(metaworld_dataset["out"])


@pytest.mark.parametrize("execute", [7, 3, 1])
def test_chunker_history_feeds_the_training_frame(episode_windows, execute):
    """A replayed episode: at every replan t the ActionChunker hands the policy o_{t-7} (o_0 while
    t < 7), the very frame the finetuning pipeline pairs with o_t for that episode and step."""
    from jaxvla.policy import ActionChunker

    frames, windows = episode_windows
    assert len(frames) > 2 * K
    policy = RecordingPolicy(execute)
    chunker = ActionChunker(policy)
    for t, frame in enumerate(frames[:-1]):  # the last step has no action, hence no chunk sample
        chunker.step({"image": frame, "state": np.zeros(39, np.float32)}, "reach")
    replans = list(range(0, len(frames) - 1, execute))
    assert len(policy.calls) == len(replans)
    for t, observation in zip(replans, policy.calls):
        np.testing.assert_array_equal(observation["image"], frames[t])
        np.testing.assert_array_equal(observation["prev_image"], frames[max(t - K, 0)])
        np.testing.assert_array_equal(observation["prev_image"], windows[t][0])  # what training saw
        np.testing.assert_array_equal(observation["image"], windows[t][1])
    chunker.reset()  # a new episode forgets the old frames
    chunker.step({"image": frames[5]}, "reach")
    np.testing.assert_array_equal(policy.calls[-1]["prev_image"], frames[5])



def test_frame_history_keeps_what_replans_read():
    """o_{t-k} for every t against a list of all frames; with replanning every n steps only the
    frames of replanning steps and their o_{t-k} are needed, and those alone suffice."""
    from jaxvla.frame_history import FrameHistory

    frames = [np.full((2, 2, 3), t, np.uint8) for t in range(30)]
    history = FrameHistory(3)
    with pytest.raises(RuntimeError, match="frames up to step -1"):
        history.previous()
    for t in range(30):
        history.push(frames[t])
        assert history.previous()[0, 0, 0] == max(t - 3, 0)
        assert len(history._frames) <= 4  # o_{t-3} .. o_t, nothing older
    for k, n in ((7, 7), (7, 3), (2, 5)):
        sparse = FrameHistory(k, replan_every=n)
        needed = {t for t in range(30) if t % n == 0} | {max(t - k, 0) for t in range(0, 30, n)}
        assert {t for t in range(30) if sparse.needs(t)} >= needed
        if k == n:  # ViPRA's 7 of 14: no frame beyond the replanning ones
            assert {t for t in range(30) if sparse.needs(t)} == {t for t in range(30) if t % n == 0}
        for t in range(30):
            sparse.push(frames[t] if sparse.needs(t) else None, t)
            if t % n == 0:
                assert sparse.previous()[0, 0, 0] == max(t - k, 0)
        with pytest.raises(ValueError, match="must be given"):
            FrameHistory(k, replan_every=n).push(None, 0)
        given_all = FrameHistory(k, replan_every=n)  # ActionChunker hands it every frame
        for t in range(30):
            given_all.push(frames[t], t)
            assert set(given_all._frames) <= {s for s in range(t + 1) if given_all.needs(s)}
    with pytest.raises(ValueError, match="frames come in order"):
        history.push(frames[0], 3)


def test_env_slots_keep_the_history_frames():
    """Batched evaluation's environment slots return, with each replan's frame, the frame k steps
    earlier (the first while t < k) and the state, as an environment rendering every step shows
    them; k = 7 and replanning every 3 steps needs frames between the replans too."""
    from jaxvla.evaluation import EnvSlots, EvalSettings
    from jaxvla.sim.metaworld_env import MetaWorldEnv

    seed, execute = 11, 3
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(6, execute, 4)).astype(np.float32)
    with MetaWorldEnv("reach", seed, image_size=32) as env:  # the reference: every frame rendered
        obs = env.reset(seed=seed)
        frames, states = [obs["image"]], [obs["state"]]
        for action in actions.reshape(-1, 4):
            obs = env.step(action)[0]
            frames.append(obs["image"])
            states.append(obs["state"])
    slots = EnvSlots(EvalSettings(checkpoint="none", max_steps=100, record_frames=False), 32, history=(K, execute))
    try:
        out = slots.start(0, "reach", 0, seed)
        np.testing.assert_array_equal(out["prev_image"], frames[0])
        np.testing.assert_array_equal(out["state"], states[0])
        for call, chunk in enumerate(actions, 1):
            out = slots.step(0, chunk)
            t = call * execute
            assert not out["done"] and out["executed"] == execute
            np.testing.assert_array_equal(out["image"], frames[t])
            np.testing.assert_array_equal(out["prev_image"], frames[max(t - K, 0)])
            np.testing.assert_array_equal(out["state"], states[t])
            assert min(slots.episodes[0]["history"]._frames) >= t - K  # older frames are dropped
    finally:
        slots.close()


# --------------------------------------------------------------------------- finetuning == policy


def history_state_config(tokenizer, data_dir, stats_dir, variant="flow_small", **overrides):
    from tests.test_finetune import tiny_finetune_config

    return tiny_finetune_config(variant, tokenizer, data_dir, stats_dir, **{
        "model.history_frames": 1, "model.history_stride": K, "model.state_dims": "4",
        "model.prompt_tokens": STATE_PROMPT_TOKENS, "model.seq_len": 256, **overrides})


def _unbox(tree):
    import flax.linen as nn
    import jax

    return jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def test_finetune_batches_equal_policy_sequences(tiny_tokenizer, metaworld_dataset, finetune_stats_dir):
    """Flow finetuning with history (k = 7) and the 4-dim state: the stage's first batch holds, for
    each pipeline sample, o_{t-7}'s codes, eof, o_t's codes, and the prompt with o_t's proprio
    discretized by an independent numpy formula; a Policy made from the stage's assets builds the
    same sequences from (o_t, o_{t-7}, state). Missing inputs are errors naming them."""
    import jax

    from jaxvla.data import text
    from jaxvla.data.pipeline import make_batches
    from jaxvla.data.sequences import IMAGE, TEXT
    from jaxvla.data.stats import state_bin_edges
    from jaxvla.policy import SEQUENCE_INPUTS, Policy
    from jaxvla.frozen import FrameTokenizer, TextPrompts
    from jaxvla.stages import data_with_history
    from jaxvla.stages.finetune import build

    config = history_state_config(tiny_tokenizer, metaworld_dataset["out"], finetune_stats_dir)
    stage = build(config)
    assets = stage.assets
    assert int(assets["history_frames"]) == 1 and int(assets["history_stride"]) == K
    assert list(assets["state_dims"]) == [0, 1, 2, 3] and int(assets["state_size"]) == 39
    proprio_stats = assets["datasets"]["metaworld"]["statistics"]["observation/proprio"]
    edges = assets["datasets"]["metaworld"]["state_edges"]
    np.testing.assert_array_equal(edges, state_bin_edges(proprio_stats, [0, 1, 2, 3]))
    # the longest example: 55 prompt ids + <vision> 3 + 64 + eof + 64 + eov + </vision> 3 + 14 slots
    assert int(assets["seq_len"]) == 55 + 3 + 64 + 1 + 64 + 1 + 3 + 14

    batch = next(stage.batches(0))
    raw = next(iter(make_batches(data_with_history(config.data, 1, K), batch_size=4, train=True,
                                 seed=config.seed)))  # the same first pipeline batch
    images, timestep = raw["observation"]["image_primary"], raw["observation"]["timestep"]
    assert images.shape == (4, 2, 64, 64, 3)
    np.testing.assert_array_equal(timestep[:, 0], np.maximum(timestep[:, 1] - K, 0))
    states = raw["observation"]["proprio"][:, 1]  # o_t's 39-d state
    lo, hi = np.asarray(proprio_stats["q01"], np.float64)[:4], np.asarray(proprio_stats["q99"], np.float64)[:4]
    want_bins = np.clip(np.floor((states[:, :4] - lo) / (hi - lo) * 256), 0, 255).astype(int)

    codes = FrameTokenizer.from_checkpoint(tiny_tokenizer).tokens(images)  # [4, 2, 64]
    prompts = TextPrompts()
    for row in range(4):
        tokens, modality = batch["tokens"][row], batch["modality"][row]
        is_image = np.flatnonzero(modality == IMAGE)
        np.testing.assert_array_equal(tokens[is_image[:64]], codes[row, 0])  # o_{t-7}
        assert tokens[is_image[64]] == int(assets["vocab"]["eof_id"])
        np.testing.assert_array_equal(tokens[is_image[65:129]], codes[row, 1])  # o_t
        assert tokens[is_image[129]] == int(assets["vocab"]["eov_id"]) and is_image.size == 130
        prompt = text.prompt_text(raw["task"]["language_instruction"][row].decode(),
                                  state_bins=want_bins[row].astype(np.int32))
        n_prompt = is_image[0] - 3  # before "<vision>"
        assert prompts.tokenizer.decode(tokens[:n_prompt].tolist(), skip_special_tokens=True) == prompt
        assert (modality[:n_prompt] == TEXT).all()

    # The sequences do not depend on the weights: zeros of the right shapes, no initialisation run.
    shapes = _unbox(jax.eval_shape(stage.init_variables, jax.random.PRNGKey(0)))["params"]
    policy = Policy(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes), config, assets)
    assert policy.prompt_budget == STATE_PROMPT_TOKENS
    assert policy.observation_spec() == {"image": ((64, 64, 3), "uint8"), "prev_image": ((64, 64, 3), "uint8"),
                                         "state": ((39,), "float32")}
    instructions = [s.decode() for s in raw["task"]["language_instruction"]]
    np.testing.assert_array_equal(policy.state_bins(states), want_bins)
    ours = policy.sequences(images[:, 1], instructions, prev_images=images[:, 0], states=states)
    for key in SEQUENCE_INPUTS:
        np.testing.assert_array_equal(ours[key], batch[key], err_msg=key)

    frame, prev, state = images[0, 1], images[0, 0], states[0]  # (acting itself: the rollout and serving tests)
    with pytest.raises(KeyError, match=r"observation needs 'image' .*'prev_image' .*'state' .*missing \['state'\]"):
        policy.act({"image": frame, "prev_image": prev}, instructions[0])
    with pytest.raises(ValueError, match="pass observation 'state'"):
        policy.act_batch(images[:1, 1], instructions[:1], prev_images=images[:1, 0])
    with pytest.raises(ValueError, match="reads frame history .*'prev_image'"):
        policy.act_batch(images[:1, 1], instructions[:1], states=states[:1])
    with pytest.raises(ValueError, match=r"'state' must be float \[39\]"):
        policy.act({"image": frame, "prev_image": prev, "state": state[:4]}, instructions[0])


def test_state_budget_and_proprio_checks(tiny_tokenizer, metaworld_dataset, finetune_stats_dir):
    """A prompt budget the state text alone fills, normalised proprio or a history key that
    disagrees are errors naming the keys."""
    from jaxvla.stages.finetune import build, check_config

    data = (tiny_tokenizer, metaworld_dataset["out"], finetune_stats_dir)
    with pytest.raises(ValueError, match="config.data.proprio_normalization='none'"):
        check_config(history_state_config(*data, **{"data.proprio_normalization": "q01q99"}))
    with pytest.raises(ValueError, match=r"config.data.history=3 disagrees with config.model.history_frames=1"):
        check_config(history_state_config(*data, **{"data.history": 3}))
    with pytest.raises(ValueError, match="config.model.history_frames=2"):
        check_config(history_state_config(*data, **{"model.history_frames": 2}))
    with pytest.raises(ValueError, match=r"config.model.prompt_tokens=20 leaves no room"):
        build(history_state_config(*data, **{"model.prompt_tokens": 20}))


@pytest.fixture(scope="module")
def history_state_policy(tiny_tokenizer, metaworld_dataset, finetune_stats_dir, tmp_path_factory):
    """A 1-step flow checkpoint with frame history (k = 7) and the 4-dim state."""
    import jax

    from jaxvla.trainer import train

    workdir = str(tmp_path_factory.mktemp("ft_history_state"))
    config = history_state_config(tiny_tokenizer, metaworld_dataset["out"], finetune_stats_dir, num_steps=1)
    train(config, workdir, devices=jax.devices()[:1])
    return workdir


def test_history_state_rollouts_batched_equal_unbatched(history_state_policy):
    """Meta-World rollouts of the history + state policy replanning every 3 steps (so o_{t-7}
    falls between replans): the batched scheme (kept frames per slot) gives the unbatched
    scheme's episodes (ActionChunker's history buffer), to float rounding."""
    from jaxvla import evaluation

    settings = evaluation.EvalSettings(checkpoint=history_state_policy, max_steps=10, execute=3,
                                       record_frames=False)
    unbatched, _ = evaluation.rollouts(settings, ["reach"], 2, workers=1, progress=False, batch_envs=0)
    batched, timing = evaluation.rollouts(settings, ["reach"], 2, workers=1, progress=False, batch_envs=2)
    keys = ("task", "episode", "seed", "success", "length")
    assert [tuple(r[k] for k in keys) for r in batched] == [tuple(r[k] for k in keys) for r in unbatched]
    for alone, shared in zip(unbatched, batched):
        np.testing.assert_allclose(shared["actions"], alone["actions"], rtol=1e-4, atol=1e-4)
        assert shared["policy_calls"] == -(-shared["length"] // 3)
    assert not np.allclose(batched[0]["actions"], batched[1]["actions"], atol=1e-3)
    evaluation.release()


def test_serve_history_state_policy(history_state_policy, metaworld_dataset):
    """The server's observation spec asks for the policy's inputs; a request without the state is
    refused naming it, a full one gets the direct call's actions."""
    from jaxvla.policy import Policy
    from jaxvla.sim.metaworld_env import MetaWorldEnv

    policy = Policy.from_checkpoint(history_state_policy)
    with MetaWorldEnv("reach", 0, image_size=64) as env:
        first = env.reset()
        later = env.step(np.zeros(4, np.float32))[0]
        instruction = env.instruction
    observation = {"image": later["image"], "prev_image": first["image"], "state": later["state"]}
    policy.reseed(3)
    expected = policy.act(observation, instruction)
    server = PolicyServer(policy, port=0).start()
    try:
        with Client(port=server.port) as client:
            spec = client.metadata["observation_spec"]
            assert spec["prev_image"] == {"shape": [64, 64, 3], "dtype": "uint8"}
            assert spec["state"] == {"shape": [39], "dtype": "float32"}
            assert client.metadata["history_stride"] == K and client.metadata["state_dims"] == [0, 1, 2, 3]
            with pytest.raises(RuntimeError, match="missing required key 'state'"):
                client.act({"image": later["image"], "prev_image": first["image"]}, instruction)
            policy.reseed(3)
            np.testing.assert_allclose(client.act(observation, instruction), expected, rtol=1e-5, atol=1e-5)
    finally:
        server.stop()
