"""The one table of `--extra_options`: names, types, defaults, allowed values, help and legacy spellings.

Everything that knows about extra options reads this table: the parser (with "did you mean"), `--help`,
the table in quantization.md (a test checks it is in sync) and the resolved ExportOptions.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from builder.errors import UsageError
from builder.quant import BLOCK_SIZES
from builder.spec import LATENT_FORMS


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false (or 1/0)")


def _parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError("expected an integer") from None


@dataclass(frozen=True)
class Option:
    name: str
    kind: str  # "bool" | "int" | "str"
    default: Any
    help: str
    choices: tuple | None = None
    # Extra validation beyond `choices` (returns an error message or None).
    check: Callable[[Any], str | None] | None = None
    # Accepted legacy spellings of values, mapped to what they mean (documented as deprecated).
    legacy_values: tuple[str, ...] = ()
    # Changes only quantized (-p int4/int8) exports; a float precision notes it as ignored.
    quantized_only: bool = False

    def parse(self, text: str) -> Any:
        if "=" in text:
            raise UsageError(f"extra option {self.name}={text!r}: the value holds another '='; separate key=value "
                             "pairs with spaces or commas (int4_algo_config=k_quant,int4_block_size=64).")
        try:
            if self.kind == "bool":
                value: Any = _parse_bool(text)
            elif self.kind == "int":
                value = _parse_int(text)
            else:
                value = text.strip()
        except ValueError as exc:
            raise UsageError(f"extra option {self.name}={text!r}: {exc}. {self.help}") from None
        allowed = tuple(self.choices or ()) + self.legacy_values
        if self.choices is not None and value not in allowed:
            shown = ", ".join(str(c) for c in allowed)
            raise UsageError(f"extra option {self.name}={text!r} is not allowed; choose one of: {shown}.")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise UsageError(f"extra option {self.name}={text!r}: {problem}")
        return value

    @property
    def allowed_text(self) -> str:
        if self.choices is not None:
            text = ", ".join(str(c) for c in self.choices)
            if self.legacy_values:
                text += " (legacy: " + ", ".join(self.legacy_values) + ")"
            return text
        if self.kind == "bool":
            return "true, false"
        return {"int": "integer", "str": "text"}[self.kind]


def _qmoe_block_size_check(value: int) -> str | None:
    if value > 0 and value not in BLOCK_SIZES:
        return f"use one of {', '.join(map(str, BLOCK_SIZES))} for block-wise scales, or 0 (or any value <= 0) for per-channel."
    return None


def _filename_check(value: str) -> str | None:
    """A bare file name: a path would write outside the temporary output folder (and survive a failed export)."""
    from builder.output import TOKENIZER_FILES  # local import: keeps onnx_ir out of CLI start-up

    if not value or value in (".", "..") or "/" in value or "\\" in value or value.startswith("."):
        return "give a plain file name such as model.onnx (no folders, not hidden); -o chooses the folder."
    if value in ("genai_config.json", *TOKENIZER_FILES):
        return f"{value} is one of the files ortbuild writes beside the model; choose another name such as model.onnx."
    return None


def _mixed_precision_check(value: str) -> str | None:
    from builder.quant.plan import parse_mixed_precision  # local import: plan imports this module

    try:
        parse_mixed_precision(value)
    except UsageError as exc:
        return str(exc)
    return None


OPTIONS: tuple[Option, ...] = (
    Option("int4_algo_config", "str", "default",
           "INT4 base method for MatMul weights: default (ORT's MLAS block quantizer), rtn (round to nearest), "
           "k_quant (searched scale/min per block, asymmetric). Legacy compound names are deprecated aliases of a "
           "base method plus INT8 placement flags (see quantization.md).",
           choices=("default", "rtn", "k_quant"),
           legacy_values=("rtn_last", "k_quant_last", "k_quant_mixed", "k_quant_linear"), quantized_only=True),
    Option("int4_block_size", "int", 32,
           "Block size along K (the input axis) for int4/int8 MatMulNBits weights and quantized embeddings.",
           choices=BLOCK_SIZES, quantized_only=True),
    Option("int4_is_symmetric", "bool", True,
           "Symmetric (no zero points) or asymmetric (uint8 zero points) block quantization; also applies to 8-bit "
           "weights. k_quant int4 is always asymmetric.", quantized_only=True),
    Option("int4_accuracy_level", "int", None,
           "MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations. "
           "Default: 4 on cpu, 0 on cuda.", choices=(0, 1, 2, 3, 4), quantized_only=True),
    Option("last_matmul_weight_int8", "bool", False,
           "With -p int4, store the lm_head (last MatMul) in 8 bits (RTN) instead of 4."),
    Option("int8_mixed_layers", "bool", False,
           "With -p int4, store the attention and MLP projections of the first and the last max(1, layers // 8) "
           "layers in 8 bits (RTN) instead of 4."),
    Option("int8_linear_attn", "bool", False,
           "With -p int4, store the linear-attention projections (qkv, z, out) of hybrid models (Qwen3.5, "
           "Qwen3-Next) and the MLP / shared expert of the same layers in 8 bits (RTN); models without linear "
           "attention print a note that the flag has no target."),
    Option("matmul_mixed_precision", "str", "",
           "Other tools' spelling of the INT8 placement flags: comma list of last_matmul:int8, mixed_layers:int8, "
           "linear_attn:int8.", check=_mixed_precision_check),
    Option("quantize_embeddings", "bool", None,
           "With -p int4/int8, store the token embedding block-quantized (GatherBlockQuantized). A tied lm_head then "
           "reads the same bytes (stored once), so both take the lm_head's format. Default: on for -p int4 when the "
           "embedding is tied to a 4-bit lm_head (one shared table, as the reference builder does), else off."),
    Option("lm_head_prepacked", "bool", None,
           "-e cuda with 4-bit weights and float16/bfloat16 activations: store the lm_head's MatMulNBits weight in "
           "ONNX Runtime's fpA_intB (CUTLASS SM80) layout with weight_prepacked=1, so its GEMV runs on the fpA_intB "
           "kernel (H200: a 201088 x 2880 head, 154 -> 94 us per token). Default: on where it applies: block size 32, "
           "symmetric, no lm_head bias, vocabulary and hidden size multiples of 64, and a head with its own table (a "
           "tied head sharing the embedding's table keeps the plain layout rather than a second copy). Such an export "
           "runs on the CUDA provider only.", quantized_only=True),
    Option("left_padding", "bool", True,
           "Batches padded on the left run exactly: the graph moves each row's real new tokens first and puts the "
           "final hidden states back (builder/layers/padding.py; 9 small kernels per decode step on CUDA). false "
           "leaves that reorder out, for callers that pad on the right (onnxruntime-genai) or not at all: those stay "
           "exact and a decode step runs fewer kernels, but a left-padded batch gives wrong results."),
    Option("last_token_logits", "bool", False,
           "Output logits [batch, 1, vocab]: each row's last real token only (a right-padded row's last unpadded "
           "column), so a prompt pass runs the lm_head on one row instead of all of them (H200, a 1024-token prompt "
           "of GPT-OSS-20B's shape: see README \"Performance\"). onnxruntime-genai 0.18 reads such logits as they "
           "are; perplexity over a prompt needs the default (logits at every position, as transformers returns)."),
    Option("fuse_qk_norm_gqa", "bool", None,
           "Feed per-head q/k RMSNorm weights to GroupQueryAttention instead of separate norm nodes. "
           "CUDA with float16/bfloat16 activations only (ONNX Runtime's CPU kernel, which also runs float32 "
           "attention on cuda, rejects them); default true for -e cuda -p fp16/bf16/int4/int8, false otherwise."),
    Option("enable_cuda_graph", "bool", None,
           "-e cuda: let onnxruntime-genai capture each decode step in a CUDA graph (genai_config's CUDA provider "
           "option). Default: on, except for models with a longrope length switch (an If node, which ONNX Runtime "
           "cannot capture), per-expert MoE layers (Gemma 4: shapes that change with the routing) and -p fp32 "
           "(attention runs on the CPU EP); the export notes why. onnxruntime-genai captures batch-1 generation only: "
           "set false for batched generation on CUDA. "
           "false turns it off; true is refused where ONNX Runtime would refuse the graph."),
    Option("linear_attn_fp32", "bool", True,
           "Hybrid (linear-attention) models with fp16/bf16 activations: run the linear-attention core (causal conv, "
           "decay gate, gated delta rule, gated norm) and keep its conv and recurrent state in float32, as "
           "transformers keeps the recurrent state; false runs it in the activation dtype. No effect on fp32 "
           "activations (cpu)."),
    Option("latent_attention_form", "str", None,
           "Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2): absorbed caches one [rope key | latent] row per "
           "token (2 x 576 values per layer for DeepSeek-V3) through GroupQueryAttention with one kv head; "
           "decompressed caches per-head keys and values (values padded to the qk head size: 2 x 128 x 192). "
           "Default: absorbed, unless the row is wider than GroupQueryAttention takes on the EP (cuda: 512, so "
           "DeepSeek-V3 / Kimi-K2 export decompressed on cuda); the export notes the choice and its cache cost.",
           choices=LATENT_FORMS),
    Option("moe_quant_bits", "int", None,
           "Bits for routed MoE expert weights (QMoE, or Gemma 4's per-expert MatMulNBits). Default: 4 for -p int4, "
           "8 for -p int8.", choices=(4, 8), quantized_only=True),
    Option("qmoe_block_size", "int", 32,
           "Routed expert scales: block size along K (16..256), or <= 0 for per-channel scales (QMoE only: a usage "
           "error for per-expert MatMulNBits experts).",
           check=_qmoe_block_size_check, quantized_only=True),
    Option("qmoe_weights_prepacked", "int", -1,
           "CUDA QMoE expert layout: -1 auto (ship the offline SM80 CUTLASS layout, attribute omitted — ORT reads an "
           "omitted attribute as 'already prepacked'), 0 raw [E, N, K/pack] (ORT prepacks at session load), "
           "1 offline prepacked with the attribute written. CUDA only.", choices=(-1, 0, 1), quantized_only=True),
    Option("qmoe_prepack_arch", "int", 80,
           "Layout of offline-prepacked QMoE weights. ONNX Runtime 1.31's CUDA QMoE runs its SM80 grouped GEMM on "
           "every GPU (Hopper included) and reads the SM80 layout; the SM90 layout (90) is only read by MatMulNBits, "
           "so 90 is rejected for QMoE.", choices=(80, 90), quantized_only=True),
    Option("filename", "str", "model.onnx", "File name of the ONNX model inside the output folder.",
           check=_filename_check),
)

BY_NAME = {opt.name: opt for opt in OPTIONS}


# A comma followed by `name=` starts the next pair; other commas belong to the value (matmul_mixed_precision lists).
_PAIR_SEPARATOR = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*=)")


def split_pairs(items: Iterable[str]) -> list[tuple[str, str]]:
    """Split `key=value` tokens; several may share one token, separated by spaces or commas
    (`int4_algo_config=k_quant,int4_block_size=64`)."""
    pairs = []
    for item in items:
        for token in _PAIR_SEPARATOR.split(item.strip()) if item.strip() else []:
            for part in token.split():
                if "=" not in part:
                    raise UsageError(f"extra option {part!r} is not of the form key=value (e.g. int4_block_size=64); "
                                     "separate pairs with spaces or commas.")
                key, _, value = part.partition("=")
                pairs.append((key.strip(), value))
    return pairs


def parse_extra_options(items: Iterable[str]) -> dict[str, Any]:
    """Parse and validate `key=value` strings into typed values; unknown keys get a "did you mean"."""
    values: dict[str, Any] = {}
    for key, text in split_pairs(items):
        option = BY_NAME.get(key)
        if option is None:
            close = difflib.get_close_matches(key, BY_NAME, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UsageError(f"unknown extra option '{key}'.{hint} Run `ortbuild --help` for the list.")
        if key in values:
            raise UsageError(f"extra option '{key}' is given twice.")
        values[key] = option.parse(text)
    return values


def defaults() -> dict[str, Any]:
    return {opt.name: opt.default for opt in OPTIONS}


def help_text() -> str:
    lines = ["Extra options (--extra_options key=value ...):"]
    for opt in OPTIONS:
        default = "auto" if opt.default is None else opt.default
        lines.append(f"  {opt.name} [{opt.allowed_text}] (default: {default})")
        lines.append(f"      {opt.help}")
    return "\n".join(lines)


def markdown_table() -> str:
    """The options table as Markdown, embedded in quantization.md (kept in sync by a test)."""
    rows = ["| option | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for opt in OPTIONS:
        default = "auto" if opt.default is None else (str(opt.default).lower() if opt.kind == "bool" else
                                                      (opt.default if opt.default != "" else '""'))
        rows.append(f"| `{opt.name}` | {opt.kind} | {default} | {opt.allowed_text} | {opt.help} |")
    return "\n".join(rows)
