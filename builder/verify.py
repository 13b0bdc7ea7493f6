"""Parity of an exported model against transformers: what `ortbuild verify` measures and `ortbuild batch` records.

For each prompt the reference (transformers, fp32 by default) decodes `steps` greedy tokens with its KV cache; the ONNX
model then runs the prompt with an empty KV cache and feeds the same tokens one at a time through present -> past, so
both sides see identical inputs, compute the same way, and every position can be compared: max-abs logit error
(prompt and decode positions apart, since a cache bug shows only in the second), top-1 agreement, and greedy
agreement (the common prefix of greedy continuations, through onnxruntime and, when installed, onnxruntime-genai —
the runtime users deploy with).

torch and transformers are an optional extra (`pip install ortbuild[verify]`); they are imported only when a
reference is loaded, so exporting never needs them.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np

from builder.errors import CheckpointError, OutputError, RuntimeUnavailableError, UsageError, VerificationError
from builder.export import MANIFEST
from builder.runtime import CUDA_EP, choose_providers, cuda_only_features, installed_runtime, version_warnings
from builder.state import empty_past_shape, parse_past, present_for
from builder.verify_report import DEFAULT_STEPS, Policy, PromptResult, Report

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a village by the sea, there lived",
    "Q: What is 12 times 7?\nA:",
)

# ------------------------------------------------------------------------------------------------ the output folder


def read_manifest(out_dir: Path) -> dict | None:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OutputError(f"{path}: invalid JSON ({exc}); the export was altered after it finished. Re-export it.")


def detect_precision(model_path: Path, config: dict) -> tuple[str, str]:
    """(precision, ep) of an export without a manifest (made by another tool), from its graph and genai_config."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    bits = {a.i for n in model.graph.node if n.op_type in ("MatMulNBits", "QMoE") for a in n.attribute
            if a.name in ("bits", "expert_weight_bits")}
    elem = next((i.type.tensor_type.elem_type for i in model.graph.input
                 if (parsed := parse_past(i.name)) and parsed[0].sequence_axis is not None), onnx.TensorProto.FLOAT)
    if bits or "MatMulNBits" in ops:
        precision = "int8" if bits == {8} else "int4"
    else:
        precision = {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}.get(elem, "fp32")
    providers = config["model"]["decoder"].get("session_options", {}).get("provider_options", [])
    ep = "cuda" if any("cuda" in entry for entry in providers) else "cpu"
    return precision, ep


def describe_output(out_dir: Path) -> dict:
    """precision, ep, source and model file of an output folder, with a clear error when it is not one."""
    out_dir = Path(out_dir)
    config_path = out_dir / "genai_config.json"
    if not out_dir.is_dir() or not config_path.is_file():
        raise OutputError(f"{out_dir} is not an exported model folder (no genai_config.json). Pass the -o folder of "
                          "an `ortbuild export`.")
    config = json.loads(config_path.read_text())
    filename = config["model"]["decoder"].get("filename", "model.onnx")
    if not (out_dir / filename).is_file():
        raise OutputError(f"{out_dir}: genai_config.json names {filename}, which is missing. Re-export the model.")
    manifest = read_manifest(out_dir)
    if manifest:
        return {"precision": manifest["precision"], "ep": manifest["ep"], "source": manifest.get("source"),
                "filename": filename, "requires": manifest.get("requires")}
    precision, ep = detect_precision(out_dir / filename, config)
    return {"precision": precision, "ep": ep, "source": None, "filename": filename, "requires": None}


# ----------------------------------------------------------------------------------------------- the reference side


def _reference_stack():
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise UsageError(f"`ortbuild verify` compares against transformers, which needs torch and transformers "
                         f"({exc.name} is not installed). Install them with: pip install 'ortbuild[verify]'") from None
    transformers.utils.logging.disable_progress_bar()  # keep the report readable
    return torch, transformers


