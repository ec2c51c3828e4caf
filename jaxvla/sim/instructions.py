"""Language instructions for the Meta-World MT50 tasks.

Variant 0 of every task is the sentence that ``language-world`` ships for it
(``language_world.TASK_DESCRIPTIONS``), verbatim. The other variants are generic
rephrasings built from that sentence, so they stay correct for every task without a
hand-written table; use them for instruction augmentation.

Task names are accepted with or without the ``-v3`` suffix (``"reach"``, ``"reach-v3"``).
This module needs only ``language-world`` (no MuJoCo), so data pipelines can import it
cheaply.
"""

from __future__ import annotations

import language_world

# Each template receives the base sentence ``s`` (lowercase, no final period) and its
# capitalised form ``S``.
_TEMPLATES: tuple[str, ...] = (
    "{s}",
    "{S}.",
    "please {s}.",
    "the robot arm should {s}.",
    "your task: {s}.",
)

NUM_VARIANTS = len(_TEMPLATES)


def _base_name(task: str) -> str:
    name = task.strip().lower()
    if name.endswith("-v3"):
        name = name[: -len("-v3")]
    if name not in language_world.TASK_DESCRIPTIONS:
        valid = ", ".join(sorted(language_world.TASK_DESCRIPTIONS))
        raise ValueError(f"No instruction for unknown Meta-World task {task!r}. Valid tasks: {valid}")
    return name


def base_instruction(task: str) -> str:
    """The ``language-world`` sentence for ``task`` (same as ``instruction(task, 0)``)."""
    return language_world.TASK_DESCRIPTIONS[_base_name(task)]


def instruction(task: str, variant: int = 0) -> str:
    """Instruction sentence ``variant`` (``0 <= variant < NUM_VARIANTS``) for ``task``."""
    if not 0 <= variant < NUM_VARIANTS:
        raise ValueError(f"variant must be in [0, {NUM_VARIANTS}), got {variant}")
    s = base_instruction(task).strip().rstrip(".")
    return _TEMPLATES[variant].format(s=s, S=s[:1].upper() + s[1:])


def all_instructions(task: str) -> list[str]:
    """All ``NUM_VARIANTS`` phrasings of ``task``'s instruction, variant 0 first."""
    return [instruction(task, v) for v in range(NUM_VARIANTS)]
