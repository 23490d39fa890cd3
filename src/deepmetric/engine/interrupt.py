"""Stopping a run without losing it.

While :class:`StopRequest` is active, SIGINT (Ctrl-C) and SIGTERM (the notice batch schedulers send
before pre-empting or at the time limit) only *request* a stop: the trainer finishes the step it is
in, saves ``checkpoints/last`` and raises :class:`KeyboardInterrupt`, so ``deepmetric train --resume``
continues exactly there. A second signal aborts at once, as a plain Ctrl-C would. Handlers can only
be installed from the main thread; elsewhere (a training run inside a worker thread) signals keep
their usual meaning. :class:`StopReason` says why a run ended early; :func:`ranks_agree` is how the
ranks of a DDP run agree on a stop.
"""
from __future__ import annotations

import enum
import logging
import signal
import threading
from typing import Any, Dict, Optional

log = logging.getLogger("deepmetric")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager: ``signum`` is the first stop signal received, or ``None``."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # asked twice: stop now, without saving
        self.signum = signum
        log.warning("%s received: finishing this step and saving checkpoints/last (send it again to abort)",
                    signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return self.signum is not None


class StopReason(enum.Enum):
    """Why a run ended before ``train.max_steps``, if it did: one value, never a set of flags."""

    EARLY_STOPPING = "early_stopping"  # train.early_stopping evaluations without a better validation
    CALLBACK = "callback"  # a callback set trainer.should_stop
    SIGNAL = "signal"  # Ctrl-C or SIGTERM: last saved, then KeyboardInterrupt


def ranks_agree(dist: Any, flag: bool, due: bool) -> bool:
    """Whether ``flag`` is raised, as every rank sees it: in one process ``flag`` itself; under DDP,
    only when ``due`` (an all-reduce forces a device sync, so ranks agree at logging steps and
    evaluations, not every step), true if any rank raised it."""
    if not dist.is_distributed:
        return bool(flag)
    from ..core.distributed import any_rank

    return bool(due and any_rank(flag))
