"""Error classes, one per failure class, each with its own process exit code.

Batch users script around exit codes, so every class of failure maps to a distinct, documented code.
Messages say what went wrong, where, and how to fix it; the CLI prints them without a traceback.
"""


class OrtBuildError(Exception):
    exit_code = 1
    kind = "error"


class UsageError(OrtBuildError):
    """Bad command line or extra option."""

    exit_code = 2
    kind = "usage error"


class UnsupportedModelError(OrtBuildError):
    """An architecture or config feature we do not export."""

    exit_code = 3
    kind = "unsupported model"


class CheckpointError(OrtBuildError):
    """The checkpoint is missing, corrupt, unsafe or inconsistent with its config."""

    exit_code = 4
    kind = "bad checkpoint"


class OutputError(OrtBuildError):
    """The output folder cannot be written (exists, unwritable, disk full)."""

    exit_code = 5
    kind = "I/O error"


class VerificationError(OrtBuildError):
    """`ortbuild verify` measured errors past the tolerance."""

    exit_code = 6
    kind = "verification failed"


class RuntimeUnavailableError(OrtBuildError):
    """The model cannot run with the runtime installed here (no onnxruntime, or a CUDA export without the CUDA
    execution provider). Not a failed verification: nothing was compared. Run it where the runtime is."""

    exit_code = 7
    kind = "cannot run here"


ERRORS = (UsageError, UnsupportedModelError, CheckpointError, OutputError, VerificationError, RuntimeUnavailableError)
EXIT_CODES = {cls.kind: cls.exit_code for cls in ERRORS}
INTERRUPTED, TERMINATED = 130, 143  # Ctrl-C (128 + SIGINT), SIGTERM (128 + SIGTERM)
