"""Learning-rate schedules over a stage's budget, the budget being steps or wall-clock minutes.

`lr_schedule="cosine"` (a `MethodConfig` key) anneals every optimiser of a stage from its `lr` to 0
along half a cosine (Loshchilov & Hutter 2017, SGDR without restarts). The position along the
schedule is the stage's *progress*: the larger of the share of its steps done and, when the stage
has a wall-clock budget (`max_minutes` or a stage budget), the share of that budget spent. A
time-budgeted run (`steps` set far beyond reach, `--max-minutes M`) therefore ends with its rate
near 0 at minute M, as a step-budgeted run does at its last step.

Consequences, by design: a time-budgeted cosine run depends on the wall clock (as its step count
already does), and a snapshot taken at minute m of an M-minute cosine run is not the model an
m-minute run would give, so `fit` refuses `--snapshot-minutes` with this schedule.
"""

from __future__ import annotations

import math
from typing import Literal

LRSchedule = Literal["constant", "cosine"]

__all__ = ["LRSchedule", "schedule_factor", "stage_progress"]


def stage_progress(step: int, total_steps: int, elapsed_s: float, budget_minutes: float | None) -> float:
    """Return how far a stage is through its budget, in [0, 1].

    Args:
        step: optimiser steps done in the stage.
        total_steps: the stage's step budget (>= 1).
        elapsed_s: seconds the stage has trained (carried across resumes).
        budget_minutes: the stage's wall-clock budget, or None for a step budget only.

    Example:
        >>> stage_progress(50, 100, 0.0, None), stage_progress(10, 1000, 90.0, 3.0)
        (0.5, 0.5)
    """
    share = step / max(1, total_steps)
    if budget_minutes is not None and budget_minutes > 0:
        share = max(share, elapsed_s / (60.0 * budget_minutes))
    return min(1.0, max(0.0, share))


def schedule_factor(schedule: LRSchedule, progress: float) -> float:
    """Return the factor on the base learning rate at `progress` in [0, 1].

    "constant": 1. "cosine": (1 + cos(pi * progress)) / 2, from 1 at the start to 0 at the end.

    Example:
        >>> schedule_factor("cosine", 0.0), schedule_factor("cosine", 0.5), schedule_factor("constant", 0.9)
        (1.0, 0.5, 1.0)
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {schedule!r}")
