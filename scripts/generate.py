#!/usr/bin/env python3
"""Generate text with an exported model folder through onnxruntime-genai (greedy by default).

    python scripts/generate.py out/tiny-qwen3 --prompt "The quick brown fox" --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--prompt", default="The quick brown fox")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    try:
        import onnxruntime_genai as og
    except ImportError:
        print("onnxruntime-genai is not installed: pip install onnxruntime-genai", file=sys.stderr)
        return 2
    model = og.Model(args.model_dir)
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
    print(f"prompt:    {args.prompt!r} ({len(ids)} tokens)")
    print(f"generated: {tokenizer.decode(new_tokens)!r} ({len(new_tokens)} tokens: {new_tokens})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
