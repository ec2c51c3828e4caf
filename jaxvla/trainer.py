"""The trainer every stage shares.

``train(config, workdir)``:

1. joins a multi-process run if the environment describes one; checks mesh and batch;
2. builds the mesh and the stage; derives every shard of the train state from
   ``jax.eval_shape`` of the initialiser and creates the state already sharded
   (``jit(init, out_shardings=...)``): nothing is materialised whole on one device;
3. restores the newest checkpoint of the workdir that verifies against its digests when there is
   one (and says so, and which newer steps it skipped and moved aside), else initialises and
   applies ``config.init_from`` surgery;
4. runs the jitted, state-donating train step with a progress bar, TensorBoard scalars, images,
   periodic eval and checkpoints; stops cleanly on SIGTERM (saves, returns) and loudly on a
   non-finite loss, gradient norm or parameters (names the step; a checkpoint whose parameters
   give a non-finite loss is moved aside, the last good checkpoint stays).

``train_prerequisites(config)`` makes what the stage declares it reads and is missing (the
embedded Meta-World dataset, earlier stages' checkpoints, each after its own prerequisites):
``python -m jaxvla.train`` runs it before ``train``. ``train`` itself never does: a stage's build
only checks them (``jaxvla.stages.require``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from jaxvla import checkpoint as ckpt_lib
from jaxvla import config as cfg_lib
from jaxvla import optim, sharding, tracking
from jaxvla.io.weights import load_param_tree
from jaxvla.stages import Checkpoint, Stage, build_stage, prerequisites

log = logging.getLogger("jaxvla")


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; checkpointed whole.

    ``rng`` is a raw uint32[2] key; step ``s`` draws from ``fold_in(rng, s)`` so randomness does
    not depend on how the state was sharded or whether the run was resumed.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    ema_params: Any = None
    aux: Any = None


@dataclasses.dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]  # the last logged window's averages (plus eval/...)
    workdir: str
    state: TrainState
    preempted: bool = False
    history: list[tuple[int, dict[str, float]]] = dataclasses.field(default_factory=list)  # every log


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the message names the step."""


# ----------------------------------------------------------------------------------------------
# State: abstract shapes, shardings, sharded creation.


@dataclasses.dataclass
class StateFactory:
    """Knows the train state's abstract shapes and shardings and creates it sharded."""

    stage: Stage
    optimizer: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    rules: tuple
    ema: bool

    def __post_init__(self):
        rng = jax.random.PRNGKey(0)
        boxed = jax.eval_shape(self.stage.init_variables, rng)
        extra = set(boxed) - {"params"}
        if extra:
            raise ValueError(f"stage variables must be params only, found collections {sorted(extra)}")
        param_shardings = sharding.tree_shardings(boxed["params"], self.mesh, self.rules)
        self.abstract = jax.eval_shape(self._create, rng)
        replicated = sharding.replicated(self.mesh)
        opt_shardings = sharding.optimizer_state_shardings(
            self.abstract.opt_state, self.abstract.params, param_shardings, self.mesh
        )
        self.shardings = TrainState(
            step=replicated,
            params=param_shardings,
            opt_state=opt_shardings,
            rng=replicated,
            ema_params=param_shardings if self.ema else None,
            aux=jax.tree.map(lambda _: replicated, self.abstract.aux),
        )

    def _create(self, rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        params = nn.meta.unbox(self.stage.init_variables(init_rng)["params"])
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.optimizer.init(params),
            rng=state_rng,
            ema_params=params if self.ema else None,
            aux=self.stage.init_aux(params) if self.stage.init_aux else {},
        )

    def create(self, seed: int) -> TrainState:
        rng = jax.random.PRNGKey(seed)
        # Initialisers are one RNG program per parameter and run once: optimising them costs more
        # compile time (3x on CPU for the VQGAN) than it could ever save.
        compiled = jax.jit(self._create, out_shardings=self.shardings).lower(rng).compile(
            compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
            if jax.devices()[0].platform == "cpu" else None
        )
        return compiled(rng)

    def abstract_with_shardings(self) -> TrainState:
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract, self.shardings
        )


