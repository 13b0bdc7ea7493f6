"""The ONNX Runtime installed here and what it can run: its package (onnxruntime or onnxruntime-gpu), version and
execution providers, and the parts of an exported graph that only the CUDA execution provider runs.

Read by `ortbuild verify`, `ortbuild batch --verify` and scripts/generate.py. Exporting never imports onnxruntime,
which is why it is an extra (`ortbuild[cpu]` or `ortbuild[gpu]`), not a dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from builder.errors import RuntimeUnavailableError

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"
INSTALL_HINT = ("install one runtime: pip install 'ortbuild[cpu]' (onnxruntime, CPU) or pip install 'ortbuild[gpu]' "
                "(onnxruntime-gpu, NVIDIA GPUs with CUDA; it runs cpu exports too)")
# Distributions that install the `onnxruntime` module. They share one folder: with two installed, the last one
# installed wins (the usual way to lose the CUDA provider).
RUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                         "onnxruntime-qnn")


@dataclass(frozen=True)
class Runtime:
    package: str  # the distribution, e.g. onnxruntime-gpu ("onnxruntime" when unknown)
    version: str
    providers: tuple[str, ...]
    also_installed: tuple[str, ...] = ()  # other runtime distributions sharing the `onnxruntime` folder

    @property
    def has_cuda(self) -> bool:
        return CUDA_EP in self.providers

    def describe(self) -> str:
        eps = ", ".join(p.removesuffix("ExecutionProvider") for p in self.providers)
        return f"{self.package} {self.version} ({eps})"

    def conflict_note(self) -> str | None:
        if not self.also_installed:
            return None
        names = ", ".join((self.package, *self.also_installed))
        return (f"{names} are all installed; they write the same onnxruntime folder and the last one installed wins. "
                "Uninstall them all and reinstall one (pip install 'ortbuild[cpu]' or 'ortbuild[gpu]').")


def installed_distributions() -> list[str]:
    """Installed distributions that provide the `onnxruntime` module, by name."""
    found = []
    for name in RUNTIME_DISTRIBUTIONS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def installed_runtime(purpose: str = "running an exported model") -> Runtime:
    """The importable onnxruntime, or RuntimeUnavailableError saying which extra to install."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeUnavailableError(f"{purpose} needs ONNX Runtime, which is not installed (exporting does not); "
                                      f"{INSTALL_HINT}.") from None
    dists = installed_distributions()
    # With several installed, the one whose version matches the module is the one whose files won.
    matching = [d for d in dists if metadata.version(d) == ort.__version__]
    package = (matching or dists or ["onnxruntime"])[0]
    if CUDA_EP in ort.get_available_providers() and "onnxruntime-gpu" in matching:
        package = "onnxruntime-gpu"
    others = tuple(d for d in dists if d != package)
    return Runtime(package, ort.__version__, tuple(ort.get_available_providers()), others)


# ----------------------------------------------------------------------------------------- what needs CUDA


_GQA_NORM_INPUTS = (14, 15)  # GroupQueryAttention q_norm_weight, k_norm_weight


def cuda_only_features(model_path: Path, ep: str) -> list[str]:
    """What in this graph only the CUDA execution provider runs (empty: the CPU provider can run it).

    Reads the graph structure only (no weights). `ep` is the provider the model was exported for; it matters for
    QMoE, whose expert bytes are in the CUDA prepacked layout unless exported with qmoe_weights_prepacked=0.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    found = []
    if any(n.op_type == "GroupQueryAttention" and any(len(n.input) > i and n.input[i] for i in _GQA_NORM_INPUTS)
           for n in graph.node):
        found.append("GroupQueryAttention with fused q/k norm (q_norm_weight/k_norm_weight inputs; the CPU kernel "
                     "rejects them)")
    bf16 = onnx.TensorProto.BFLOAT16
    if any(v.type.tensor_type.elem_type == bf16 for v in [*graph.input, *graph.output]) or \
            any(t.data_type == bf16 for t in graph.initializer):
        found.append("bfloat16 tensors (the CPU kernels of MatMul and attention have no bfloat16)")
    if any(n.op_type == "MatMulNBits" and any(a.name == "weight_prepacked" and a.i for a in n.attribute)
           for n in graph.node):
        found.append("MatMulNBits weights in the CUDA prepacked (fpA_intB) layout (the CPU kernel would read them as "
                     "raw weights)")
    if ep == "cuda":
        for node in graph.node:
            if node.op_type != "QMoE":
                continue
            attrs = {a.name: a.i for a in node.attribute}
            if attrs.get("weights_prepacked", 1) != 0:
                found.append("QMoE experts in the CUDA prepacked (SM80 CUTLASS) layout (the CPU kernel would read them "
                             "as raw weights)")
                break
    return found


def choose_providers(runtime: Runtime, model_path: Path, ep: str, where: str) -> tuple[list[str], str, list[str]]:
    """(providers for InferenceSession, the provider that runs the model, notes) for an export made for `ep`.

    A cuda export runs on the CUDA provider when this onnxruntime has it. Without it, an export the CPU provider can
    run (no CUDA-only feature) runs there with a note; one it cannot run raises RuntimeUnavailableError saying what
    needs CUDA and where to run it instead.
    """
    if ep != "cuda":
        return [CPU_EP], "cpu", []
    if runtime.has_cuda:
        return [CUDA_EP, CPU_EP], "cuda", []
    needs = cuda_only_features(model_path, ep)
    if needs:
        raise RuntimeUnavailableError(
            f"{where} was exported for CUDA (-e cuda) and needs the CUDA execution provider for: {'; '.join(needs)}. "
            f"This machine's {runtime.describe()} has no CUDA provider, so nothing was compared. Run the same command "
            "on a machine with an NVIDIA GPU and onnxruntime-gpu (pip install 'ortbuild[gpu]'), or re-export with "
            "-e cpu to check the weights here.")
    return [CPU_EP], "cpu", [f"the model was exported for cuda but {runtime.describe()} has no CUDA provider, so it "
                             "ran on the CPU provider (it uses no CUDA-only feature)"]


# ------------------------------------------------------------------------------------------ versions


def installed_genai_version() -> str | None:
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    return getattr(og, "__version__", None)


def version_warnings(runtime: Runtime, requires: dict | None, model_path: Path, ep: str) -> list[str]:
    """Warnings when the installed onnxruntime / onnxruntime-genai is older than the export needs. `requires` comes
    from ortbuild.json; an export made by another tool has none, so it is derived from its graph here."""
    from builder.runtime_requirements import older_than_required, onnx_nodes, requirements

    if not requires:
        import json

        import onnx

        try:
            config = json.loads((model_path.parent / "genai_config.json").read_text())
            genai_type = config["model"]["type"]
            genai_keys = list(config["model"]["decoder"].get("inputs", {}))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            genai_type, genai_keys = "decoder", []
        graph = onnx.load(str(model_path), load_external_data=False).graph
        requires = requirements(onnx_nodes(graph), ep, genai_type, genai_keys)
    return older_than_required(requires, {"onnxruntime": runtime.version,
                                          "onnxruntime-genai": installed_genai_version()})
