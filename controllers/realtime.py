"""Optional real-time scheduling for the control process (Linux SCHED_FIFO), best effort.

``enable_realtime(priority)`` moves every thread of this process (``all_threads=False``: only the
calling one) to SCHED_FIFO (threads created later inherit it; child processes do not:
SCHED_RESET_ON_FORK) and returns a function that restores SCHED_OTHER.  All threads, because they share
the GIL: a normal-priority serial reader preempted while holding the GIL would stall the loop (priority
inversion); keep ``sys.setswitchinterval`` short while running.  Without the privilege (CAP_SYS_NICE /
root) it returns None and the run goes on at normal priority.  The loop sleeps most of each period, so
FIFO threads leave the CPU to others between ticks.

Every thread of the control process shares the GIL, so every one of them runs at FIFO (a SCHED_OTHER worker
preempted while holding the GIL blocks the loop: priority inversion). The one exception in rank is the MPC's
planning thread (``PLANNER_PRIORITY``): still FIFO, but below the virtual rig's, so its model bursts (the
``--mpc-planner local`` rollouts) cannot starve the plant; the inversion it allows is bounded by the rig's
short bursts.  The
predictor process, by contrast, stays at normal priority: at FIFO its long inference bursts starve the
control process's threads.
"""

from __future__ import annotations

import os
from collections.abc import Callable

LOOP_PRIORITY = 50      # every thread of the control process
RIG_PRIORITY = 49       # the virtual rig process the run spawned
PLANNER_PRIORITY = 48   # the MPC planning thread


def _tids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def enable_realtime(priority: int = LOOP_PRIORITY, all_threads: bool = True) -> Callable[[], None] | None:
    """SCHED_FIFO at ``priority`` (all threads, or only the calling one); a restore function, or None."""
    if not hasattr(os, "SCHED_FIFO"):
        return None
    policy = os.SCHED_FIFO | getattr(os, "SCHED_RESET_ON_FORK", 0)
    done: list[int] = []
    try:
        for tid in _tids() if all_threads else [0]:
            os.sched_setscheduler(tid, policy, os.sched_param(int(priority)))
            done.append(tid)
    except (PermissionError, OSError):
        _restore(done)
        return None
    return lambda: _restore(_tids())


def thread_fifo(tid: int, priority: int) -> bool:
    """SCHED_FIFO at ``priority`` for one thread of this process (its native id); False if denied."""
    try:
        os.sched_setscheduler(int(tid), os.SCHED_FIFO | getattr(os, "SCHED_RESET_ON_FORK", 0),
                              os.sched_param(int(priority)))
    except (OSError, AttributeError):
        return False
    return True


def realtime_process(pid: int, priority: int = 40) -> bool:
    """SCHED_FIFO for every thread of another process (e.g. the virtual rig we spawned); False if denied."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        for tid in tids:
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(int(priority)))
    except (OSError, ValueError):
        return False
    return True


def _restore(tids: list[int]) -> None:
    for tid in tids:
        try:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            pass
