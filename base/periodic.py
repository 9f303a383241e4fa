"""A background daemon thread that runs a function every few seconds, started on first use."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Periodic:
    """Runs ``func`` every ``interval`` seconds on a daemon thread named ``name``, from the
    first ``ensure_started`` on (so a process that never needs it never starts it). A round
    that raises is logged and the next one runs as usual."""

    def __init__(self, name: str, interval: float, func: Callable[[], object]) -> None:
        self.name, self.interval, self.func = name, interval, func
        self._started = False
        self._lock = threading.Lock()

    def ensure_started(self) -> None:
        if self._started:
            return
        with self._lock:
            if self._started:
                return
            threading.Thread(target=self._run, name=self.name, daemon=True).start()
            self._started = True

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                self.func()
            except Exception:  # noqa: BLE001 - keep going whatever one round did
                logger.exception("%s: a round failed.", self.name)
