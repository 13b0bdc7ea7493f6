"""`ortbuild batch ZOO_FILE`: export (and optionally verify) every model x recipe of a zoo file.

Each export runs as its own `python -m builder export` process, so a crash, an OOM kill or a hang in one cannot take
the batch down; at most --jobs run at once. A child's peak RSS comes from os.wait4 on that one child, in a small
launcher process (see builder/child_process.py).
Every export writes its own log; the summary (summary.md and summary.json in the out root) is rewritten after each
job, so it is current even if the batch itself is killed.

Resume: an output counts as complete when its folder holds the model, its external data, genai_config.json and the
ortbuild.json manifest. `ortbuild export` writes into a hidden sibling folder and renames it into place only after
everything is written, so an output folder exists only when complete; the file check guards against folders made by
hand or by other tools. A complete output whose manifest records other settings (precision, EP, extra options) is
reported as stale and left alone unless --force. A rerun therefore redoes exactly the failed and missing exports.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from glob import escape as glob_escape
from pathlib import Path

import click

from builder.child_process import GRACE_S, Children, block_interrupts, builder_command, run_child
from builder.errors import OrtBuildError, RuntimeUnavailableError, UsageError, VerificationError
from builder.export import MANIFEST
from builder.zoo import Job, load_zoo

LOG_DIR = "_logs"


@dataclass
class Result:
    name: str
    model: str
    recipe: str
    precision: str
    ep: str
    status: str = "pending"  # exported | skipped | failed | timeout | stale | interrupted
    exit_code: int | None = None
    wall_s: float | None = None
    peak_rss_bytes: int | None = None
    size_bytes: int | None = None
    error: str | None = None
    log: str | None = None
    verify: str | None = None  # passed | failed | error | unavailable (cannot run here) | None (not asked)
    parity: dict | None = None  # max_abs_error, top1_agreement, greedy figures (from `ortbuild verify --json`)
    verify_log: str | None = None
    previous_run: bool = False  # wall time / RSS carried over from the run that made a skipped output


# --------------------------------------------------------------------------------------------- output state


def output_files(folder: Path) -> list[Path]:
    """The files whose presence makes an output complete (model, external data, genai_config, manifest)."""
    try:
        filename = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    except (OSError, ValueError, KeyError, TypeError):
        filename = "model.onnx"
    return [folder / filename, folder / (filename + ".data"), folder / "genai_config.json", folder / MANIFEST]


def is_complete(folder: Path) -> bool:
    return folder.is_dir() and all(p.is_file() for p in output_files(folder))


def stale_reason(folder: Path, job: Job) -> str | None:
    """Why a complete output does not match the job's recipe (None when it does)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"{MANIFEST} is unreadable"
    recorded_source = manifest.get("source")
    if isinstance(recorded_source, str) and Path(recorded_source).is_dir():
        recorded_source = str(Path(recorded_source).resolve())
    wanted = (("source", job.input_dir or job.model), ("precision", job.precision), ("ep", job.ep))
    found = {**manifest, "source": recorded_source}
    diffs = [f"{key} {found.get(key)!r} (recipe: {want!r})" for key, want in wanted if found.get(key) != want]
    recorded = manifest.get("extra_options", {})
    diffs += [f"{key}={recorded.get(key)!r} (recipe: {want!r})" for key, want in job.resolved_extra.items()
              if recorded.get(key) != want]
    return ", ".join(diffs) or None


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def last_error(log: Path) -> str:
    """The error line of a failed child (`ortbuild: ...`), else its last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if line.startswith("ortbuild:"):
            return line
    return lines[-1] if len(lines) > 1 else "no output"


def remove_partials(out_root: Path, name: str) -> None:
    """A killed export cannot clean up: remove the hidden temporary folders exports of `name` left behind.

    Only exports of this output write `.NAME.partial-*` / `.NAME.old-*` (see builder/output.py), and the batch runs
    one export per output name at a time, so whatever matches after a failure is garbage from a killed process.
    """
    for leftover in [*out_root.glob(f".{glob_escape(name)}.partial-*"), *out_root.glob(f".{glob_escape(name)}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


# --------------------------------------------------------------------------------------------- one job


@dataclass(frozen=True)
class RunSettings:
    out_root: Path
    force: bool
    timeout: float | None
    cache_dir: str | None
    previous: dict  # output name -> record from the last summary.json


def export_args(job: Job, output: Path, settings: RunSettings) -> list[str]:
    args = ["export", "-m", job.model, "-o", str(output), "-p", job.precision, "-e", job.ep]
    if job.input_dir:
        args += ["-i", job.input_dir]
    if settings.cache_dir:
        args += ["-c", settings.cache_dir]
    if job.extra_args:
        args += ["--extra_options", *job.extra_args]
    if settings.force:
        args.append("--overwrite")
    return args


def verify_args(job: Job, output: Path, json_path: Path, settings: RunSettings) -> list[str]:
    args = ["verify", str(output), "--reference", job.reference, "--json", str(json_path),
            "--reference-dtype", job.reference_dtype]
    if job.tolerance is not None:
        args += ["--tolerance", repr(job.tolerance)]
    if job.min_top1 is not None:
        args += ["--min-top1", repr(job.min_top1)]
    if job.verify_steps is not None:
        args += ["--steps", str(job.verify_steps)]
    if settings.cache_dir:
        args += ["-c", settings.cache_dir]
    return args


def stored_verification_applies(json_path: Path, output: Path, job: Job) -> bool:
    """Whether a verify report from an earlier run measured this output with the job's current settings."""
    from builder.verify_report import DEFAULT_STEPS, Policy

    try:
        if json_path.stat().st_mtime < (output / MANIFEST).stat().st_mtime:
            return False  # made before the output was (re-)exported
        report = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return False
    policy = Policy.for_precision(job.precision, job.tolerance, job.min_top1)
    return (report.get("tolerance"), report.get("min_top1"), report.get("steps"), report.get("reference")) == \
        (policy.tolerance, policy.min_top1, DEFAULT_STEPS if job.verify_steps is None else job.verify_steps,
         job.reference)


