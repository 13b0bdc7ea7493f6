"""Child processes of a batch: started through a small launcher that measures the child's peak RSS, stopped with
SIGTERM (so an export removes its temporary folder) and SIGKILL after a grace period.

Why a launcher: getrusage(RUSAGE_CHILDREN) mixes children that run in parallel, and even os.wait4 on one child
started straight from the batch reports at least the batch's own peak (see _LAUNCHER).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # so children import this same `builder`


class Children:
    """The child processes this batch started, so an interrupt can stop exactly those.

    Once stopping, no new child is admitted: one that a worker thread was starting at the moment of the interrupt is
    terminated as it registers, instead of running to the end unseen.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._pids: set[int] = set()
        self.stopping = False

    def add(self, pid: int) -> None:
        with self._lock:
            self._pids.add(pid)
            late = self.stopping
        if late:
            _terminate(pid)

    def discard(self, pid: int) -> None:
        with self._lock:
            self._pids.discard(pid)

    def running(self) -> list[int]:
        with self._lock:
            return list(self._pids)

    def stop_all(self, grace: float) -> None:
        """SIGTERM (an export then removes its temporary folder), SIGKILL to whatever is left after `grace` s."""
        with self._lock:
            self.stopping = True
            pids = list(self._pids)
        for pid in pids:
            _terminate(pid)
        deadline = time.monotonic() + grace
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.05)  # the worker threads reap their children and drop them from the set
        for pid in self.running():
            _signal_group(pid, signal.SIGKILL)


def _terminate(launcher_pid: int) -> None:
    """SIGTERM to a launcher, which forwards it to its export once (see _LAUNCHER)."""
    try:
        os.kill(launcher_pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # each child leads its own session (start_new_session), so this reaches only it
    except ProcessLookupError:
        pass


GRACE_S = 10.0  # after SIGTERM, how long a child may take to clean up before SIGKILL


def builder_command(args: list[str]) -> list[str]:
    """`python -m builder ARGS` with this interpreter (the child imports the same package, see run_child)."""
    return [sys.executable, "-m", "builder", *args]


# Measures one child's peak RSS from a small parent. ru_maxrss of a forked-and-exec'd process keeps the high-water mark
# of the memory it was forked from (Linux folds the pre-exec mm into it), so wait4 on a child of the batch process
# would report at least the batch's own peak; forked from this ~6 MiB launcher, the error is the launcher's size.
# SIGTERM/SIGINT sent to the launcher are forwarded to the export exactly once, including one that arrives before the
# fork (signals stay blocked until the child's pid is known); the export starts with default handlers and a clear
# mask (the batch's worker threads block these signals, see block_interrupts). The launcher exits as its child did.
_LAUNCHER = r"""
import os, signal, sys
child = []
def forward(sig, frame):
    if child:
        os.kill(child[0], sig)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
pid = os.fork()
if pid == 0:
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
child.append(pid)
signal.pthread_sigmask(signal.SIG_SETMASK, [])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * 1024))
code = os.waitstatus_to_exitcode(status)
if code < 0:
    if -code != signal.SIGKILL:
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def run_child(cmd: list[str], log: Path, children: Children, timeout: float | None) -> tuple[int, float, int | None]:
    """Run `cmd` in its own session with output to `log`: (exit code, wall seconds, peak RSS bytes or None).

    Exit code 124 means the timeout stopped it; a negative code is the signal that ended it (e.g. -9 for the OOM
    killer). The peak RSS is None when the child was killed before its launcher could record it.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))}
    rss_file = log.with_name(log.name + ".rss")
    rss_file.unlink(missing_ok=True)
    start = time.monotonic()
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(rss_file), *cmd],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    children.add(proc.pid)
    timed_out, killed = False, False
    try:
        while proc.poll() is None:
            elapsed = time.monotonic() - start
            if timeout is not None and elapsed > timeout and not timed_out:
                timed_out = True
                _terminate(proc.pid)
            if timed_out and not killed and elapsed > timeout + GRACE_S:
                killed = True
                _signal_group(proc.pid, signal.SIGKILL)
            time.sleep(0.05)
    finally:
        children.discard(proc.pid)
    try:
        peak = int(rss_file.read_text())
        rss_file.unlink()
    except (OSError, ValueError):
        peak = None
    return (124 if timed_out else proc.returncode), time.monotonic() - start, peak


def block_interrupts() -> None:
    """Worker threads block SIGINT/SIGTERM so the kernel delivers them to the main thread.

    CPython runs Python-level handlers only in the main thread; a signal taken by another thread must be noticed by
    the main thread later (seen in testing, before this: a SIGTERM handled only after the running export had
    finished). Children inherit the mask; the launcher clears it.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
