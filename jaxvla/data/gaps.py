"""The LAPA frame gap: how many steps (or video frames) apart the two frames of a pair are.

One function and the two default spans, written only here. A dataset's gap is
``registry.dataset_gap(spec)`` (config / spec overrides, else this function of the spec's rate
and ``ROBOT_GAP_SECONDS`` or ``HUMAN_GAP_SECONDS`` by its ``kind``), used by the pipeline, the LAQ
(``frozen``) and the latent-action labeller. No TensorFlow here, so every one of them can import it.

    frame_gap(80.0, ROBOT_GAP_SECONDS)   # 48: Meta-World, 80 Hz control, 0.6 s
    frame_gap(12.0, HUMAN_GAP_SECONDS)   # 29: SSv2 at 12 fps, 2.4 s (28.8 rounded)
"""

from __future__ import annotations

import math

ROBOT_GAP_SECONDS = 0.6  # LAPA's window on robot data (seconds)
HUMAN_GAP_SECONDS = 2.4  # LAPA's window on human video (seconds)


def frame_gap(hz: float, seconds: float) -> int:
    """Frame gap H in steps: ``max(1, round(seconds * hz))``, rounding half up.

    ``hz``: steps per second, i.e. the control frequency in Hz for robot data or the frame rate in
    frames per second for video. ``seconds``: the span the pair should cover, in seconds. Both must
    be positive and finite (ValueError otherwise). Half up means 2.5 steps give 3 (Python's
    ``round`` would give 2); no registered dataset's rate hits an exact half at 0.6 s or 2.4 s.
    """
    if hz is None or not math.isfinite(float(hz)) or float(hz) <= 0:
        raise ValueError(f"control frequency / fps must be a positive number, got {hz!r}")
    if seconds is None or not math.isfinite(float(seconds)) or float(seconds) <= 0:
        raise ValueError(f"gap seconds must be a positive number, got {seconds!r}")
    return max(1, int(math.floor(float(seconds) * float(hz) + 0.5)))
