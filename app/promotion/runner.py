"""Runs one ML step as a subprocess in its own process group: its protocol events go to a callback, its
stderr into a bounded log tail; cancelling (or any error here) ends the whole group, so no step outlives
the job that ran it."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.promotion.ml import protocol

LOG_TAIL_LINES = 200
_LINE_LIMIT = 1 << 16  # longer lines (a progress bar redrawn without newlines) are cut, not buffered whole


@dataclass
class StepRun:
    returncode: int | None = None
    result: dict[str, Any] | None = None
    log: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_TAIL_LINES))

    @property
    def log_tail(self) -> str:
        return "\n".join(self.log)

    @property
    def gate_failed(self) -> bool:
        return self.returncode == protocol.GATE_FAILED


class StepRunner(Protocol):
    """Runs one ML step to its end: run_step here (a subprocess), or steps_k8s (a Kubernetes Job)."""

    def __call__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = ...,
        on_event: Callable[[dict[str, Any]], None] | None = ...,
        stop: asyncio.Event | None = ...,
        timeout_s: float | None = ...,
        into: StepRun | None = ...,
        job_id: str | None = ...,
        attempt: int | None = ...,
    ) -> Awaitable[StepRun]: ...


class StepCancelled(Exception):
    """The job was cancelled (or lost its lease) while the step ran; the step's processes are gone."""


async def run_step(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    stop: asyncio.Event | None = None,
    timeout_s: float | None = None,
    grace_s: float = 5.0,
    into: StepRun | None = None,
    job_id: str | None = None,
    attempt: int | None = None,
) -> StepRun:
    """Runs argv to its end. `stop` being set ends it early (StepCancelled); so does `timeout_s`
    (TimeoutError). Either way the process group is terminated, then killed after `grace_s`.
    `into`: the StepRun to fill as the step goes (a caller showing the live log tail reads it).
    `job_id` and `attempt` name the run for runners that create named objects (steps_k8s); unused here."""
    del job_id, attempt
    run = into if into is not None else StepRun()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=_die_with_parent,
        limit=_LINE_LIMIT,
    )

    async def read_stdout() -> None:
        assert proc.stdout is not None
        async for raw in _lines(proc.stdout):
            line = raw.decode(errors="replace").rstrip("\n")
            event = protocol.parse(line)
            if event is None:
                if line.strip():
                    run.log.append(line[:2000])
                continue
            if event["event"] == "result":
                run.result = event
            if on_event is not None:
                on_event(event)

    async def read_stderr() -> None:
        assert proc.stderr is not None
        async for raw in _lines(proc.stderr):
            # tqdm redraws with carriage returns: keep the last state of each line.
            line = raw.decode(errors="replace").rstrip("\n").rsplit("\r", 1)[-1]
            if line.strip():
                run.log.append(line[:2000])

    readers = asyncio.gather(read_stdout(), read_stderr())
    waiter = asyncio.ensure_future(proc.wait())
    stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
    try:
        pending = {waiter, *([stopper] if stopper else [])}
        done, _ = await asyncio.wait(pending, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            await _end_group(proc, grace_s)
            if stopper is not None and stopper in done:
                raise StepCancelled()
            raise TimeoutError(f"step did not finish within {timeout_s:g} s")
        await readers
        run.returncode = proc.returncode
        return run
    except BaseException:
        await asyncio.shield(_end_group(proc, grace_s))
        raise
    finally:
        if stopper is not None:
            stopper.cancel()
        readers.cancel()
        with contextlib.suppress(BaseException):
            await readers


def _die_with_parent() -> None:
    """In the child, before exec: the kernel kills it when the worker dies (even by SIGKILL), so a
    crashed worker leaves no ML step running unattended (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1


async def _lines(stream: asyncio.StreamReader) -> Any:
    while True:
        try:
            line = await stream.readline()
        except ValueError:  # longer than the limit: drop what was buffered
            line = b"[line too long]\n"
            with contextlib.suppress(Exception):
                await stream.read(_LINE_LIMIT)
        if not line:
            return
        yield line


async def _end_group(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    """SIGTERM to the step's whole process group, SIGKILL after grace_s; waits until the leader is reaped."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            continue
        # The leader is gone; stragglers of the group (workers it forked) get the KILL too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return
