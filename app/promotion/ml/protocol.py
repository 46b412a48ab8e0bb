"""How an ML step talks to whoever runs it: one JSON object per line on stdout, free text on stderr.

Standard library only: it is imported by the steps (in the main and the quantizer environments) and by
the worker. Events:
  {"event": "progress", "step": S, "fraction": 0..1, "message": M}   as the step goes
  {"event": "result", "step": S, "passed": bool, ...figures}         once, at the end
Exit status: 0 done and the gate passed, GATE_FAILED when it ran but its gate refused the result (the
figures are in the result event), anything else a crash (the reason is the stderr tail).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

GATE_FAILED = 3
USAGE_ERROR = 2  # bad arguments or inputs (argparse's own status too): nothing was produced
EVENT_PREFIX = "@@lgw "  # marks protocol lines: libraries print to stdout too (tqdm, llm-compressor)


class InputError(Exception):
    """A step's arguments or input files cannot be used; it exits USAGE_ERROR with nothing left behind."""


def read_texts(path: Path) -> list[str]:
    """Non-empty lines of a text file (a literal \\n in a line stands for a newline)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    texts = [line.strip().replace("\\n", "\n") for line in lines if line.strip()]
    if not texts:
        raise InputError(f"{path} has no texts")
    return texts


class GateFailed(Exception):
    """The step's gate refused its output; the message says which check and by how much."""


def emit(event: str, **fields: Any) -> None:
    line = json.dumps({"event": event, "time": time.time(), **fields}, default=str)
    sys.stdout.write(EVENT_PREFIX + line + "\n")
    sys.stdout.flush()


def progress(step: str, fraction: float, message: str) -> None:
    emit("progress", step=step, fraction=round(max(0.0, min(1.0, fraction)), 4), message=message)
    log(f"[{step}] {fraction:4.0%} {message}")


def log(message: str) -> None:
    """A line for the job's log tail (stderr)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def result(step: str, *, passed: bool, **figures: Any) -> None:
    emit("result", step=step, passed=passed, **figures)


def parse(line: str) -> dict[str, Any] | None:
    """The event on one stdout line, or None for any other output."""
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        event = json.loads(line[len(EVENT_PREFIX):])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("event"), str) else None
