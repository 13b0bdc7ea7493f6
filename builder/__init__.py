"""ortbuild: Hugging Face checkpoints -> ONNX Runtime decoder models, streamed and verified."""

__version__ = "0.1.0"
