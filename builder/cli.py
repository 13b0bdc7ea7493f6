"""Command line: `ortbuild -m MODEL -o OUT -p PRECISION -e EP [--extra_options k=v ...]`, plus subcommands.

The top-level flags follow the common model-builder convention so existing command lines keep working;
`ortbuild export ...` is the same thing spelled as a subcommand. Errors print one paragraph (no traceback unless
--verbose) and exit with a code per failure class (see builder/errors.py).
"""

from __future__ import annotations

import signal
import sys
import traceback

import click

from builder import __version__
from builder import options as opts
from builder.errors import ERRORS, INTERRUPTED, TERMINATED, OrtBuildError, UsageError
from builder.progress import Progress
from builder.settings import EPS, PRECISIONS

EXIT_CODES_HELP = ("Exit codes: 0 ok, 1 some exports of a batch failed, " +
                   ", ".join(f"{cls.exit_code} {cls.kind}" for cls in ERRORS) +
                   f" (verify: a CUDA export without the CUDA provider, or no onnxruntime), {INTERRUPTED} interrupted "
                   f"(Ctrl-C), {TERMINATED} terminated (SIGTERM).")


def normalize_extra_options(argv: list[str]) -> list[str]:
    """`--extra_options a=1 b=2` (several values after one flag) -> `--extra_options a=1 --extra_options b=2`."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in ("--extra_options", "--extra-options"):
            i += 1
            taken = 0
            while i < len(argv) and not argv[i].startswith("-") and "=" in argv[i]:
                out += ["--extra_options", argv[i]]
                i += 1
                taken += 1
            if not taken:
                raise UsageError("--extra_options needs at least one key=value (e.g. --extra_options int4_block_size=64).")
            continue
        out.append(token)
        i += 1
    return out


def _apply(fn, decorators):
    for decorator in reversed(decorators):
        fn = decorator(fn)
    return fn


def model_options(fn):
    """The options that say what to export and how: shared by export, `--dry-run` and inspect (one default each)."""
    return _apply(fn, [
        click.option("-m", "--model", "--model_name", "model", help="Hub id (owner/name) or local checkpoint folder."),
        click.option("-i", "--input", "input_dir", default=None,
                     help="Folder holding the checkpoint (config.json + *.safetensors); -m then only names it."),
        click.option("-p", "--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True),
        click.option("-e", "--execution_provider", "--ep", "ep", type=click.Choice(EPS), default="cpu",
                     show_default=True),
        click.option("-c", "--cache_dir", "cache_dir", default=None, help="Hugging Face cache folder for Hub ids."),
        click.option("--extra_options", "extra", multiple=True, metavar="KEY=VALUE ...",
                     help="Extra options (see the list below), separated by spaces or commas."),
        click.option("-q", "--quiet", is_flag=True, help="No progress output and no notes."),
        click.option("-v", "--verbose", is_flag=True, help="Show tracebacks (and their causes) on errors."),
    ])


def export_options(fn):
    return _apply(model_options(fn), [
        click.option("-o", "--output", "output", help="Output folder (created; must be empty unless --overwrite)."),
        click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder (only on success)."),
        click.option("--dry-run", "dry_run", is_flag=True,
                     help="Print the resolved plan (architecture, per-weight formats) and exit without writing."),
    ])


def print_plan(model, input_dir, precision, ep, cache_dir, extra, quiet) -> None:
    from builder.export import prepare
    from builder.report import describe

    if not model and not input_dir:
        raise UsageError("missing -m/--model (a Hub id or a local folder) or -i/--input.")
    click.echo(describe(prepare(model or input_dir, precision, ep, list(extra), input_dir=input_dir,
                                cache_dir=cache_dir), notes=not quiet))


def run_export(model, input_dir, output, precision, ep, cache_dir, extra, overwrite, dry_run, quiet, verbose):
    from builder.export import export

    if dry_run:
        print_plan(model, input_dir, precision, ep, cache_dir, extra, quiet)
        return
    if not model and not input_dir:
        raise UsageError("missing -m/--model (a Hub id or a local folder) or -i/--input.")
    if not output:
        raise UsageError("missing -o/--output (the folder to write the ONNX model into).")
    export(model or input_dir, output, precision, ep, list(extra), input_dir=input_dir, cache_dir=cache_dir,
           overwrite=overwrite, progress=Progress(quiet=quiet))


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=opts.help_text().replace("\n", "\n\n\b\n", 1) + "\n\n" + EXIT_CODES_HELP)
@click.version_option(__version__, "--version", prog_name="ortbuild", message="%(prog)s %(version)s")
@export_options
@click.pass_context
def cli(ctx, **kwargs):
    """Export a Hugging Face LLM checkpoint to an ONNX Runtime / onnxruntime-genai model.

    \b
    ortbuild -m Qwen/Qwen3-0.6B -o out/qwen3-int4 -p int4 -e cpu
    ortbuild -m my-model -i ./checkpoint -o out/m -p fp16 -e cuda --extra_options fuse_qk_norm_gqa=true
    """
    if ctx.invoked_subcommand is None:
        given = [name for name in kwargs if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]
        if not given:  # bare `ortbuild`: help; flags without -m are a usage error (a batch job must not exit 0)
            click.echo(ctx.get_help())
            return
        run_export(**kwargs)


@cli.command("export", epilog=opts.help_text().replace("\n", "\n\n\b\n", 1))
@export_options
def export_cmd(**kwargs):
    """Export a checkpoint (same flags as the top-level command)."""
    run_export(**kwargs)


@cli.command("inspect", epilog=opts.help_text().replace("\n", "\n\n\b\n", 1))
@model_options
def inspect_cmd(model, input_dir, precision, ep, cache_dir, extra, quiet, verbose):
    """Print the architecture and the per-weight quantization plan, reading no weights but a tied model's stored
    lm_head, compared with the embedding (same as export --dry-run)."""
    print_plan(model, input_dir, precision, ep, cache_dir, extra, quiet)


def _register_optional_commands() -> None:
    """Subcommands owned by their own modules (verify, batch) register here when present."""
    import importlib

    for module in ("builder.verify_cli", "builder.batch"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(cli)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so a batch scheduler stopping us still removes the temporary output folder."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _catch_sigterm():
    """Route SIGTERM through the interrupt path; returns a function that restores the previous handler."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signal handling to the host program
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    restore_sigterm = _catch_sigterm()
    try:
        _run(argv, verbose)
    finally:
        restore_sigterm()


def _run(argv: list[str], verbose: bool) -> None:
    try:
        _register_optional_commands()
        cli.main(args=normalize_extra_options(argv), prog_name="ortbuild", standalone_mode=False)
    except OrtBuildError as exc:
        if verbose:
            traceback.print_exc()
        click.echo(f"ortbuild: {exc.kind}: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(UsageError.exit_code if isinstance(exc, click.UsageError) else exc.exit_code)
    except (KeyboardInterrupt, click.Abort) as exc:
        # click re-raises a KeyboardInterrupt as Abort `from` it
        if isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated):
            click.echo("ortbuild: terminated (SIGTERM); unfinished output was removed (finished outputs are kept).", err=True)
            sys.exit(TERMINATED)
        click.echo("ortbuild: interrupted; unfinished output was removed (finished outputs are kept).", err=True)
        sys.exit(INTERRUPTED)
    sys.exit(0)