# ----------------------------------------------------------------------------------------------
# The step.


# A step's metric: 1.0 when every updated parameter and the gradient norm are finite. The loop
# takes it out of the logged metrics and refuses to go on (or save) when it is 0.
FINITE_UPDATE = "finite_update"


def _all_finite(params: Any, *scalars: jax.Array) -> jax.Array:
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.inexact)]
    flags += [jnp.isfinite(s) for s in scalars]
    return jnp.all(jnp.stack(flags)).astype(jnp.float32)


def _split_aux(metrics: dict) -> tuple[dict, dict]:
    aux = {k: v for k, v in metrics.items() if k.startswith("aux/")}
    return {k: v for k, v in metrics.items() if k not in aux}, aux


def make_train_step(
    stage: Stage,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    state_shardings: TrainState,
    mesh: jax.sharding.Mesh,
    grad_accum_steps: int = 1,
    ema_decay: float = 0.0,
):
    """The jitted ``(state, batch) -> (state, metrics)``; the input state is donated.

    With ``grad_accum_steps = n`` the global batch is cut into n micro-batches (interleaved rows,
    so each device's rows stay on that device) whose gradients are averaged before one update.
    """
    grad_fn = jax.value_and_grad(stage.loss_fn, has_aux=True)

    def gradients(params, batch, rng):
        if grad_accum_steps == 1:
            (loss, metrics), grads = grad_fn(params, batch, rng)
            metrics, aux = _split_aux(metrics)
            return loss, metrics, aux, grads

        def micro(x):
            x = x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:])
            return jnp.swapaxes(x, 0, 1)

        micro_batches = jax.tree.map(micro, batch)
        # The first micro-batch runs outside the scan: its outputs give the carry's structure.
        (loss, metrics), grads = grad_fn(params, jax.tree.map(lambda x: x[0], micro_batches), rng)
        metrics, aux = _split_aux(metrics)

        def body(carry, inputs):
            index, micro_batch = inputs
            (loss, metrics), grads = grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
            metrics, aux = _split_aux(metrics)
            return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), aux

        rest = jax.tree.map(lambda x: x[1:], micro_batches)
        (loss, metrics, grads), rest_aux = jax.lax.scan(
            body, (loss, metrics, grads), (jnp.arange(1, grad_accum_steps), rest)
        )
        scale = 1.0 / grad_accum_steps
        loss, metrics, grads = jax.tree.map(lambda x: x * scale, (loss, metrics, grads))
        # aux outputs (codebook statistics, ...) come from the last micro-batch.
        return loss, metrics, jax.tree.map(lambda x: x[-1], rest_aux), grads

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        loss_rng, post_rng = jax.random.split(rng)
        loss, metrics, aux_outputs, grads = gradients(state.params, batch, loss_rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        aux = state.aux
        if stage.post_step is not None:
            params, aux, extra = stage.post_step(params, aux, aux_outputs, state.step, post_rng)
            metrics = {**metrics, **extra}
        ema_params = state.ema_params
        if ema_decay:
            ema_params = optax.incremental_update(params, state.ema_params, 1.0 - ema_decay)
        grad_norm = optax.tree.norm(grads)
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
            FINITE_UPDATE: _all_finite(params, grad_norm),
        }
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, aux=aux, ema_params=ema_params
        )
        return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


# ----------------------------------------------------------------------------------------------
# Preemption.


