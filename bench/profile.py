"""Where the gateway's CPU goes under load: py-spy samples of the worker, summed by function.

It decides how a profile is taken and read: py-spy samples the gateway from the client CPU during
an extra closed-loop round that is not part of the reported figures (py-spy pauses the process for
each sample, which keeps stacks consistent and costs the gateway a little speed; only the thread
holding the GIL is sampled, since idle worker threads would otherwise look busy), and the raw
collapsed stacks are summed into shares per package and per function. A flame graph of a second round is written beside them for reading by eye.

    python -m bench.profile DIR/gateway.txt   # summarise an existing raw profile again
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.procs import pinned

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
# Keep paths short in the table: a site-packages path from the package name on.
_SITE = re.compile(r"^.*/(?:site|dist)-packages/")
_LOOP_RUN = "Runner.run (asyncio/runners.py)"


@dataclass(frozen=True)
class Share:
    function: str
    samples: int
    total: int

    @property
    def percent(self) -> float:
        return 100 * self.samples / self.total if self.total else 0.0


def py_spy() -> str:
    """py-spy beside the running interpreter (pip install py-spy into .venv), else on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    found = str(local) if local.exists() else shutil.which("py-spy")
    if found is None:
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")
    return found


def record_argv(*, pid: int, cpu: str, seconds: float, out: Path, fmt: str) -> list[str]:
    return pinned(cpu, [
        py_spy(), "record", "--pid", str(pid), "--gil", "--rate", "250",
        "--duration", str(max(1, round(seconds))), "--format", fmt, "--output", str(out),
    ])  # fmt: skip


def _function(frame: str) -> tuple[str, str]:
    """(function and short file, the package or stdlib module the file belongs to)."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), "?"
    path = _SITE.sub("", match["file"])
    top = path.split("/", 1)[0].removesuffix(".py")
    return f"{match['func']} ({path})", top


def summarise(raw: Path) -> tuple[int, list[Share], list[Share], list[Share]]:
    """Samples in total, then shares by self function, by inclusive function and by package.

    Frames up to the event loop's run (CLI, uvicorn start-up) are dropped: every sample has them.
    A sample whose innermost frame is the loop's run itself is time in uvloop's C code (polling,
    socket I/O, callbacks not written in Python). The package share charges stdlib frames (asyncio,
    logging, json...) to the nearest caller outside the stdlib, so that "uvicorn" includes its
    access log's formatting and "app" its own calls into asyncio.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        loop = [i for i, (name, _) in enumerate(frames) if name.startswith(_LOOP_RUN)]
        if loop:
            frames = frames[loop[-1] :]
        if not frames:
            continue
        total += count
        own[frames[-1][0]] += count
        for name in {name for name, _ in frames[1:] if not name.startswith(_LOOP_RUN)}:
            inclusive[name] += count
        packages[_owner(frames)] += count
    return (
        total,
        [Share(f, n, total) for f, n in own.most_common()],
        [Share(f, n, total) for f, n in inclusive.most_common()],
        [Share(f, n, total) for f, n in packages.most_common()],
    )


def _owner(frames: list[tuple[str, str]]) -> str:
    if len(frames) == 1 and frames[0][0].startswith(_LOOP_RUN):
        return "event loop: uvloop C code, socket I/O"
    for _name, package in reversed(frames):
        if package not in sys.stdlib_module_names:
            return package
    return frames[-1][1]


def render(raw: Path, top: int = 20) -> str:
    total, own, inclusive, packages = summarise(raw)
    lines = [f"gateway profile at max load: {total} py-spy samples ({raw})"]
    lines.append("  self %  package (stdlib time charged to its caller)")
    lines += [f"  {s.percent:6.1f}  {s.function}" for s in packages if s.percent >= 0.5]
    lines.append("  self %  function")
    lines += [f"  {s.percent:6.1f}  {s.function}" for s in own[:top]]
    lines.append("  incl %  function (itself and what it calls)")
    lines += [f"  {s.percent:6.1f}  {s.function}" for s in inclusive[:top]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("raw", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    print(render(args.raw, args.top))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
