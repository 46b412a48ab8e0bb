"""Stopping without dropping requests: on SIGTERM the gateway reports unready at once (so a load
balancer stops sending it new requests), keeps serving for `delay_s`, and only then lets the server
begin its own shutdown, which waits for requests in flight (uvicorn's graceful timeout)."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class Drain:
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.draining = False
        self._server_handler: Callable[[int, FrameType | None], Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> bool:
        """Takes SIGTERM over from the server (uvicorn) running this app; nothing elsewhere (tests run
        the app in-process: their SIGTERM stays theirs)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        handler = signal.getsignal(signal.SIGTERM)
        owner = getattr(handler, "__self__", None)
        if not callable(handler) or not type(owner).__module__.startswith("uvicorn"):
            return False
        self._server_handler, self._loop = handler, asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGTERM, self._term)
        return True

    def _term(self) -> None:
        if self.draining:
            return
        self.draining = True
        log.warning("SIGTERM: unready now; the server stops taking requests in %.0f s", self.delay_s)
        assert self._loop is not None
        self._loop.call_later(self.delay_s, self._stop)

    def _stop(self) -> None:
        assert self._loop is not None and self._server_handler is not None
        self._loop.remove_signal_handler(signal.SIGTERM)
        self._server_handler(signal.SIGTERM, None)  # the server's own shutdown: drains what is in flight
