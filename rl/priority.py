"""Process CPU priority: the rollout roles yield the cores to a learner sharing them."""
from __future__ import annotations

import os


def lower_cpu_priority() -> None:
    """This thread (a Ray actor's, which runs its methods) gets a core only when nothing else
    wants it: SCHED_IDLE on Linux, nice 19 elsewhere. Lowering priority needs no privileges."""
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(19 - os.nice(0))
