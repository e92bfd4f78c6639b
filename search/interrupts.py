"""Ctrl-C and SIGTERM as an exception the trial loop can clean up after (exit 130 / 143)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; `signum` decides the exit code (128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalGuard:
    """Within `with SignalGuard():`, SIGINT and SIGTERM raise Interrupted in the main thread.

    Inside `deferred()` a first signal waits until the block ends (a study half set up, a slot half
    given back); a second one raises at once, so a user who insists still gets out.
    """

    def __init__(self):
        self.received: int | None = None
        self._depth = 0
        self._old: dict[int, object] = {}

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._old[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._old.items():
            signal.signal(signum, handler)
        self._old.clear()

    def _handle(self, signum: int, _frame) -> None:
        first = self.received is None
        self.received = signum
        if self._depth == 0 or not first:
            raise Interrupted(signum)

    def check(self) -> None:
        """Raise the signal a deferred block holds, at a point where stopping is clean."""
        if self.received is not None:
            raise Interrupted(self.received)

    @contextmanager
    def immediate(self) -> Iterator[None]:
        """Inside a deferred block, let signals raise at once again (a trial's own work)."""
        saved = self._depth
        self._depth = 0
        try:
            if self.received is not None:
                raise Interrupted(self.received)  # held while the trial was being set up
            yield
        finally:
            self._depth = saved

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold a first signal until the block ends, then raise it."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self.received is not None:
            raise Interrupted(self.received)
