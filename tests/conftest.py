"""Shared fixtures: tiny checkpoints built once per session per argument set (see tests/factory.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# Make `import factory` work from any test module, whether or not tests/ becomes a package later.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import factory  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run (CI must not turn red on a new random draw); a developer
# exploring can still run with `--hypothesis-profile explore`.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("ci")


def pytest_configure(config):
    # Registered here too so the markers exist even when pytest runs without pyproject's ini options.
    config.addinivalue_line("markers", "slow: longer end-to-end tests")
    config.addinivalue_line("markers", "genai: needs onnxruntime-genai")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(arch, **kwargs) -> Path``: ``factory.make_checkpoint`` cached for the session.

    The same arguments return the same folder (built once); treat it as read-only — copy it first if a test
    needs to modify files.  Keyword arguments are those of ``make_checkpoint`` plus config overrides.
    """
    import transformers

    transformers.utils.logging.disable_progress_bar()
    built: dict[str, Path] = {}

    def build(arch: str, **kwargs) -> Path:
        key = json.dumps([arch, kwargs], sort_keys=True, default=repr)
        if key not in built:
            out = tmp_path_factory.mktemp(f"ckpt-{arch}")
            built[key] = factory.make_checkpoint(arch, out, **kwargs)
        return built[key]

    return build
