#!/usr/bin/env python
"""Export a model zoo: the same as `ortbuild batch ZOO_FILE [--jobs N] [--out-root DIR] [--verify] ...`.

Kept as a script for pipelines that call scripts rather than the console entry point; see builder/batch.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from builder.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["batch", *sys.argv[1:]])
