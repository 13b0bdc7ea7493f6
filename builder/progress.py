"""Progress on stderr for an export: stages, a bar for the weights (bytes done / total, rate, ETA, the weight being
written), and one closing line with the output size, wall time and peak RSS. Silent with --quiet.

On a terminal the weights get a tqdm bar; elsewhere (CI, batch logs) a plain line every `interval` seconds. Bytes are
read from the size of the external data file, which the writer fills sequentially, so a large weight moves the bar
while it is being quantized and written, not only when it is done; the writer's per-tensor callback says which
weight that is.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from pathlib import Path

MiB = 2**20
TICK_S = 0.2  # how often the bar reads the data file's size


def peak_rss_bytes() -> int:
    """This process's peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _has_width(stream) -> bool:
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


class Progress:
    def __init__(self, quiet: bool = False, stream=None, interval: float = 5.0, tty: bool | None = None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.interval = interval  # seconds between plain progress lines (not a terminal)
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.tty = isatty() if tty is None else tty
        self.start = time.monotonic()
        self._total = 0
        self._data_path: Path | None = None
        self._current = ("", 0, 0)  # (weight name, offset, length) being written
        self._weights_start = 0.0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._bar = None
        self._last_line = 0.0

    # -- lines ---------------------------------------------------------------------------------------------------
    def _print(self, text: str) -> None:
        if not self.quiet:
            print(f"[ortbuild {time.monotonic() - self.start:6.1f}s] {text}", file=self.stream, flush=True)

    def stage(self, text: str) -> None:
        self._print(text)

    def note(self, text: str) -> None:
        self._print(f"note: {text}")

    # -- weights -------------------------------------------------------------------------------------------------
    def begin_weights(self, total_bytes: int, data_path: Path) -> None:
        """Start following the external data file `data_path`, which will grow to `total_bytes`."""
        self._total, self._data_path = max(int(total_bytes), 1), Path(data_path)
        self._weights_start = self._last_line = time.monotonic()
        if self.quiet:
            return
        self._print(f"writing weights ({total_bytes / MiB:.1f} MiB) to {self._data_path.name}")
        if self.tty:
            from tqdm import tqdm

            sized = _has_width(self.stream)  # a pseudo-terminal may report 0 columns: tqdm would print nothing
            self._bar = tqdm(total=self._total, unit="B", unit_scale=True, unit_divisor=1024, file=self.stream,
                             dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 24,
                             leave=True, desc="weights",
                             mininterval=TICK_S)
        self._stop.clear()
        self._ticker = threading.Thread(target=self._follow, name="ortbuild-progress", daemon=True)
        self._ticker.start()

    def tensor_started(self, name: str, offset: int, length: int) -> None:
        """The writer starts `name` at byte `offset` of the data file (called before its bytes are produced)."""
        self._current = (name, int(offset), int(length))

    def save_callback(self, tensor, info) -> None:
        """onnx_ir.save's per-tensor callback."""
        self.tensor_started(tensor.name or "", info.offset, tensor.nbytes)

    def done_bytes(self) -> int:
        """Bytes of the data file written so far, bounded by the weight being written."""
        name, offset, length = self._current
        try:
            size = os.stat(self._data_path).st_size if self._data_path else 0
        except OSError:
            size = 0
        return min(max(size, offset), offset + length, self._total)

    def _follow(self) -> None:
        while not self._stop.wait(TICK_S):
            self._tick(self.done_bytes())

    def _tick(self, done: int) -> None:
        name = self._current[0]
        if self._bar is not None:
            self._bar.set_postfix_str(name, refresh=False)
            self._bar.update(done - self._bar.n)
            return
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self._print(self.progress_line(done, now - self._weights_start, name))

    def progress_line(self, done: int, elapsed: float, name: str) -> str:
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f"ETA {_duration((self._total - done) / rate)}" if rate > 0 else "ETA ?"
        return (f"weights {done / MiB:.1f}/{self._total / MiB:.1f} MiB ({100 * done / self._total:.0f}%), "
                f"{rate / MiB:.1f} MiB/s, {eta}: {name}")

    def end_weights(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        if self._bar is not None:
            self._bar.update(self._total - self._bar.n)
            self._bar.set_postfix_str("", refresh=False)
            self._bar.close()
            self._bar = None

    # -- the end -------------------------------------------------------------------------------------------------
    def finish(self, output: Path, size_bytes: int, weights: str = "") -> None:
        """The closing line: output size, wall time, peak RSS (and what was written, when given)."""
        tail = f"; {weights}" if weights else ""
        self._print(f"done: {output}: {size_bytes / MiB:.1f} MiB in {time.monotonic() - self.start:.1f} s, "
                    f"peak RSS {peak_rss_bytes() / MiB:.0f} MiB{tail}")
