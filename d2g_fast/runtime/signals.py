"""Preemption: a signal asks the command to finish the step (or shard) in hand, save, and exit
with ``EXIT_REQUEUE`` so that the scheduler requeues it; rerunning the same command resumes.

The signals are SIGTERM and SIGUSR1 by default (what SLURM, Kubernetes and spot instances send
before they kill a job); ``D2G_PREEMPT_SIGNALS`` (or ``d2g --preempt-signals``) names others,
e.g. ``SIGUSR2`` or ``SIGTERM,SIGUSR2``, to match SLURM's ``--signal``. The handler only sets a
flag: the command checks it between steps, so nothing is interrupted half-way. Later signals
while the command is saving are reported and ignored (the checkpoint is written to a temporary
name and renamed, so even a SIGKILL then leaves the previous checkpoint as it was).

Under torchrun the flag is combined over the ranks (``requested_on_any_rank``) at the same
point of every step, so all ranks stop after the same step and write one checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from d2g_fast.runtime import EXIT_REQUEUE

SIGNALS_ENV = "D2G_PREEMPT_SIGNALS"
DEFAULT_SIGNALS = "SIGTERM,SIGUSR1"


class Preempted(Exception):
    """Raised once the command has saved its state after a preemption signal; ``d2g`` prints
    the message (rank 0's) and exits with ``EXIT_REQUEUE``."""

    exit_status = EXIT_REQUEUE


def signal_names(text: str | None = None) -> list[str]:
    """The preemption signals from ``text`` (default: $D2G_PREEMPT_SIGNALS, else SIGTERM and
    SIGUSR1). Names with or without SIG, or numbers; errors name the setting."""
    text = text if text is not None else os.environ.get(SIGNALS_ENV) or DEFAULT_SIGNALS
    names = []
    for item in text.replace(" ", ",").split(","):
        item = item.strip().upper()
        if not item:
            continue
        try:
            sig = signal.Signals(int(item)) if item.isdigit() else \
                signal.Signals[item if item.startswith("SIG") else "SIG" + item]
        except (KeyError, ValueError):
            raise ValueError(f"preempt signals (--preempt-signals / ${SIGNALS_ENV}): unknown "
                             f"signal {item!r}") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"preempt signals (--preempt-signals / ${SIGNALS_ENV}): "
                             f"{sig.name} cannot be caught")
        names.append(sig.name)
    if not names:
        raise ValueError(f"preempt signals (--preempt-signals / ${SIGNALS_ENV}): empty")
    return names


class PreemptionWatch:
    """Catches the preemption signals while installed; ``received`` names the first one."""

    def __init__(self, command: str):
        self.command = command
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - the signal module's signature
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            print(f"{self.command}: got {name}: finishing the current step, then saving and "
                  f"exiting with status {EXIT_REQUEUE} (requeue)", file=sys.stderr, flush=True)
        else:
            print(f"{self.command}: got {name} again: already stopping, the state is being "
                  f"saved", file=sys.stderr, flush=True)

    def install(self) -> "PreemptionWatch":
        if threading.current_thread() is not threading.main_thread():
            return self  # signals can only be caught in the main thread
        for name in signal_names():
            sig = signal.Signals[name]
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def ignore_in_worker(worker_id: int = 0) -> None:  # noqa: ARG001 - DataLoader's signature
    """In a helper process (DataLoader worker): ignore the preemption signals, so that the
    command, which stops at a step boundary, still has its workers when it finishes the step."""
    for name in signal_names():
        signal.signal(signal.Signals[name], signal.SIG_IGN)


_ACTIVE: list[PreemptionWatch] = []


@contextlib.contextmanager
def watch(command: str):
    """Catch the preemption signals for the duration of a command (nests: the innermost wins)."""
    w = PreemptionWatch(command).install()
    _ACTIVE.append(w)
    try:
        yield w
    finally:
        _ACTIVE.remove(w)
        w.uninstall()


def requested() -> str | None:
    """The preemption signal this process received (None: none, or no watch installed)."""
    for w in _ACTIVE:
        if w.received:
            return w.received
    return None


def requested_on_any_rank() -> bool:
    """True on every rank when any rank received a preemption signal. Collective: every rank
    must call it at the same point."""
    from d2g_fast.runtime.ranks import any_rank

    return any_rank(requested() is not None)


def resume_line(command: str, where: str, how: str = "rerun the same command") -> str:
    """The one line printed on preemption."""
    return (f"{command}: preempted ({requested() or 'signal on another rank'}): {where}; {how} "
            f"to continue (exit status {EXIT_REQUEUE}: requeue)")