# Wrappers whose transformers class cannot run text alone (5.24's Llama4ForConditionalGeneration.forward reads
# image_outputs from its text model's output and fails on any input): their text decoder is loaded through
# AutoModelForCausalLM instead (Llama4ForCausalLM, from the same checkpoint).
TEXT_DECODER_REFERENCE = {"Llama4ForConditionalGeneration"}


def load_reference(reference: str, dtype: str = "float32", cache_dir: str | None = None):
    """The transformers model for a folder or Hub id, on CPU in `dtype`; MXFP4 experts are dequantized."""
    torch, transformers = _reference_stack()
    try:
        config = transformers.AutoConfig.from_pretrained(reference, cache_dir=cache_dir)
        kwargs = {"dtype": getattr(torch, dtype), "cache_dir": cache_dir}
        quant = getattr(config, "quantization_config", None) or {}
        if (quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)) == "mxfp4":
            kwargs["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch and arch not in TEXT_DECODER_REFERENCE else None
        model = (cls or transformers.AutoModelForCausalLM).from_pretrained(reference, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot load the reference {reference} with transformers ({type(exc).__name__}: "
                              f"{exc}). --reference must be the checkpoint the export was made from (a folder or "
                              "Hub id).") from None
    return model.eval()


def _cache_argument(model) -> str:
    """The KV-cache argument/output name: `cache` since transformers 5.24 (`past_key_values` still works there but
    warns on every call), `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def reference_run(model, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """(greedy continuation of `steps` tokens, fp32 logits [len(ids) + steps, V]) of transformers' cached decode: the
    prompt pass, then one pass per token with its KV cache -- the computation the exported graph does.

    For every model but one that equals a single cache-free pass over prompt + tokens (to float rounding). The
    exception is longrope (Phi-3) across its switch length: a pass picks the short or long factors by its total
    length, so after the crossing the cached keys keep their short-factor rotation while a cache-free pass rotates
    every key with the long set; an exact export matches the former.
    """
    torch, _ = _reference_stack()
    tokens: list[int] = []
    cache = _cache_argument(model)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        rows = [out.logits[0]]
        for _ in range(steps):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **{cache: getattr(out, cache)})
            rows.append(out.logits[0, -1:])
    return tokens, torch.cat(rows).float().numpy()


def encode_prompts(texts: list[str], *folders: str | Path) -> list[list[int]]:
    """Token ids for text prompts, with the first tokenizer found among `folders` (output folder, then reference)."""
    _, transformers = _reference_stack()
    errors = []
    for folder in folders:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:  # tokenizers fail in many ways; the next candidate may work
            errors.append(f"{folder}: {type(exc).__name__}: {exc}")
            continue
        return [tokenizer(text).input_ids for text in texts]
    raise UsageError("cannot tokenize text prompts: no tokenizer loads from " + "; ".join(errors) +
                     ". Pass token ids with --prompt-ids instead.")


# ------------------------------------------------------------------------------------------------------ the ONNX side


def _as_float32(value) -> np.ndarray:
    """An ORT output as float32 numpy; bfloat16 has no numpy type in onnxruntime, so read its bytes directly.

    Unbound outputs of run_with_ort_values are fetched to CPU memory even under the CUDA EP; the check keeps a
    future change from turning the byte read into a read of a device pointer.
    """
    if value.device_name().lower() != "cpu":
        raise VerificationError(f"onnxruntime returned logits on {value.device_name()}, expected CPU memory.")
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy().astype(np.float32)
    import ml_dtypes

    shape = value.shape()
    count = int(np.prod(shape, dtype=np.int64))
    raw = ctypes.string_at(value.data_ptr(), count * 2)
    return np.frombuffer(raw, np.uint16).view(ml_dtypes.bfloat16).astype(np.float32).reshape(shape)


class OnnxDecoder:
    """Runs an exported decoder with onnxruntime: one prompt pass, then single-token steps feeding present -> past."""

    def __init__(self, model_path: Path, providers: list[str]):
        import onnxruntime as ort

        self._ort = ort
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise VerificationError(f"onnxruntime cannot load {model_path}: {exc}") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.pasts = [name for name in self.inputs if parse_past(name)]  # every declared state (builder/state.py)

    def _empty_past(self, name: str, config: dict):
        """The state before the first token: KV caches of length 0, conv/recurrent state zeros."""
        import onnx

        info = self.inputs[name]
        decoder = config["model"]["decoder"]
        # another tool's export may leave KV head counts/sizes symbolic: genai_config has them
        shape = empty_past_shape(name, info.shape, 1, {1: decoder["num_key_value_heads"], 3: decoder["head_size"]})
        elem = {"tensor(float)": onnx.TensorProto.FLOAT, "tensor(float16)": onnx.TensorProto.FLOAT16,
                "tensor(bfloat16)": onnx.TensorProto.BFLOAT16}[info.type]
        value = self._ort.OrtValue.ortvalue_from_shape_and_type(shape, elem)
        if 0 not in shape:  # fixed-size state starts at zero (ortvalue_from_shape_and_type leaves memory as is)
            zeros = np.zeros(int(np.prod(shape)) * (4 if elem == onnx.TensorProto.FLOAT else 2), np.uint8)
            ctypes.memmove(value.data_ptr(), zeros.ctypes.data, zeros.nbytes)
        return value

    def _ids(self, array: np.ndarray):
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, np.int64))

    def run(self, ids: list[int], feed_tokens: list[int], config: dict) -> tuple[np.ndarray, list[np.ndarray]]:
        """(prompt logits [S, V] (the last position alone, [1, V], for last_token_logits), logits after each fed
        token [V] ...), all float32."""
        feed = {"input_ids": self._ids(np.array([ids])), "attention_mask": self._ids(np.ones((1, len(ids))))}
        if "position_ids" in self.inputs:
            feed["position_ids"] = self._ids(np.arange(len(ids))[None])
        for name in self.pasts:
            feed[name] = self._empty_past(name, config)
        outputs = dict(zip(self.outputs, self.session.run_with_ort_values(self.outputs, feed)))
        prompt = _as_float32(outputs["logits"])[0]
        steps = []
        total = len(ids)
        for token in feed_tokens:
            feed = {"input_ids": self._ids(np.array([[token]])), "attention_mask": self._ids(np.ones((1, total + 1)))}
            if "position_ids" in self.inputs:
                feed["position_ids"] = self._ids(np.array([[total]]))
            for name in self.pasts:
                feed[name] = outputs[present_for(name)]
            total += 1
            outputs = dict(zip(self.outputs, self.session.run_with_ort_values(self.outputs, feed)))
            steps.append(_as_float32(outputs["logits"])[0, -1])
        return prompt, steps


def genai_greedy(model, ids: list[int], steps: int) -> list[int]:
    """Greedy tokens from an onnxruntime_genai.Model (stops early at an end-of-sequence token)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + steps, num_beams=1)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([ids], dtype=np.int32))
    produced: list[int] = []
    while not generator.is_done() and len(produced) < steps:
        generator.generate_next_token()
        produced.append(int(generator.get_next_tokens()[0]))
    return produced


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _genai_prefix(genai: list[int], reference: list[int], eos: set[int]) -> int:
    """Matched reference tokens; a run that stopped early on an end-of-sequence token the reference also chose
    counts as agreeing to the end (genai stops there; transformers was asked to keep going)."""
    n = common_prefix(genai, reference)
    if n == len(genai) and genai and genai[-1] in eos:
        return len(reference)
    return n


