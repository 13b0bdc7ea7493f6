"""Progress reporting on stderr for long exports (stages, tensors and bytes written); silent with --quiet."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self._total_bytes = 0
        self._written = 0
        self._tensors = 0
        self._last = 0.0

    def _print(self, text: str, end: str = "\n") -> None:
        if not self.quiet:
            print(f"[ortbuild {time.monotonic() - self.start:6.1f}s] {text}", file=self.stream, end=end, flush=True)

    def stage(self, text: str) -> None:
        self._print(text)

    def note(self, text: str) -> None:
        self._print(f"note: {text}")

    def begin_weights(self, total_bytes: int) -> None:
        self._total_bytes = max(total_bytes, 1)
        self._print(f"writing weights ({total_bytes / 2**20:.1f} MiB)")

    def wrote(self, nbytes: int) -> None:
        self._written += nbytes
        self._tensors += 1
        now = time.monotonic()
        if now - self._last >= 2.0 or self._written >= self._total_bytes:
            self._last = now
            pct = 100.0 * self._written / self._total_bytes
            self._print(f"  {self._tensors} tensors, {self._written / 2**20:.1f} MiB written ({pct:.0f}%)")