PARITY_KEYS = ("max_abs_error", "prompt_max_abs_error", "decode_max_abs_error", "top1_agreement",
               "greedy_onnxruntime", "greedy_onnxruntime_genai", "failures")


def run_verify(job: Job, output: Path, result: Result, settings: RunSettings, children: Children) -> None:
    logs = settings.out_root / LOG_DIR
    json_path, log = logs / f"{job.name}.verify.json", logs / f"{job.name}.verify.log"
    result.verify_log = str(log)
    if settings.force or not stored_verification_applies(json_path, output, job):
        json_path.unlink(missing_ok=True)
        cmd = builder_command(verify_args(job, output, json_path, settings))
        code, _, _ = run_child(cmd, log, children, settings.timeout)
        if code == RuntimeUnavailableError.exit_code:
            result.verify, result.error = "unavailable", last_error(log)
            return
        if code not in (0, VerificationError.exit_code) or not json_path.is_file():
            result.verify, result.error = "error", last_error(log)
            return
    report = json.loads(json_path.read_text())
    result.verify = "passed" if report["passed"] else "failed"
    result.parity = {key: report.get(key) for key in PARITY_KEYS}


def carry_previous_figures(result: Result, previous: dict | None) -> None:
    """An output left in place keeps the wall time and peak RSS of the run that made it (from summary.json)."""
    previous = previous or {}
    if previous.get("status") in ("exported", "skipped", "stale") and previous.get("wall_s") is not None:
        result.wall_s, result.peak_rss_bytes = previous["wall_s"], previous.get("peak_rss_bytes")
        result.previous_run = True


def run_job(job: Job, settings: RunSettings, children: Children, say) -> Result:
    output = settings.out_root / job.name
    log = settings.out_root / LOG_DIR / f"{job.name}.export.log"
    result = Result(job.name, job.model_name, job.recipe, job.precision, job.ep, log=str(log))
    if is_complete(output) and not settings.force:
        reason = stale_reason(output, job)
        result.size_bytes = folder_size(output)
        carry_previous_figures(result, settings.previous.get(job.name))
        if reason:
            result.status = "stale"
            result.error = (f"{output} exists but was made with other settings ({reason}); delete it or pass --force "
                            "to re-export")
            say(f"{job.name}: stale, not re-exported: {result.error}")
            return result
        result.status = "skipped"
        say(f"{job.name}: already complete, skipped")
    elif output.is_dir() and any(output.iterdir()) and not settings.force:
        missing = [p.name for p in output_files(output) if not p.is_file()]
        result.status = "failed"
        result.error = (f"{output} exists but is not a complete export (missing {', '.join(missing)}): not made by "
                        "`ortbuild export`, or altered since; delete it or pass --force to replace it")
        return result
    else:
        say(f"{job.name}: exporting ({job.label})")
        cmd = builder_command(export_args(job, output, settings))
        code, wall, rss = run_child(cmd, log, children, settings.timeout)
        result.exit_code, result.wall_s, result.peak_rss_bytes = code, round(wall, 3), rss
        if code == 0 and is_complete(output):
            result.status, result.size_bytes = "exported", folder_size(output)
        else:
            remove_partials(settings.out_root, job.name)
            result.status = "timeout" if code == 124 else "interrupted" if children.stopping else "failed"
            result.error = (f"timed out after {settings.timeout:g} s" if code == 124 else
                            f"killed by signal {-code}" if code < 0 else last_error(log))
            say(f"{job.name}: {result.status} (exit {code}): {result.error}")
            return result
        peak = "?" if rss is None else f"{rss / 2**20:.0f}"
        say(f"{job.name}: exported in {wall:.1f} s, peak RSS {peak} MiB, "
            f"{result.size_bytes / 2**20:.1f} MiB")
    if job.verify:
        run_verify(job, output, result, settings, children)
        figure = "" if not result.parity else f": max-abs {result.parity['max_abs_error']:.3g}, top-1 " \
                                              f"{result.parity['top1_agreement']:.1%}"
        say(f"{job.name}: verify {result.verify}{figure}")
    return result


