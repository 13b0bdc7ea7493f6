"""Run a snippet of Python against an unpacked runtime wheel and read its one-line JSON answer (shared by
scripts/check_runtime_floor.py and scripts/check_genai_floor.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_json(code: str, args: list[str], python_path: str | None, timeout: float = 300) -> dict:
    """`python -c code *args` with `python_path` first on PYTHONPATH (the unpacked wheel shadows the installed
    package); its last stdout line parsed as JSON, or {"ok": False, "error": its last stderr line}."""
    env = {**os.environ}
    if python_path:
        env["PYTHONPATH"] = python_path
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"ok": False, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}


def report(cases: dict, table: list[dict], problems: list[str], out: Path | None) -> int:
    """Write the run's JSON (each case's recorded minimum, every run, the problems) to `out` and say the verdict;
    the exit code: 1 when a model did not run exactly from its recorded minimum on."""
    result = {"requires": {n: c["requires"] for n, c in cases.items()}, "runs": table, "problems": problems}
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(problems) if problems else "every model runs from its recorded minimum on, and not below it")
    return 1 if problems else 0