# -------------------------------------------------------------------------------------------------------- the whole


def compare_prompt(decoder: OnnxDecoder, reference_model, ids: list[int], steps: int, config: dict) -> PromptResult:
    tokens, full = reference_run(reference_model, ids, steps)
    prompt_logits, step_logits = decoder.run(ids, tokens, config)
    onnx_logits = np.concatenate([prompt_logits, np.stack(step_logits)]) if step_logits else prompt_logits
    # an export with last_token_logits returns the prompt's last position only: compare from there on
    skipped = len(ids) - len(prompt_logits)
    full = full[skipped:]
    if onnx_logits.shape != full.shape:
        raise VerificationError(f"logits shapes differ: ONNX {list(onnx_logits.shape)}, reference {list(full.shape)} "
                                "(vocabulary size mismatch): the reference is not the model this export was made from.")
    errors = np.max(np.abs(onnx_logits - full), axis=-1)
    errors = np.where(np.isnan(errors), np.inf, errors)
    top1 = onnx_logits.argmax(-1) == full.argmax(-1)
    # Teacher-forced on the reference's tokens, onnxruntime's greedy choice after position S-1+k is argmax there;
    # its greedy run matches the reference exactly as long as these agree.
    s = len(ids) - skipped
    ort_choices = onnx_logits[s - 1: s - 1 + steps].argmax(-1).tolist()
    return PromptResult(ids=list(ids), prompt_error=float(errors[:s].max()),
                        decode_error=float(errors[s:].max()) if steps else 0.0,
                        worst_position=skipped + int(errors.argmax()), top1_matches=int(top1.sum()),
                        positions=int(top1.size),
                        reference_tokens=tokens, ort_greedy_prefix=common_prefix(ort_choices, tokens))