class PreemptionWatcher:
    """Turns SIGTERM into a flag the loop polls; all processes agree on when to stop."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self._event.set()

    def should_stop(self) -> bool:
        local = self._event.is_set()
        if jax.process_count() == 1:
            return local
        flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
        return bool(np.any(flags))

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class TrainSetup:
    """A stage's train step built for one mesh: the stage, its optimizer and schedule, the state
    factory (shapes, shardings, sharded creation) and the jitted, state-donating step."""

    stage: Stage
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    factory: StateFactory
    step: Any


def setup_train_step(config, mesh: jax.sharding.Mesh, rules, stage: Stage | None = None) -> TrainSetup:
    """Builds ``config.stage`` (or ``stage``) and its step the way ``train`` does; call inside
    ``jax.set_mesh(mesh)`` and ``nn.logical_axis_rules(rules)``. Benchmarks and plans use it too."""
    stage = stage or build_stage(config)
    optimizer, schedule = optim.make_optimizer(config.optimizer, config.num_steps)
    factory = StateFactory(stage, optimizer, mesh, rules, ema=config.ema_decay > 0)
    step = make_train_step(stage, optimizer, schedule, factory.shardings, mesh,
                           config.optimizer.grad_accum_steps, config.ema_decay)
    return TrainSetup(stage, optimizer, schedule, factory, step)


# ----------------------------------------------------------------------------------------------
# The loop.


def _host_scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _check_finite(step: int, metrics: dict[str, float], workdir: str, checkpointer: ckpt_lib.Checkpointer) -> None:
    """Takes the FINITE_UPDATE flag out of ``metrics``; raises NonFiniteLossError when step
    ``step``'s loss, gradient norm or updated parameters are not finite.

    Step s's loss is the loss of the parameters after step s-1's update, so it is checked one step
    after they were made: a checkpoint of step s-1 whose parameters give a non-finite loss (an
    exploded but still finite update, e.g. +-1e30) is moved aside to
    ``checkpoints/nonfinite-<step>-<time>`` and the error names the step that remains. Parameters
    that are themselves non-finite are caught here before the loop can save them.
    """
    finite_update = metrics.pop(FINITE_UPDATE, 1.0)
    loss = metrics["loss"]
    if np.isfinite(loss) and finite_update:
        return
    checkpointer.wait()
    moved = ""
    if not np.isfinite(loss):
        problem = f"non-finite loss ({loss}) at step {step}"
        if step - 1 in checkpointer.all_steps():
            target = checkpointer.set_aside(step - 1, "nonfinite")
            moved = f"the checkpoint of step {step - 1} (its parameters give this loss) was moved aside to {target}; "
    else:
        problem = f"non-finite parameters or gradient norm (grad_norm={metrics.get('grad_norm')}) after step {step}'s update"
    remaining = checkpointer.all_steps()
    kept = f"the last good checkpoint (step {max(remaining)}) is kept in {workdir}" if remaining else "no good checkpoint is left"
    raise NonFiniteLossError(f"{problem}; stopping: {moved}{kept}")


def _record_history(history: list[tuple[int, dict[str, float]]], step: int, eval_metrics: dict[str, float]) -> None:
    """Adds ``eval_metrics`` to ``step``'s history entry (made by that step's log, when it logged)."""
    if history and history[-1][0] == step:
        history[-1][1].update(eval_metrics)
    else:
        history.append((step, dict(eval_metrics)))


def held_out_batches(stage: Stage, count: int) -> list:
    """The first ``count`` batches of ``stage.eval_batches()`` (fewer when the stream ends), on the
    host. Every periodic evaluation of a run measures these same batches, so they are read and
    prepared (decoded, tokenized, packed) once per run instead of once per evaluation."""
    return list(itertools.islice(stage.eval_batches(), count))


def _jitted_eval_fn(stage: Stage):
    """``stage.eval_fn`` (or else the loss's metrics), jitted, its auxiliary outputs dropped."""
    stage_eval = stage.eval_fn or (lambda p, b, r: stage.loss_fn(p, b, r)[1])
    return jax.jit(lambda p, b, r: _split_aux(stage_eval(p, b, r))[0])


def _evaluate(params, held_out: list, mesh, eval_fn) -> dict[str, float]:
    """The mean of ``eval_fn``'s metrics over ``held_out`` (batch i with PRNGKey(i)), as ``eval/<k>``."""
    totals: dict[str, float] = {}
    count = 0
    for index, batch in enumerate(held_out):
        metrics = _host_scalars(eval_fn(params, sharding.global_batch(batch, mesh), jax.random.PRNGKey(index)))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v
        count += 1
    return {f"eval/{k}": v / max(count, 1) for k, v in totals.items()}


def _visualize(stage: Stage, params, batch_iter: Iterator, mesh, visualize_fn, writer, step) -> list[str]:
    batch = sharding.global_batch(next(batch_iter), mesh)
    images = jax.device_get(visualize_fn(params, batch))
    return writer.images(step, images)


def train_prerequisites(config) -> None:
    """Makes what ``config.stage`` declares it reads (``jaxvla.stages.prerequisites``) and is
    missing, in the declared order: renders the embedded Meta-World dataset
    (``MetaWorldData.make``); trains an earlier stage's checkpoint (``Checkpoint``: its own
    prerequisites first, then ``train`` in its workdir; logged as "<what>: no checkpoint in DIR:
    training SPEC there first (N steps; overrides)"). Present ones are left alone.

    With several processes every process calls it (the trainer is multi-process; paths are
    shared; only process 0 renders, the others wait at a barrier).
    """
    needs = prerequisites(config)
    if all(need.present() for need in needs):
        return
    sharding.maybe_initialize_distributed()  # before anything asks for the process index
    for need in needs:
        if need.present():
            continue
        if isinstance(need, Checkpoint):
            sub = need.config()
            log.info("%s", need.describe_training(int(sub.num_steps)))
            train_prerequisites(sub)
            train(sub, need.workdir)
        else:
            need.make()


def train(config, workdir: str, stage: Stage | None = None, devices=None) -> TrainResult:
    """Trains ``config.stage`` in ``workdir`` (resuming if it holds a checkpoint). Its stage's
    prerequisites must be there (``train_prerequisites`` makes them; the build raises
    ``jaxvla.stages.MissingPrerequisiteError`` naming what is missing).

    ``stage`` replaces the registered stage (programmatic use); ``devices`` restricts the mesh to
    a subset of ``jax.devices()`` (e.g. one device of eight in tests).
    """
    sharding.maybe_initialize_distributed()
    is_main = jax.process_index() == 0
    devices = list(devices) if devices is not None else jax.devices()
    cfg_lib.validate(config, len(devices), jax.process_count())
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.logical_rules(config.sharding_rules)
    workdir = os.path.abspath(workdir)
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        cfg_lib.save(config, workdir)
        log.info("config (saved to %s/config.json):\n%s", workdir, cfg_lib.to_json(config))
    log.info("mesh: %s", sharding.describe_mesh(mesh))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return _train(config, workdir, stage, mesh, rules, is_main)


def evaluate_checkpoints(workdir: str, steps: Sequence[int], eval_batches: int,
                         devices=None) -> list[tuple[int, dict[str, float]]]:
    """``[(step, {"eval/<metric>": value})]``: the held-out metrics of each of ``steps``' kept
    checkpoints in ``workdir``, measured as ``train``'s periodic evaluation measures them (the
    stage rebuilt from the workdir's ``config.json``, its ``eval_fn`` on the first ``eval_batches``
    of its held-out stream, PRNGKey(i) for batch i) but on ``eval_batches`` batches instead of the
    config's. Checks a finished run's held-out curve on a larger sample than it was trained with.
    Each step is restored verified and sharded as training lays it out; a missing step raises
    FileNotFoundError naming it."""
    if eval_batches < 1:
        raise ValueError(f"eval_batches must be >= 1, got {eval_batches}")
    workdir = os.path.abspath(workdir)
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no training config (is {workdir} a training workdir?)")
    with open(path) as f:
        config = cfg_lib.from_dict(json.load(f))
    config.eval_batches = int(eval_batches)
    devices = list(devices) if devices is not None else jax.devices()
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.logical_rules(config.sharding_rules)
    checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=None, async_save=False)
    try:
        kept = set(checkpointer.all_steps())
        missing = [int(s) for s in steps if int(s) not in kept]
        if missing:
            raise FileNotFoundError(f"{checkpointer.directory}: no checkpoint for step(s) {missing} "
                                    f"(kept: {sorted(kept)})")
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            setup = setup_train_step(config, mesh, rules)
            stage = setup.stage
            if not stage.eval_batches:
                raise ValueError(f"{workdir}: stage {config.stage!r} has no held-out batches to evaluate")
            eval_fn = _jitted_eval_fn(stage)
            abstract = setup.factory.abstract_with_shardings()
            held_out = held_out_batches(stage, eval_batches)
            out = []
            for step in tqdm(list(steps), unit="checkpoint", desc=f"held-out x{eval_batches}", dynamic_ncols=True):
                state, _, _ = checkpointer.restore(int(step), abstract)
                out.append((int(step), _evaluate(state.params, held_out, mesh, eval_fn)))
                del state
            return out
    finally:
        checkpointer.close()


