"""`ortbuild verify OUT_DIR`: parity of an export against transformers, printed, optionally saved as JSON, and turned
into an exit code (6 past the tolerance, 7 when the model cannot run here) so scripts and `ortbuild batch` can gate
on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from builder.errors import UsageError, VerificationError
from builder.verify_report import DEFAULT_POLICY, DEFAULT_STEPS


def parse_prompt_ids(values: tuple[str, ...]) -> list[list[int]] | None:
    """`--prompt-ids "1,2,3" --prompt-ids "4 5 6"` -> [[1, 2, 3], [4, 5, 6]]."""
    if not values:
        return None
    prompts = []
    for value in values:
        try:
            prompts.append([int(t) for t in value.replace(",", " ").split()])
        except ValueError:
            raise UsageError(f"--prompt-ids {value!r}: expected token ids separated by commas or spaces "
                             "(e.g. --prompt-ids 1,2,3).") from None
    return prompts


def _policy_help() -> str:
    parts = []
    for precision, policy in DEFAULT_POLICY.items():
        parts.append(f"{precision}: " + (f"max-abs <= {policy['tolerance']:g}" if policy["tolerance"] is not None
                                         else f"top-1 >= {policy['min_top1']:.0%}"))
    return "; ".join(parts)


def register(cli_group: click.Group) -> None:
    @cli_group.command("verify", epilog=f"Default acceptance by the export's precision: {_policy_help()}.")
    @click.argument("out_dir", type=click.Path(file_okay=False))
    @click.option("--reference", "-r", default=None, metavar="HF_DIR_OR_ID",
                  help="The checkpoint the export was made from (default: the source recorded in ortbuild.json).")
    @click.option("--prompt-ids", "prompt_ids", multiple=True, metavar="IDS",
                  help="A prompt as token ids ('1,2,3'); repeat for several prompts.")
    @click.option("--prompts", "prompts", multiple=True, metavar="TEXT",
                  help="A text prompt, tokenized with the export's tokenizer; repeat for several.")
    @click.option("--steps", default=DEFAULT_STEPS, show_default=True,
                  help="Decode steps through the KV cache per prompt.")
    @click.option("--tolerance", type=float, default=None,
                  help="Max-abs logit error allowed (default by precision; negative: report only).")
    @click.option("--min-top1", "min_top1", type=float, default=None,
                  help="Minimum top-1 agreement, 0..1 (default by precision; negative: report only).")
    @click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                  help="Also write the figures (and any failure) to this JSON file.")
    @click.option("--no-genai", "no_genai", is_flag=True, help="Skip the onnxruntime-genai greedy comparison.")
    @click.option("--reference-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
                  show_default=True, help="dtype of the transformers reference (bfloat16 halves its memory).")
    @click.option("-c", "--cache_dir", "cache_dir", default=None, help="Hugging Face cache folder for Hub ids.")
    @click.option("-q", "--quiet", is_flag=True, help="Print only the verdict line (PASS/FAIL ...).")
    @click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
    def verify_cmd(out_dir, reference, prompt_ids, prompts, steps, tolerance, min_top1, json_path, no_genai,
                   reference_dtype, cache_dir, quiet, verbose):
        """Compare an exported model with transformers: max-abs logit error (prompt and KV-cache decode
        positions), top-1 agreement and greedy-token agreement (onnxruntime and onnxruntime-genai).

        \b
        ortbuild verify out/qwen3-fp32 --reference Qwen/Qwen3-0.6B
        ortbuild verify out/m --prompts "Hello" --prompts "def f(x):" --steps 16 --json parity.json
        Exit 6 when a figure is past the tolerance; 7 when the model cannot run here (a CUDA export
        without the CUDA provider: run it on a GPU machine with onnxruntime-gpu; or no onnxruntime installed).
        """
        from builder.verify import verify

        if prompt_ids and prompts:
            raise UsageError("pass either --prompt-ids or --prompts, not both.")
        report = verify(out_dir, reference, prompt_ids=parse_prompt_ids(prompt_ids), prompts=list(prompts) or None,
                        steps=steps, tolerance=tolerance, min_top1=min_top1, use_genai=not no_genai,
                        reference_dtype=reference_dtype, cache_dir=cache_dir,
                        warn=lambda text: click.echo(f"ortbuild: warning: {text}", err=True))
        lines = report.summary_lines()
        for line in lines[-1:] if quiet else lines:
            click.echo(line)
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        failures = report.failures()
        if failures:
            raise VerificationError(f"{out_dir}: " + "; ".join(failures) + ". If the export is right and the "
                                    "threshold too strict for this model, pass --tolerance/--min-top1; otherwise "
                                    "re-export and check the weights mapping.")