# --------------------------------------------------------------------------------------------- summary


def _mib(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:.1f}"


def _parity_text(result: Result) -> str:
    if not result.parity:
        return result.verify or ""
    return (f"{result.verify}: max-abs {result.parity['max_abs_error']:.3g}, top-1 "
            f"{result.parity['top1_agreement']:.1%}")


def write_summary(out_root: Path, zoo_path: Path, results: list[Result]) -> None:
    """summary.json (every field) and summary.md (one table row per export), written atomically."""
    data = {"zoo": str(zoo_path), "out_root": str(out_root), "exports": [asdict(r) for r in results]}
    rows = ["| model | recipe | output | status | wall (s) | peak RSS (MiB) | size (MiB) | parity | error |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        wall = "" if r.wall_s is None else f"{r.wall_s:.1f}" + (" (earlier run)" if r.previous_run else "")
        error = (r.error or "").replace("|", "\\|")
        rows.append(f"| {r.model} | {r.recipe} | {r.name} | {r.status} | {wall} | {_mib(r.peak_rss_bytes)} | "
                    f"{_mib(r.size_bytes)} | {_parity_text(r)} | {error} |")
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    text = (f"# ortbuild batch: {zoo_path.name}\n\n" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) +
            "\n\n" + "\n".join(rows) + "\n")
    for name, content in (("summary.json", json.dumps(data, indent=2) + "\n"), ("summary.md", text)):
        tmp = out_root / f".{name}.tmp"
        tmp.write_text(content)
        tmp.replace(out_root / name)