def _train(config, workdir, stage, mesh, rules, is_main) -> TrainResult:
    setup = setup_train_step(config, mesh, rules, stage)
    stage, factory, train_step = setup.stage, setup.factory, setup.step
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(factory.abstract.params))
    log.info("stage %s: %s parameters", config.stage, f"{n_params:,}")

    checkpointer = ckpt_lib.Checkpointer(
        workdir, max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save
    )
    assets = dict(stage.assets)
    # The newest step that verifies against its digests; newer ones that do not are skipped
    # (warned about) and moved aside to checkpoints/corrupt-<step>-<time>.
    restored = checkpointer.restore_latest(factory.abstract_with_shardings(), verify=config.checkpoint.verify)
    latest = restored[0] if restored is not None else None
    if restored is not None:
        _, state, _, saved_assets = restored
        log.info("resuming from step %d: found a checkpoint in %s", latest, checkpointer.directory)
        assets = {**saved_assets, **assets}
    if stage.workdir_assets is not None:  # e.g. finetuning's bundled image tokenizer
        assets.update(stage.workdir_assets(workdir))
    if restored is None:
        state = factory.create(config.seed)
        if config.init_from:
            state = state.replace(params=_init_from(config, state.params))
            if config.ema_decay > 0:
                state = state.replace(ema_params=state.params)
    last_saved = latest

    frozen_arrays, frozen_scalars = optim.count_frozen(factory.abstract.params, config.optimizer.freeze)
    if frozen_arrays:
        log.info("frozen: %d parameter arrays (%s scalars) matching %r", frozen_arrays, f"{frozen_scalars:,}", config.optimizer.freeze)

    eval_fn = _jitted_eval_fn(stage)
    held_out = functools.cache(lambda: held_out_batches(stage, config.eval_batches))  # read at the first evaluation
    visualize_fn = jax.jit(stage.visualize) if stage.visualize else None

    writer = tracking.MetricWriter(workdir, enabled=is_main, wandb_config=config.wandb, run_config=config.to_dict())
    watcher = PreemptionWatcher()
    config_dict = config.to_dict()

    def save(step):
        nonlocal last_saved
        checkpointer.save(step, state, config_dict, assets)
        last_saved = step

    start = int(state.step)
    batches = stage.batches(start)
    logged: dict[str, float] = {}
    history: list[tuple[int, dict[str, float]]] = []
    sums: dict[str, float] = {}
    sums_count = 0
    preempted = False
    pending = None  # (step, device metrics) of the step whose loss is not yet checked
    progress = tqdm(total=config.num_steps, initial=start, disable=not is_main, unit="step", dynamic_ncols=True)
    window_start, window_steps = time.perf_counter(), 0

    def settle():
        """Fetches the pending step's metrics (one step behind dispatch), checks the loss."""
        nonlocal pending, sums_count
        if pending is None:
            return
        step, device_metrics = pending
        pending = None
        metrics = _host_scalars(device_metrics)
        _check_finite(step, metrics, workdir, checkpointer)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
        sums_count += 1

    try:
        for step in range(start + 1, config.num_steps + 1):
            batch = sharding.global_batch(next(batches), mesh)
            state, device_metrics = train_step(state, batch)
            settle()  # the previous step; overlaps with this one's execution
            pending = (step, device_metrics)
            window_steps += 1
            progress.update(1)

            stop = watcher.should_stop()
            at_log = step % config.log_every == 0 or step == config.num_steps
            at_save = step % config.checkpoint.every == 0 or step == config.num_steps or stop
            if at_log or at_save:
                settle()
            if at_log and sums_count:
                elapsed = time.perf_counter() - window_start
                logged = {k: v / sums_count for k, v in sums.items()}
                logged["perf/steps_per_sec"] = window_steps / elapsed
                logged["perf/examples_per_sec"] = window_steps * config.batch_size / elapsed
                logged.update(getattr(batches, "data_metrics", dict)())  # e.g. data/skipped/<dataset>
                writer.scalars(step, logged)
                history.append((step, dict(logged)))
                progress.set_postfix(
                    loss=f"{logged['loss']:.4f}", ex_s=f"{logged['perf/examples_per_sec']:.1f}"
                )
                sums.clear()
                sums_count = 0
                window_start, window_steps = time.perf_counter(), 0
            if config.eval_every and stage.eval_batches and step % config.eval_every == 0:
                eval_metrics = _evaluate(state.params, held_out(), mesh, eval_fn)
                writer.scalars(step, eval_metrics)
                logged.update(eval_metrics)
                _record_history(history, step, eval_metrics)
                log.info("step %d eval: %s", step, _fmt(eval_metrics))
            if visualize_fn and config.image_every and step % config.image_every == 0:
                _visualize(stage, state.params, stage.batches(step), mesh, visualize_fn, writer, step)
            if at_save:
                save(step)
            if stop:
                log.warning("SIGTERM received: saved step %d, stopping", step)
                preempted = True
                break
        settle()
        final_step = int(state.step)
        if not preempted and final_step > start:
            if visualize_fn:
                paths = _visualize(stage, state.params, stage.batches(final_step), mesh, visualize_fn, writer, final_step)
                for path in paths:
                    log.info("wrote %s", path)
            # The final params are evaluated unless the loop just did (eval_every dividing num_steps).
            evaluated = bool(history) and history[-1][0] == final_step and any(
                k.startswith("eval/") for k in history[-1][1])
            if config.eval_every and stage.eval_batches and not evaluated:
                eval_metrics = _evaluate(state.params, held_out(), mesh, eval_fn)
                logged.update(eval_metrics)
                writer.scalars(final_step, eval_metrics)
                _record_history(history, final_step, eval_metrics)
        if last_saved != final_step and final_step > start:
            save(final_step)
        log.info("step %d: %s", final_step, _fmt(logged))
    finally:
        progress.close()
        checkpointer.close()
        writer.close()
        watcher.close()
    return TrainResult(
        step=int(state.step), metrics=logged, workdir=workdir, state=state, preempted=preempted, history=history
    )


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def _init_from(config, params):
    """Grafts ``config.init_from``'s parameters into freshly initialised, sharded ``params``: a
    stage's workdir, or a weights file of ``scripts/convert_hf_llama.py`` / the LWM converters
    (.npz / .msgpack; a bare backbone tree goes under ``backbone`` when the stage nests it so)."""
    path = config.init_from
    if os.path.isfile(path):
        source = load_param_tree(path)
        if set(params) == {"backbone"} and "backbone" not in source:
            source = {"backbone": source}
        params, report = ckpt_lib.graft_params(params, source, config.init_drop, f"config.init_from={path}")
        step = 0
    else:
        params, report, step = ckpt_lib.graft_from_checkpoint(params, path, config.init_drop, verify=config.checkpoint.verify)
    log.info("init_from %s (step %d):", path, step)
    for line in report:
        log.info("  %s", line)
    return params