def verify(out_dir: str | Path, reference: str | None = None, prompt_ids: list[list[int]] | None = None,
           prompts: list[str] | None = None, steps: int = DEFAULT_STEPS, tolerance: float | None = None,
           min_top1: float | None = None, use_genai: bool = True, reference_dtype: str = "float32",
           cache_dir: str | None = None, warn=None) -> Report:
    """Measure an output folder against its reference checkpoint; never raises for a failed check (see Report).

    `warn(text)` is called at once for a runtime older than the export needs (the same text is a note in the report).
    """
    out_dir = Path(out_dir)
    info = describe_output(out_dir)
    reference = reference or info["source"]
    if not reference:
        raise UsageError(f"{out_dir} has no {MANIFEST} naming the checkpoint it was made from; pass --reference "
                         "HF_DIR_OR_ID.")
    if steps < 0:
        raise UsageError(f"--steps must be >= 0 (got {steps}).")
    # The runtime first: a model that cannot run here fails in a second, before transformers loads.
    runtime = installed_runtime("`ortbuild verify`")
    model_path = out_dir / info["filename"]
    providers, provider, notes = choose_providers(runtime, model_path, info["ep"], str(out_dir))
    too_old = version_warnings(runtime, info["requires"], model_path, info["ep"])
    for warning in too_old:
        (warn or (lambda text: None))(warning)
    notes += too_old
    config = json.loads((out_dir / "genai_config.json").read_text())
    if prompt_ids is None:
        prompt_ids = encode_prompts(list(prompts or DEFAULT_PROMPTS), out_dir, reference)
    vocab = config["model"].get("vocab_size")
    for i, ids in enumerate(prompt_ids, 1):
        if not ids:
            raise UsageError(f"prompt {i} is empty.")
        bad = [t for t in ids if t < 0 or (vocab and t >= vocab)]
        if bad:
            raise UsageError(f"prompt {i}: token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1}).")
    report = Report(output=str(out_dir), reference=str(reference), precision=info["precision"], ep=info["ep"],
                    provider=provider, steps=steps, policy=Policy.for_precision(info["precision"], tolerance, min_top1))
    report.notes += notes
    report.runtime = runtime.describe()
    if runtime.conflict_note():
        report.notes.append(runtime.conflict_note())
    model = load_reference(reference, reference_dtype, cache_dir)
    if reference_dtype != "float32":
        report.notes.append(f"reference run in {reference_dtype}, not float32: errors include the reference's own")
    decoder = _start_decoder(model_path, providers, runtime, report, str(out_dir), too_old)
    for ids in prompt_ids:
        try:
            report.prompts.append(compare_prompt(decoder, model, list(ids), steps, config))
        except Exception as exc:
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            raise _cannot_run(exc, info["ep"], decoder.session.get_providers(), str(out_dir), too_old) from exc
    del decoder
    _genai_compare(report, out_dir, config, steps, use_genai)
    return report