def previous_results(out_root: Path) -> dict:
    try:
        return {r["name"]: r for r in json.loads((out_root / "summary.json").read_text())["exports"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


# --------------------------------------------------------------------------------------------- the batch


def verify_runtime_line(jobs: list[Job]) -> str:
    """Before any export: the runtime the verifications will use and what it runs, or an error saying what to
    install (an hour of exports must not end in verifications that cannot start)."""
    import importlib.util

    from builder.runtime import installed_runtime

    runtime = installed_runtime("`ortbuild batch --verify`")
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"--verify compares against transformers, which needs {' and '.join(missing)}: "
                         "pip install 'ortbuild[verify]' (or run with --no-verify).")
    cuda_jobs = [j.name for j in jobs if j.verify and j.ep == "cuda"]
    where = "cpu and cuda exports on their own providers" if runtime.has_cuda else (
        "cpu exports; cuda exports only where they use no CUDA-only feature (the others report 'unavailable': "
        "verify them on a GPU machine with pip install 'ortbuild[gpu]')" if cuda_jobs else "cpu exports")
    return f"verifying with {runtime.describe()}: {where}"


def run_batch(zoo_file: str | Path, out_root: str | Path | None = None, jobs: int = 1, verify: bool | None = None,
              force: bool = False, timeout: float | None = None, only: tuple[str, ...] = (),
              cache_dir: str | None = None, say=None) -> tuple[list[Result], Path]:
    """Run the selected jobs of a zoo file; returns the results (also in summary.json) and the out root."""
    say = say or (lambda text: click.echo(f"[batch] {text}", err=True))
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1 (got {jobs}).")
    zoo = load_zoo(zoo_file, verify=verify)
    root = Path(out_root) if out_root else zoo.out_root
    if root is None:
        raise UsageError(f"no output root: pass --out-root DIR or set out_root in {zoo.path.name}.")
    selected = [j for j in zoo.jobs if not only or any(fnmatch.fnmatch(j.name, pattern) for pattern in only)]
    if not selected:
        raise UsageError(f"--only {' '.join(only)} matches none of: {', '.join(j.name for j in zoo.jobs)}.")
    if any(job.verify for job in selected):
        say(verify_runtime_line(selected))
    (root / LOG_DIR).mkdir(parents=True, exist_ok=True)
    settings = RunSettings(root.resolve(), force, timeout, cache_dir, previous_results(root))
    results = [Result(j.name, j.model_name, j.recipe, j.precision, j.ep) for j in selected]
    lock, children = threading.Lock(), Children()

    def work(index: int) -> None:
        try:
            result = run_job(selected[index], settings, children, say)
        except Exception as exc:  # a bug or I/O error in one job must not stop the others
            result = Result(**{**asdict(results[index]), "status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        with lock:
            results[index] = result
            write_summary(settings.out_root, zoo.path, results)

    say(f"{len(selected)} exports from {zoo.path.name} into {settings.out_root} ({jobs} at a time)")
    pool = ThreadPoolExecutor(max_workers=jobs, initializer=block_interrupts)
    try:
        futures = [pool.submit(work, i) for i in range(len(selected))]
        # Short slices keep the main thread responsive to Ctrl-C / SIGTERM (see block_interrupts).
        while wait(futures, timeout=0.2).not_done:
            pass
        for future in futures:
            future.result()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (builder.cli raises it as a KeyboardInterrupt)
        say(f"interrupted: stopping {len(children.running())} running export(s); completed outputs are kept and "
            "a rerun resumes from them")
        children.stop_all(GRACE_S)
        pool.shutdown(wait=True, cancel_futures=True)
        with lock:
            for r in results:
                if r.status == "pending":
                    r.status = "interrupted"
            write_summary(settings.out_root, zoo.path, results)
        raise
    pool.shutdown()
    return results, settings.out_root


def register(cli_group: click.Group) -> None:
    @cli_group.command("batch")
    @click.argument("zoo_file", type=click.Path(exists=True, dir_okay=False))
    @click.option("--jobs", "-j", default=1, show_default=True, help="Exports run in parallel (each its own process).")
    @click.option("--out-root", "out_root", default=None, type=click.Path(file_okay=False),
                  help="Folder for the outputs, logs and summary (default: out_root in the zoo file).")
    @click.option("--verify/--no-verify", "verify", default=None,
                  help="Run `ortbuild verify` after each export; entries with 'verify: false' still opt out. "
                       "--no-verify turns it off everywhere (default: the zoo file's 'verify').")
    @click.option("--force", is_flag=True, help="Re-export (and re-verify) outputs that are already complete.")
    @click.option("--timeout", type=float, default=None,
                  help="Seconds after which one export (or one verification) is stopped.")
    @click.option("--only", multiple=True, metavar="PATTERN", help="Only outputs whose name matches (glob); repeat.")
    @click.option("--dry-run", "dry_run", is_flag=True, help="Validate the zoo file and list the exports.")
    @click.option("-c", "--cache_dir", "cache_dir", default=None, help="Hugging Face cache folder for Hub ids.")
    @click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
    def batch_cmd(zoo_file, jobs, out_root, verify, force, timeout, only, dry_run, cache_dir, verbose):
        """Export every model x recipe of a zoo file (YAML or JSON), skipping outputs that are already complete.

        \b
        ortbuild batch examples/zoo.yaml --jobs 2 --out-root /data/zoo --verify
        Writes OUT_ROOT/<name>/ per export, OUT_ROOT/_logs/<name>.export.log, summary.md and summary.json.
        Exit 0 when every export succeeded (and verified), 1 when any export failed, 6 when only verification did,
        7 when some verification could not run here (a cuda export on a machine without the CUDA provider).
        """
        if dry_run:
            for job in load_zoo(zoo_file, verify=verify).jobs:
                extra = " " + " ".join(job.extra_args) if job.extra_args else ""
                click.echo(f"{job.name}: -m {job.model} -p {job.precision} -e {job.ep}{extra}"
                           f"{' (verify)' if job.verify else ''}")
            return
        results, root = run_batch(zoo_file, out_root, jobs, verify, force, timeout, only, cache_dir)
        failed = [r.name for r in results if r.status not in ("exported", "skipped")]
        unverified = [r.name for r in results if r.verify in ("failed", "error")]
        unavailable = [r.name for r in results if r.verify == "unavailable"]
        if failed:
            raise OrtBuildError(f"{len(failed)} of {len(results)} exports did not complete ({', '.join(failed)}); "
                                f"see {root / 'summary.md'} and the logs in {root / LOG_DIR}. Rerun the same command "
                                "to retry only those.")
        if unverified:
            raise VerificationError(f"{len(unverified)} of {len(results)} exports failed verification "
                                    f"({', '.join(unverified)}); see {root / 'summary.md'}.")
        if unavailable:
            raise RuntimeUnavailableError(f"{len(unavailable)} of {len(results)} exports could not be verified here "
                                          f"({', '.join(unavailable)}): see {root / 'summary.md'}; verify them where "
                                          "their runtime is (a GPU machine with onnxruntime-gpu for cuda exports).")
        click.echo(f"all {len(results)} exports complete; summary: {root / 'summary.md'}")
