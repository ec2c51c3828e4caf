"""The embedded default data: Meta-World expert demonstrations rendered on this machine.

A fresh checkout has no Open-X and no videos, so every stage's default config points at a
Meta-World RLDS dataset under ``runs/data``. A stage declares it as a prerequisite
(``MetaWorldData``, from its config: ``configured_dataset``); the entry points render it when it is
missing (``ensure_metaworld_dataset``, saying so), stage builds only check that it is there.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex

log = logging.getLogger("jaxvla")


def ensure_metaworld_dataset(data_dir: str, tasks: str = "mt10", episodes_per_task: int = 5, image_size: int = 64, seed: int = 0) -> str:
    """The dataset's version directory under ``data_dir``; generated when absent.

    With several processes only process 0 generates; the others wait for it at a barrier.
    """
    from jaxvla.data.metaworld_rlds import dataset_version_dir  # Meta-World (MuJoCo)

    version_dir = dataset_version_dir(data_dir)
    if not os.path.exists(os.path.join(version_dir, "dataset_info.json")):
        import jax

        if jax.process_index() == 0:
            log.info(
                "no Meta-World dataset at %s: generating it now (tasks=%s, %d episodes per task, %d px)",
                data_dir, tasks, episodes_per_task, image_size,
            )
            from jaxvla.data.metaworld_rlds import make_metaworld_dataset  # Meta-World (MuJoCo)
            from jaxvla.sim import task_names  # Meta-World (MuJoCo)

            make_metaworld_dataset(task_names(tasks), episodes_per_task, image_size, data_dir, seed=seed)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"metaworld dataset {data_dir}")
    return version_dir


@dataclasses.dataclass(frozen=True)
class MetaWorldData:
    """A stage's prerequisite: the embedded Meta-World dataset under ``data_dir`` (a TFDS data_dir),
    rendered with these settings by ``make`` (the entry points) when missing. Builds only check
    ``present`` (``jaxvla.stages.require``)."""

    data_dir: str
    tasks: str
    episodes_per_task: int
    image_size: int
    seed: int = 0
    what: str = "the embedded Meta-World dataset"

    def version_dir(self) -> str:
        # Meta-World (MuJoCo) loads with the dataset builder: only where the dataset is looked at.
        from jaxvla.data.metaworld_rlds import dataset_version_dir  # Meta-World (MuJoCo)

        return dataset_version_dir(self.data_dir)

    def present(self) -> bool:
        return os.path.exists(os.path.join(self.version_dir(), "dataset_info.json"))

    def missing(self) -> str:
        return f"no Meta-World dataset in {self.data_dir}"

    def command(self) -> str:
        """The command that renders the same dataset."""
        return shlex.join(["python", "scripts/make_metaworld_dataset.py", f"--tasks={self.tasks}",
                           f"--episodes_per_task={self.episodes_per_task}", f"--image_size={self.image_size}",
                           f"--out={self.data_dir}", f"--seed={self.seed}"])

    def make(self) -> str:
        """Renders it when missing (entry points only); its version directory."""
        return ensure_metaworld_dataset(self.data_dir, self.tasks, self.episodes_per_task, self.image_size, self.seed)


def configured_dataset(data_config) -> MetaWorldData | None:
    """The embedded Meta-World dataset a stage's pipeline ``config.data`` asks for
    (``dataset == "metaworld"``, no mixture, ``generate_metaworld``), or None."""
    if data_config.get("dataset") == "metaworld" and not data_config.get("mixture") and data_config.get(
            "generate_metaworld", False):
        return MetaWorldData(str(data_config.data_dir), str(data_config.metaworld_tasks),
                             int(data_config.metaworld_episodes_per_task), int(data_config.image_size), 0)
    return None