def _cannot_run(exc: Exception, ep: str, active: list[str], where: str, too_old: list[str]) -> Exception:
    """An onnxruntime failure while running: a cuda export on the CPU provider, or a runtime older than the export
    needs, cannot run here (exit 7); any other failure is the export's (exit 6)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if too_old:
        return RuntimeUnavailableError(f"onnxruntime cannot run {where} ({text}): {too_old[0]}")
    if ep == "cuda" and CUDA_EP not in active:
        return RuntimeUnavailableError(
            f"{where} was exported for CUDA and the CPU provider cannot run it ({text}); nothing was compared. Run "
            "the same command on a machine with an NVIDIA GPU and onnxruntime-gpu (pip install 'ortbuild[gpu]').")
    return VerificationError(f"onnxruntime failed running {where} on {', '.join(active)}: {text}")


def _start_decoder(model_path: Path, providers: list[str], runtime, report: Report, where: str,
                   too_old: list[str]) -> OnnxDecoder:
    """An OnnxDecoder on `providers`. onnxruntime-gpu lists the CUDA provider even where it cannot start (no GPU, no
    CUDA libraries) and then falls back to CPU, so the session's providers are checked, and a cuda export that fails
    to load on the CPU provider is reported as not runnable here rather than as a failed verification."""
    try:
        decoder = OnnxDecoder(model_path, providers)
    except VerificationError as exc:
        if too_old:
            raise RuntimeUnavailableError(f"{exc}: {too_old[0]}") from None
        if report.ep == "cuda" and CUDA_EP not in providers:
            raise RuntimeUnavailableError(f"{where} was exported for CUDA and the CPU provider cannot load it "
                                          f"({exc}); nothing was compared. Run the same command on a machine with an "
                                          "NVIDIA GPU and onnxruntime-gpu (pip install 'ortbuild[gpu]').") from None
        raise
    if CUDA_EP in providers and CUDA_EP not in decoder.session.get_providers():
        needs = cuda_only_features(model_path, report.ep)
        if needs:
            raise RuntimeUnavailableError(
                f"{where} needs the CUDA execution provider for: {'; '.join(needs)}. {runtime.describe()} lists it "
                "but it did not start (no NVIDIA GPU or driver, or missing CUDA libraries: onnxruntime's log says "
                "which); nothing was compared. Run it on a machine with a working GPU.")
        report.provider = "cpu"
        report.notes.append(f"{runtime.describe()} could not start the CUDA provider, so the model ran on the CPU "
                            "provider (it uses no CUDA-only feature)")
    return decoder


def _genai_compare(report: Report, out_dir: Path, config: dict, steps: int, use_genai: bool) -> None:
    try:
        import onnxruntime_genai as og
    except ImportError:
        return
    report.genai_installed = True
    if not use_genai or steps == 0:
        return
    eos = config["model"].get("eos_token_id")
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    try:
        model = og.Model(str(out_dir))
        runs = [genai_greedy(model, p.ids, steps) for p in report.prompts]
    except Exception as exc:  # genai raises RuntimeError with its own message for every failure
        text = str(exc).strip()
        report.genai_error = text.splitlines()[0] if text else type(exc).__name__
        return
    for p, tokens in zip(report.prompts, runs):
        p.genai_tokens = tokens
        p.genai_greedy_prefix = _genai_prefix(tokens, p.reference_tokens, eos_ids)
