"""Child processes of a benchmark run: pinned to CPUs, each in its own process group, always ended.

It decides how the gateway, the upstream and wrk are started (through `taskset -c`, so that the
figures describe one gateway core) and how they are stopped: SIGTERM to the whole process group,
then SIGKILL, from a `finally`, so that no server outlives the run, even on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import httpx

from app.backends.launcher import group_members, signal_group

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ProcessError(RuntimeError):
    """A child exited early or never answered; the message carries the tail of its log."""


def pinned(cpus: str, argv: Sequence[str]) -> list[str]:
    """argv run on the given CPUs (taskset list syntax, e.g. "0" or "1")."""
    return ["taskset", "-c", cpus, *argv]


def check_cpus(*cpus: int) -> None:
    """Fail early, in words, when taskset is missing or the CPUs are not ours to use."""
    if shutil.which("taskset") is None:
        raise SystemExit("taskset not found: install util-linux (apt-get install -y util-linux)")
    allowed = os.sched_getaffinity(0)
    missing = sorted(set(cpus) - allowed)
    if missing:
        raise SystemExit(
            f"CPU(s) {missing} not available to this process (allowed: {sorted(allowed)}); "
            "pick others with --gateway-cpu / --client-cpu"
        )
    if len(set(cpus)) < len(cpus):
        raise SystemExit("--gateway-cpu and --client-cpu must differ: the point is one core each")


class Child:
    """One long-running child (a server) in its own session; use as a context manager."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._process.pid

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            # Own session and process group: stop() reaches everything it forks, and a Ctrl-C in the
            # terminal reaches only us, so that the finally blocks stop children in order.
            start_new_session=True,
        )

    def wait_http(self, url: str, *, timeout_s: float = 60.0, expect: int = 200) -> None:
        """Poll url until it answers `expect`; raise ProcessError if the child dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self._process is None or self._process.poll() is not None:
                    raise ProcessError(f"{self.name} exited before it was ready:\n{self._log_excerpt()}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(url).status_code == expect:
                        return
                if time.monotonic() > deadline:
                    raise ProcessError(
                        f"{self.name} not ready after {timeout_s:.0f} s:\n{self._log_excerpt()}"
                    )
                time.sleep(0.1)

    def wait(self, timeout_s: float) -> int:
        """Wait for a child that ends by itself (py-spy with --duration); its exit status."""
        if self._process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._process.wait(timeout=timeout_s)

    def cpu_seconds(self) -> float:
        return group_cpu_seconds(self._process.pid) if self._process is not None else 0.0

    def stop(self, timeout_s: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is not None:
            signal_group(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=timeout_s)
            # The group can outlive its leader (workers it forked): make sure nothing is left.
            signal_group(process.pid, signal.SIGKILL)
            process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _log_excerpt(self) -> str:
        return f"log {self.log_path}:\n{self.log_tail()}"

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def run_to_end(
    argv: Sequence[str],
    *,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> str:
    """Run a short-lived tool (wrk, migrate) in its own group; kill the group if we are interrupted."""
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, _ = process.communicate(timeout=timeout_s)
    finally:
        if process.poll() is None:
            signal_group(process.pid, signal.SIGKILL)
            process.wait()
    text = out.decode(errors="replace")
    if process.returncode != 0:
        raise ProcessError(f"{argv[0]} exited with status {process.returncode}:\n{text[-3000:]}")
    return text


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time of every live process in a process group (Linux /proc)."""
    total = 0
    for pid in group_members(pgid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (proc(5) fields 14, 15)
    return total / _CLOCK_TICKS


def threads_outside(pgid: int, cpus: set[int]) -> list[str]:
    """Threads of a process group allowed to run on CPUs outside `cpus` (a server that re-pinned itself)."""
    found = []
    for pid in group_members(pgid):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    status = (task / "status").read_text()
                    allowed = next(
                        ln.split(":", 1)[1].strip()
                        for ln in status.splitlines()
                        if ln.startswith("Cpus_allowed_list:")
                    )
                    if not _cpu_list(allowed) <= cpus:
                        found.append(f"{pid}/{task.name} on {allowed}")
    return found


def _cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def own_cpu_seconds() -> float:
    """This process plus its reaped children (wrk runs): the load generators' CPU time."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cpu_busy_seconds() -> dict[int, float]:
    """Per CPU, seconds not idle since boot, from /proc/stat; steal counts as busy (it is lost to us)."""
    busy: dict[int, float] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in values[:8])
            busy[int(name[3:])] = (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS
    return busy


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that every finally (and so every Child.stop) runs."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
