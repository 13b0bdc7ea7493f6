#!/usr/bin/env python3
"""Generate text with an exported model folder through onnxruntime-genai (greedy by default).

    python scripts/generate.py out/tiny-qwen3 --prompt "The quick brown fox" --max-new-tokens 16

Exit codes follow ortbuild's: 2 usage, 5 not an exported model folder, 7 cannot run here (onnxruntime-genai missing,
or a CUDA export without onnxruntime-genai's CUDA support).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NOT_AN_EXPORT, CANNOT_RUN_HERE = 5, 7
INSTALL = ("pip install 'ortbuild[cpu]' (onnxruntime-genai, CPU) or pip install 'ortbuild[gpu]' "
           "(onnxruntime-genai-cuda, NVIDIA GPUs)")


def fail(code: int, message: str) -> int:
    print(f"generate.py: {message}", file=sys.stderr)
    return code


def export_ep(model_dir: Path) -> str | None:
    """The provider an export was made for ("cuda" or "cpu"), from its genai_config.json; None if not an export."""
    try:
        config = json.loads((model_dir / "genai_config.json").read_text())
        providers = config["model"]["decoder"].get("session_options", {}).get("provider_options", [])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return "cuda" if any("cuda" in entry for entry in providers) else "cpu"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--prompt", default="The quick brown fox")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    model_dir = Path(args.model_dir)
    ep = export_ep(model_dir)
    if ep is None:
        what = "does not exist" if not model_dir.exists() else "has no readable genai_config.json"
        return fail(NOT_AN_EXPORT, f"{model_dir} {what}: pass the -o folder of an `ortbuild` export.")
    try:
        import onnxruntime_genai as og
    except ImportError:
        return fail(CANNOT_RUN_HERE, f"onnxruntime-genai is not installed; {INSTALL}.")
    if ep == "cuda" and not og.is_cuda_available():
        return fail(CANNOT_RUN_HERE, f"{model_dir} was exported for CUDA (-e cuda), and this onnxruntime-genai "
                                     f"{og.__version__} has no CUDA support. Run it on a machine with an NVIDIA GPU "
                                     "and pip install 'ortbuild[gpu]' (onnxruntime-genai-cuda), or re-export with "
                                     "-e cpu.")
    try:
        model = og.Model(str(model_dir))
    except Exception as exc:  # genai reports every load failure as RuntimeError with its own text
        return fail(CANNOT_RUN_HERE if ep == "cuda" else NOT_AN_EXPORT,
                    f"onnxruntime-genai {og.__version__} cannot load {model_dir} ({ep} export): "
                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(args.prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + args.max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    new_tokens = []
    while not generator.is_done() and len(new_tokens) < args.max_new_tokens:
        generator.generate_next_token()
        new_tokens.append(int(generator.get_next_tokens()[0]))
    cuda = "CUDA and CPU" if og.is_cuda_available() else "CPU only"
    print(f"model:     {model_dir} ({ep} export; onnxruntime-genai {og.__version__}, {cuda})")
    print(f"prompt:    {args.prompt!r} ({len(ids)} tokens)")
    print(f"generated: {tokenizer.decode(new_tokens)!r} ({len(new_tokens)} tokens: {new_tokens})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
