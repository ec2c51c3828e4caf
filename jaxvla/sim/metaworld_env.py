"""A small, deterministic wrapper around one Meta-World (v3) task, rendered with MuJoCo.

``MetaWorldEnv(task, seed)`` builds the task's environment with the goal position in the
state (the "goal observable" setting the scripted experts need), draws object/goal
positions from a generator seeded by ``seed`` (never the global NumPy state), and renders
an upright RGB frame with a fixed free camera (Meta-World's own corner cameras render
upside down). Rendering goes through ``mujoco.Renderer``; on a machine without a GPU set
``MUJOCO_GL=egl`` (the default this module installs) so Mesa renders off-screen.

Observations are ``{"image": uint8 [S, S, 3], "state": float32 [39]}``. The 39-d state is
Meta-World's observation: hand xyz (3), gripper opening (1), object poses padded to 14,
the same 18 values from the previous step, and the goal xyz (3).
Actions are 4-d in [-1, 1]: hand xyz delta (scaled by 1/100 m inside Meta-World) and
gripper effort (+1 closes). ``info["success"]`` is Meta-World's per-step success flag.

Task names are the MT50 names with or without the ``-v3`` suffix; canonical names in
this package have no suffix (``"button-press"``), matching ``language-world``.

Rendering in a process that also runs TensorFlow: TensorFlow exports its own LLVM, which
crashes Mesa's software rasterizer. ``MetaWorldEnv`` calls ``isolate_mesa_llvm()`` before
its first renderer to prevent that; code that makes its own ``mujoco.Renderer`` should
call it first too.

Cost on CPU (llvmpipe): about 20-25 ms per frame at 64-128 px, nearly independent of the
size (the robot meshes' ~67k triangles dominate); the physics step is under 1 ms.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import os
import sys
import sysconfig
import warnings
import weakref
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from metaworld.env_dict import ALL_V3_ENVIRONMENTS, ML45_V3, MT10_V3  # noqa: E402
from metaworld.policies import ENV_POLICY_MAP  # noqa: E402

from jaxvla.sim import instructions as _instructions  # noqa: E402

_SUFFIX = "-v3"

MT50_TASKS: tuple[str, ...] = tuple(name[: -len(_SUFFIX)] for name in ALL_V3_ENVIRONMENTS)
MT10_TASKS: tuple[str, ...] = tuple(name[: -len(_SUFFIX)] for name in MT10_V3)
# ML45's 45 training tasks (a superset of MT10) and its 5 held-out test tasks.
ML45_TRAIN_TASKS: tuple[str, ...] = tuple(name[: -len(_SUFFIX)] for name in ML45_V3["train"])
ML45_TEST_TASKS: tuple[str, ...] = tuple(name[: -len(_SUFFIX)] for name in ML45_V3["test"])
TASK_SETS = {"mt10": MT10_TASKS, "mt50": MT50_TASKS, "ml45": ML45_TRAIN_TASKS, "ml45-test": ML45_TEST_TASKS}

DEFAULT_MAX_EPISODE_STEPS = 500  # Meta-World's own horizon (SawyerXYZEnv.max_path_length).
STATE_DIM = 39
ACTION_DIM = 4


# --------------------------------------------------------------------------- task names


def _valid_names_message() -> str:
    return "Valid tasks (the '-v3' suffix is optional): " + ", ".join(sorted(MT50_TASKS))


def canonical_task(task: str) -> str:
    """``"reach-v3"`` / ``" Reach "`` -> ``"reach"``; unknown names raise ``ValueError``."""
    if not isinstance(task, str):
        raise TypeError(f"task must be a string, got {type(task).__name__}")
    name = task.strip().lower()
    if name.endswith(_SUFFIX):
        name = name[: -len(_SUFFIX)]
    if name not in MT50_TASKS:
        raise ValueError(f"Unknown Meta-World task {task!r}. {_valid_names_message()}")
    return name


def task_names(spec: str | Sequence[str]) -> list[str]:
    """Expand a task spec into canonical task names.

    ``spec`` is a set name of ``TASK_SETS`` (``"mt10"``, ``"mt50"``, ``"ml45"``: ML45's training
    tasks, ``"ml45-test"``: its test tasks; case-insensitive), a comma-separated list such as
    ``"reach,button-press-v3"``, or a sequence of names. Order is kept, duplicates dropped.
    """
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in TASK_SETS:
            return list(TASK_SETS[key])
        items = [part for part in key.split(",") if part.strip()]
    else:
        items = list(spec)
    if not items:
        raise ValueError(f"Empty task spec {spec!r}: use one of {sorted(TASK_SETS)} or a comma-separated list of "
                         "tasks.")
    unknown = []
    names: list[str] = []
    for item in items:
        try:
            name = canonical_task(item)
        except ValueError:
            unknown.append(item)
            continue
        if name not in names:
            names.append(name)
    if unknown:
        raise ValueError(f"Unknown Meta-World task(s) {unknown}. {_valid_names_message()}")
    return names


def episode_seed(seed: int, task: str, index: int) -> int:
    """Seed of episode ``index`` of ``task`` in a run with base ``seed``.

    Depends only on (seed, task name, index), so a task's episodes are the same whatever
    other tasks are in the run and however the episodes are scheduled over workers.
    """
    key = zlib.crc32(canonical_task(task).encode("utf-8"))
    state = np.random.SeedSequence([int(seed), key, int(index)]).generate_state(1, dtype=np.uint32)
    return int(state[0])


# --------------------------------------------------------------------------- rendering

_mesa_isolated: bool | None = None


def _mesa_driver_candidates() -> list[str]:
    dirs = [d for d in os.environ.get("LIBGL_DRIVERS_PATH", "").split(os.pathsep) if d]
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if multiarch:
        dirs.append(f"/usr/lib/{multiarch}/dri")
    dirs += ["/usr/lib64/dri", "/usr/lib/dri"]
    return [os.path.join(d, "swrast_dri.so") for d in dirs]


def isolate_mesa_llvm() -> bool:
    """Keep Mesa's software rasterizer on its own LLVM when TensorFlow shares the process.

    TensorFlow loads ``libtensorflow_framework.so`` with global symbol visibility, and it
    exports its bundled (different) LLVM. Mesa's llvmpipe, which renders EGL frames on
    machines without a GPU, then binds its LLVM calls to TensorFlow's copy and the process
    segfaults while compiling shaders (in whichever order the two were loaded). Loading
    Mesa's ``swrast_dri.so`` first with ``RTLD_DEEPBIND`` makes it, and the libLLVM it
    pulls in, resolve their symbols in their own dependencies first; frames are unchanged.

    Called automatically before ``MetaWorldEnv`` creates its first renderer. It must run
    before anything in the process initialises Mesa's EGL driver (for example a
    ``mujoco.Renderer`` made elsewhere). It does nothing unless ``MUJOCO_GL=egl`` on Linux,
    or when ``JAXVLA_NO_MESA_DEEPBIND=1``. Returns whether the driver was preloaded.
    """
    global _mesa_isolated
    if _mesa_isolated is not None:
        return _mesa_isolated
    _mesa_isolated = False
    if (
        not sys.platform.startswith("linux")
        or os.environ.get("MUJOCO_GL", "").lower() != "egl"
        or os.environ.get("JAXVLA_NO_MESA_DEEPBIND") == "1"
        or not hasattr(os, "RTLD_DEEPBIND")
    ):
        return False
    for path in _mesa_driver_candidates():
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_LOCAL | os.RTLD_DEEPBIND)
            except OSError:
                continue
            _mesa_isolated = True
            break
    return _mesa_isolated


_live_envs: weakref.WeakSet = weakref.WeakSet()
_exit_hook_registered = False


def _close_live_envs() -> None:
    for env in list(_live_envs):
        try:
            env.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


def _track_env(env: MetaWorldEnv) -> None:
    """Close environments still open at exit before MuJoCo terminates EGL.

    ``mujoco.egl`` registers ``eglTerminate`` with ``atexit`` when it creates its first
    context; a hook registered after that runs before it (``atexit`` is LIFO), so the
    renderers are freed while EGL is still up instead of failing noisily in ``__del__``.
    """
    global _exit_hook_registered
    _live_envs.add(env)
    if not _exit_hook_registered:
        atexit.register(_close_live_envs)
        _exit_hook_registered = True


# --------------------------------------------------------------------------- camera


@dataclasses.dataclass(frozen=True)
class CameraSpec:
    """A MuJoCo free camera: it looks at ``lookat`` from ``distance`` metres away.

    ``azimuth`` (degrees) is the heading of the viewing direction in the xy-plane, measured
    from +x; ``elevation`` (degrees) is negative when the camera looks down. The robot's
    base is at the origin and the table centre at about (0, 0.6, 0).
    """

    lookat: tuple[float, float, float] = (0.0, 0.6, 0.2)
    distance: float = 1.35
    azimuth: float = -125.0
    elevation: float = -25.0


CAMERAS: dict[str, CameraSpec] = {
    # Three-quarter view from the front-right: arm, table top and all task objects visible.
    "corner": CameraSpec(),
    # Mirror image of "corner", from the front-left.
    "corner_left": CameraSpec(azimuth=-55.0),
    # Straight on from the far side of the table, facing the robot.
    "front": CameraSpec(lookat=(0.0, 0.7, 0.15), distance=1.1, azimuth=-90.0, elevation=-30.0),
}


def camera_spec(camera: str | CameraSpec | Mapping[str, Any]) -> CameraSpec:
    """A preset name from ``CAMERAS``, a ``CameraSpec``, or a mapping of its fields."""
    if isinstance(camera, CameraSpec):
        return camera
    if isinstance(camera, str):
        if camera not in CAMERAS:
            raise ValueError(f"Unknown camera {camera!r}; presets: {sorted(CAMERAS)}")
        return CAMERAS[camera]
    if isinstance(camera, Mapping):
        fields = dict(camera)
        if "lookat" in fields:
            fields["lookat"] = tuple(float(v) for v in fields["lookat"])
        return CameraSpec(**fields)
    raise TypeError(f"camera must be a preset name, CameraSpec or mapping, got {type(camera).__name__}")


# --------------------------------------------------------------------------- environment


class MetaWorldEnv:
    """One Meta-World task with seeded goals and upright rendered frames.

    Args:
      task: MT50 task name, with or without ``-v3``.
      seed: seeds object/goal placement. The first ``reset()`` (and every
        ``reset(seed=seed)``) gives the same initial state and the same frame. Later
        ``reset()`` calls without a seed continue the generator, giving new placements.
      image_size: side ``S`` of the square RGB frames.
      max_episode_steps: the step at which ``step`` reports ``truncated``; default 500
        (Meta-World's horizon).
      camera: preset name in ``CAMERAS``, a ``CameraSpec`` or a mapping of its fields.
      terminate_on_success: report ``terminated=True`` on a successful step. Meta-World
        itself never terminates, so the default is False.
    """

    def __init__(
        self,
        task: str,
        seed: int,
        image_size: int = 64,
        max_episode_steps: int | None = None,
        camera: str | CameraSpec | Mapping[str, Any] = "corner",
        terminate_on_success: bool = False,
    ):
        self.task = canonical_task(task)
        self.seed = int(seed)
        self.image_size = int(image_size)
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.max_episode_steps = int(max_episode_steps or DEFAULT_MAX_EPISODE_STEPS)
        if self.max_episode_steps <= 0:
            raise ValueError(f"max_episode_steps must be positive, got {max_episode_steps}")
        self.camera = camera_spec(camera)
        self.terminate_on_success = bool(terminate_on_success)
        self.instruction = _instructions.instruction(self.task)

        self._env = None
        self._renderer = None
        env = ALL_V3_ENVIRONMENTS[self.task + _SUFFIX]()
        self._env = env
        # Goal observable: the last 3 state entries hold the goal (the experts read it).
        # The observation space is a cached property computed for the partially observable
        # case; drop it so it is recomputed with the goal bounds.
        env.__dict__.pop("sawyer_observation_space", None)
        env._partially_observable = False
        env._set_task_called = True
        # Draw a fresh placement from env.np_random at every reset (seeded below).
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        # Our own step counter truncates; keep Meta-World's from raising before it.
        env.max_path_length = max(self.max_episode_steps, DEFAULT_MAX_EPISODE_STEPS)

        model = env.model
        model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), self.image_size)
        model.vis.global_.offheight = max(int(model.vis.global_.offheight), self.image_size)
        isolate_mesa_llvm()
        self._renderer = mujoco.Renderer(model, self.image_size, self.image_size)
        _track_env(self)
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FREE
        self._camera.lookat[:] = self.camera.lookat
        self._camera.distance = self.camera.distance
        self._camera.azimuth = self.camera.azimuth
        self._camera.elevation = self.camera.elevation

        self._seeded = False
        self._needs_reset = True
        self._steps = 0
        self._state: np.ndarray | None = None

    # -- gym-like API -----------------------------------------------------------------

    @property
    def state_dim(self) -> int:
        return STATE_DIM

    @property
    def action_dim(self) -> int:
        return ACTION_DIM

    @property
    def unwrapped(self):
        """The underlying Meta-World ``SawyerXYZEnv``."""
        return self._env

    @property
    def elapsed_steps(self) -> int:
        return self._steps

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        """Start an episode; see the class docstring for how ``seed`` is used."""
        self._check_open()
        if seed is not None:
            self.seed = int(seed)
        if seed is not None or not self._seeded:
            self._env.seed(self.seed)
            self._seeded = True
        raw, _ = self._env.reset()
        self._steps = 0
        self._needs_reset = False
        self._state = np.asarray(raw, dtype=np.float32)
        return self._observation()

    def step(self, action, render: bool = True) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Apply ``action`` (4 floats, clipped to [-1, 1]).

        Returns ``(obs, reward, terminated, truncated, info)``; ``info["success"]`` is a bool.
        ``render=False`` leaves the frame out of ``obs`` (``"state"`` only): rendering is most of
        a step's cost, and a caller executing a chunk of actions needs the last frame alone
        (``render()`` gives it; rendering never changes the simulation).
        """
        self._check_open()
        if self._needs_reset:
            raise RuntimeError("Call reset() before step() (and again after an episode ends).")
        action = np.asarray(action, dtype=np.float32).reshape(-1)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"action must have {ACTION_DIM} entries, got shape {action.shape}")
        action = np.clip(action, -1.0, 1.0)
        raw, reward, _, _, info = self._env.step(action)
        self._steps += 1
        self._state = np.asarray(raw, dtype=np.float32)
        info = dict(info)
        info["success"] = bool(info.get("success", False))
        terminated = self.terminate_on_success and info["success"]
        truncated = self._steps >= self.max_episode_steps
        if terminated or truncated:
            self._needs_reset = True
        obs = self._observation() if render else {"state": self._state.copy()}
        return obs, float(reward), bool(terminated), bool(truncated), info

    def render(self) -> np.ndarray:
        """The current frame, uint8 ``[S, S, 3]``, from the fixed upright camera."""
        self._check_open()
        self._renderer.update_scene(self._env.data, camera=self._camera)
        return self._renderer.render()

    def close(self) -> None:
        renderer, env = self._renderer, self._env
        self._renderer = self._env = None
        if renderer is not None:
            renderer.close()
        if env is not None:
            env.close()

    def __enter__(self) -> MetaWorldEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # A renderer left to interpreter shutdown fails to free its EGL context noisily.
        try:
            self.close()
        except Exception:  # noqa: BLE001 - best effort during garbage collection
            pass

    def __repr__(self) -> str:
        return (
            f"MetaWorldEnv(task={self.task!r}, seed={self.seed}, image_size={self.image_size}, "
            f"max_episode_steps={self.max_episode_steps}, camera={self.camera})"
        )

    # -- internals --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._env is None:
            raise RuntimeError("MetaWorldEnv is closed")

    def _observation(self) -> dict[str, np.ndarray]:
        return {"image": self.render(), "state": self._state.copy()}


