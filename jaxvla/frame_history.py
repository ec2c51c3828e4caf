"""The frame history a ViPRA-style policy reads: o_{t-k} beside o_t (numpy only).

Finetuning pairs every frame o_t with the frame k = ``stride`` control steps before it, frame 0
standing in while t < k (``jaxvla.data.traj_transforms.history_windows``). At test time the same
pairing needs the episode's past frames, and this class keeps exactly those: the
:class:`~jaxvla.policy.ActionChunker` of a single episode and every slot of batched evaluation
(``jaxvla.evaluation.EnvSlots``) use it.

With ``replan_every`` = n (the policy is asked every n control steps, at t = 0, n, 2n, ...) only
two kinds of frame are ever read: o_t at a replanning step and its o_{t-k}. :meth:`needs` says
which steps those are, so a simulator renders no other frame; with k = n (ViPRA's 7 of a 14-action
chunk) no frame beyond the replanning ones is rendered at all.
"""

from __future__ import annotations

import numpy as np


class FrameHistory:
    """One episode's frames for o_{t-k} (k = ``stride`` control steps); ``replan_every`` n: keep
    only what a replan every n steps reads (``None``: every frame may be asked for).

        history = FrameHistory(stride=7, replan_every=7)
        history.push(o_0, step=0)               # frames uint8 [S, S, 3]
        ...
        history.previous(t)                     # o_{max(t - k, 0)}
    """

    def __init__(self, stride: int, replan_every: int | None = None):
        if int(stride) < 1:
            raise ValueError(f"FrameHistory: stride must be >= 1 control step, got {stride}")
        if replan_every is not None and int(replan_every) < 1:
            raise ValueError(f"FrameHistory: replan_every must be >= 1 control step, got {replan_every}")
        self.stride = int(stride)
        self.replan_every = None if replan_every is None else int(replan_every)
        self.reset()

    def reset(self) -> None:
        """A new episode: forget every frame."""
        self._frames: dict[int, np.ndarray] = {}
        self.steps = 0  # frames pushed or skipped so far: t + 1 after o_t

    def needs(self, step: int) -> bool:
        """Whether frame ``step`` will be read: always without ``replan_every``; otherwise when a
        replan happens at ``step`` or at ``step + k``."""
        n = self.replan_every
        return n is None or step % n == 0 or (step + self.stride) % n == 0

    def push(self, frame: np.ndarray | None, step: int | None = None) -> None:
        """Control step ``step``'s frame (default: the step after the last one), in order; ``None``
        for a frame that was not rendered because :meth:`needs` said no. Only frames :meth:`needs`
        keeps are stored, and those no later :meth:`previous` can read are dropped (references
        are kept, not copies)."""
        step = self.steps if step is None else int(step)
        if step < self.steps:
            raise ValueError(f"FrameHistory.push: step {step} after step {self.steps - 1}; frames come in order")
        if frame is None:
            if self.needs(step):
                raise ValueError(f"FrameHistory.push: frame {step} is read by a later replan, so it must be given")
        elif self.needs(step):
            self._frames[step] = np.asarray(frame)
        self.steps = step + 1
        oldest_read = max(step - self.stride, 0)
        for old in [s for s in self._frames if s < oldest_read]:
            del self._frames[old]

    def previous(self, t: int | None = None) -> np.ndarray:
        """o_{max(t - k, 0)} for o_t (default: the last pushed step)."""
        t = self.steps - 1 if t is None else int(t)
        if t < 0 or t >= self.steps:
            raise RuntimeError(f"FrameHistory.previous({t}): frames up to step {self.steps - 1} were pushed "
                               "(push o_t first)")
        wanted = max(t - self.stride, 0)
        if wanted not in self._frames:
            raise RuntimeError(f"FrameHistory.previous({t}): frame {wanted} was not kept (replan_every="
                               f"{self.replan_every} says no replan reads it)")
        return self._frames[wanted]
