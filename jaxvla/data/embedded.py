"""The embedded default data: Meta-World expert demonstrations rendered on this machine.

A fresh checkout has no Open-X and no videos, so every stage's default config points at a
Meta-World RLDS dataset under ``runs/data``. ``ensure_metaworld_dataset`` returns it, generating
it first (and saying so) when it is missing.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("jaxvla")


def ensure_metaworld_dataset(data_dir: str, tasks: str = "mt10", episodes_per_task: int = 5, image_size: int = 64, seed: int = 0) -> str:
    """The dataset's version directory under ``data_dir``; generated when absent.

    With several processes only process 0 generates; the others wait for it at a barrier.
    """
    from jaxvla.data.metaworld_rlds import dataset_version_dir

    version_dir = dataset_version_dir(data_dir)
    if not os.path.exists(os.path.join(version_dir, "dataset_info.json")):
        import jax

        if jax.process_index() == 0:
            log.info(
                "no Meta-World dataset at %s: generating it now (tasks=%s, %d episodes per task, %d px)",
                data_dir, tasks, episodes_per_task, image_size,
            )
            from jaxvla.data.metaworld_rlds import make_metaworld_dataset
            from jaxvla.sim import task_names

            make_metaworld_dataset(task_names(tasks), episodes_per_task, image_size, data_dir, seed=seed)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"metaworld dataset {data_dir}")
    return version_dir


def ensure_configured_dataset(data_config) -> None:
    """Generates the embedded Meta-World dataset when a stage's ``config.data`` reads it
    (``dataset == "metaworld"``, no mixture, ``generate_metaworld``) and it is missing."""
    if data_config.get("dataset") == "metaworld" and not data_config.get("mixture") and data_config.get(
            "generate_metaworld", False):
        ensure_metaworld_dataset(
            data_config.data_dir, data_config.metaworld_tasks, data_config.metaworld_episodes_per_task,
            int(data_config.image_size), 0,
        )