# --------------------------------------------------------------------------- experts


class ExpertPolicy:
    """Meta-World's scripted expert for one task: ``act(state) -> float32 [4] in [-1, 1]``.

    ``state`` is the 39-d (goal observable) state from ``MetaWorldEnv``. The experts are
    stateless, so one instance can serve many episodes.
    """

    def __init__(self, task: str):
        self.task = canonical_task(task)
        self._policy = ENV_POLICY_MAP[self.task + _SUFFIX]()

    def act(self, state) -> np.ndarray:
        state = np.asarray(state, dtype=np.float64).reshape(-1)
        if state.shape != (STATE_DIM,):
            raise ValueError(f"state must have {STATE_DIM} entries, got shape {state.shape}")
        with warnings.catch_warnings():
            # The experts use large proportional gains and warn that the env will clip.
            warnings.filterwarnings("ignore", message="Constant", category=UserWarning)
            action = self._policy.get_action(state)
        return np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)

    __call__ = act

    def __repr__(self) -> str:
        return f"ExpertPolicy({self.task!r}: {type(self._policy).__name__})"


def expert_policy(task: str) -> ExpertPolicy:
    """The scripted expert for ``task`` (names with or without ``-v3``)."""
    return ExpertPolicy(task)


# --------------------------------------------------------------------------- rollouts


def rollout_expert(
    env: MetaWorldEnv,
    seed: int,
    *,
    action_noise: float = 0.0,
    steps_after_success: int = 5,
    policy: ExpertPolicy | None = None,
) -> dict[str, Any]:
    """Roll out the scripted expert in ``env`` from ``env.reset(seed=seed)``.

    Actions are ``clip(expert(state) + N(0, action_noise^2), -1, 1)``, the noise drawn from
    a generator seeded by ``seed``. The episode stops ``steps_after_success`` environment
    steps after the first step whose ``info["success"]`` is true (so the solved scene
    stays in view for a few frames), or after ``env.max_episode_steps`` steps in total,
    whichever comes first.

    Returns a dict with ``T`` = number of environment steps taken:
      images uint8 [T+1, S, S, 3] and states float32 [T+1, 39]: observations before each
        action plus the final one; actions float32 [T, 4]; rewards float32 [T];
        successes bool [T] (``info["success"]`` after each action);
      task, seed, success (any step succeeded), first_success (index of the first
        successful action, -1 if none), terminated_on_success (the episode ended because
        the task was solved rather than by the step limit).
    """
    if policy is None:
        policy = expert_policy(env.task)
    if steps_after_success < 0:
        raise ValueError("steps_after_success must be >= 0")
    noise_rng = np.random.default_rng([int(seed), 0x5EED])
    obs = env.reset(seed=seed)
    images = [obs["image"]]
    states = [obs["state"]]
    actions, rewards, successes = [], [], []
    first_success = -1
    ended_by_success = False
    for t in range(env.max_episode_steps):
        action = policy.act(obs["state"])
        if action_noise > 0:
            action = action + noise_rng.normal(0.0, action_noise, size=ACTION_DIM)
        action = np.clip(action, -1.0, 1.0).astype(np.float32)
        obs, reward, _, truncated, info = env.step(action)
        images.append(obs["image"])
        states.append(obs["state"])
        actions.append(action)
        rewards.append(reward)
        successes.append(info["success"])
        if info["success"] and first_success < 0:
            first_success = t
        if first_success >= 0 and t - first_success >= steps_after_success:
            ended_by_success = True
            break
        if truncated:
            break
    num_steps = len(actions)
    return {
        "task": env.task,
        "seed": int(seed),
        "images": np.stack(images).astype(np.uint8),
        "states": np.stack(states).astype(np.float32),
        "actions": np.stack(actions).astype(np.float32).reshape(num_steps, ACTION_DIM),
        "rewards": np.asarray(rewards, dtype=np.float32),
        "successes": np.asarray(successes, dtype=bool),
        "success": bool(first_success >= 0),
        "first_success": int(first_success),
        "terminated_on_success": bool(ended_by_success),
    }


@dataclasses.dataclass(frozen=True)
class RolloutJob:
    """One expert episode for a worker process to roll out and save as ``path`` (.npz)."""

    task: str
    index: int
    seed: int
    path: str
    image_size: int = 64
    max_episode_steps: int = DEFAULT_MAX_EPISODE_STEPS
    action_noise: float = 0.0
    steps_after_success: int = 5
    camera: CameraSpec = CameraSpec()


_worker_env: MetaWorldEnv | None = None


def _worker_env_for(job: RolloutJob) -> MetaWorldEnv:
    """Reuse the worker's environment while consecutive jobs share task and settings."""
    global _worker_env
    env = _worker_env
    if env is not None and (env.task, env.image_size, env.max_episode_steps, env.camera) == (
        job.task,
        job.image_size,
        job.max_episode_steps,
        job.camera,
    ):
        return env
    close_worker_env()
    _worker_env = MetaWorldEnv(
        job.task,
        job.seed,
        image_size=job.image_size,
        max_episode_steps=job.max_episode_steps,
        camera=job.camera,
    )
    return _worker_env


def close_worker_env() -> None:
    global _worker_env
    if _worker_env is not None:
        _worker_env.close()
        _worker_env = None


def run_rollout_job(job: RolloutJob) -> dict[str, Any]:
    """Roll out ``job``, write its arrays to ``job.path`` and return a small summary.

    Runs in worker processes; the result does not depend on which worker runs it or on
    what it ran before (every episode starts from ``reset(seed=job.seed)``, which fully
    resets the simulator).
    """
    env = _worker_env_for(job)
    episode = rollout_expert(
        env, job.seed, action_noise=job.action_noise, steps_after_success=job.steps_after_success
    )
    tmp_path = job.path + ".partial.npz"
    np.savez_compressed(
        tmp_path,
        images=episode["images"],
        states=episode["states"],
        actions=episode["actions"],
        rewards=episode["rewards"],
        successes=episode["successes"],
    )
    os.replace(tmp_path, job.path)
    return {
        "task": job.task,
        "index": job.index,
        "seed": job.seed,
        "path": job.path,
        "num_steps": int(episode["actions"].shape[0]),
        "success": episode["success"],
        "first_success": episode["first_success"],
        "terminated_on_success": episode["terminated_on_success"],
    }


def init_rollout_worker() -> None:
    """Pool initializer: headless rendering, one rasterizer thread per worker (the pool
    provides the parallelism)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("LP_NUM_THREADS", "1")
