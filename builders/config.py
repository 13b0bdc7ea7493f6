"""Typed, checked reads of a Hugging Face config: the one way family modules read config fields.

A bare `config["hidden_size"]` turns a missing or ill-typed field into a KeyError/TypeError traceback; every read
here fails instead with the documented exit code, the field, the architecture and the file:
    missing required field, wrong type or impossible value  -> CheckpointError (exit 4: the config is broken)
    a value the exporter does not compute (choices, reject)   -> UnsupportedModelError (exit 3)

    cfg = Config(config, "Qwen3ForCausalLM")
    hidden = cfg.int("hidden_size")                      # required
    dim = cfg.int("head_dim", None) or hidden // heads   # optional: missing or null -> the default
    act = cfg.str("hidden_act", "silu", choices=("silu",))
    rope = cfg.sub("rope_parameters")                    # a nested object, read the same way
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from builder.errors import CheckpointError, UnsupportedModelError

_REQUIRED = object()


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


class Config:
    """A read-only view of one config object (the text part for multimodal checkpoints)."""

    REQUIRED = _REQUIRED  # the default that makes a field required (for reads driven by a table)

    def __init__(self, data: dict, architecture: str, where: str = "config.json", path: str = ""):
        if not isinstance(data, dict):
            raise CheckpointError(f"{architecture}: {where} {path.rstrip('.') or 'content'} is {_kind(data)}, "
                                  "expected an object of model settings.")
        self.data = data
        self.architecture = architecture
        self.where = where  # the file, for messages
        self.path = path  # "rope_parameters." for a nested object

    # -- plumbing ------------------------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return self.data.get(key) is not None

    def keys(self) -> list[str]:
        """The fields that are set (not null)."""
        return [key for key, value in self.data.items() if value is not None]

    def updated(self, **fields: Any) -> "Config":
        """A copy with `fields` replaced (defaults a family fills in the way transformers' config class does)."""
        return Config({**self.data, **fields}, self.architecture, self.where, self.path)

    def _field(self, key: str) -> str:
        return f"{self.architecture}: {self.where} field '{self.path}{key}'"

    def _raw(self, key: str, default: Any) -> Any:
        value = self.data.get(key)
        if value is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{self._field(key)} is missing (or null); this architecture needs it. The "
                                      "checkpoint's config is incomplete: re-download it or add the field.")
            return default
        return value

    def bad(self, key: str, value: Any, expected: str) -> CheckpointError:
        """The error for a field whose value cannot be right (for checks a family does itself)."""
        return CheckpointError(f"{self._field(key)} is {value!r} ({_kind(value)}); expected {expected}. Fix the "
                               "checkpoint's config.")

    def unsupported(self, key: str, value: Any, supported: str = "", *, why: str = "") -> UnsupportedModelError:
        """The error for a valid value that changes the maths in a way this exporter does not compute: the values
        that are supported, or why not."""
        return UnsupportedModelError(f"{self._field(key)}={value!r} is not supported "
                                     f"({why or f'supported: {supported}'}).")

    # -- scalars -------------------------------------------------------------------------------------------------
    def int(self, key: str, default: Any = _REQUIRED, *, minimum: int | None = None) -> Any:
        value = self._raw(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.bad(key, value, "an integer")
        if minimum is not None and value < minimum:
            raise self.bad(key, value, f"an integer >= {minimum}")
        return value

    def float(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._raw(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.bad(key, value, "a finite number")
        return float(value)

    def bool(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._raw(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if not isinstance(value, bool):
            raise self.bad(key, value, "true or false")
        return value

    def str(self, key: str, default: Any = _REQUIRED, *, choices: Iterable[str] | None = None) -> Any:
        value = self._raw(key, default)
        if not isinstance(value, str):
            if value is default and default is not _REQUIRED:
                return value
            raise self.bad(key, value, "a string")
        if choices is not None and value not in tuple(choices):
            raise self.unsupported(key, value, ", ".join(map(repr, choices)))
        return value

    # -- containers ----------------------------------------------------------------------------------------------
    def list(self, key: str, default: Any = _REQUIRED, *, of: type | None = None, length: int | None = None) -> Any:
        value = self._raw(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if not isinstance(value, list):
            raise self.bad(key, value, "a list")
        if of is not None:
            allowed = (int, float) if of is float else of
            if any((isinstance(v, bool) and of is not bool) or not isinstance(v, allowed) for v in value):
                raise self.bad(key, value, f"a list of {of.__name__} values")
        if length is not None and len(value) != length:
            raise self.bad(key, value, f"a list of {length} entries")
        return list(value)

    def dict(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._raw(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if not isinstance(value, dict):
            raise self.bad(key, value, "an object")
        return value

    def sub(self, key: str, default: Any = _REQUIRED) -> "Config | Any":
        """A nested object as a Config (errors name the path, e.g. rope_parameters.factor)."""
        value = self.dict(key, default)
        if value is default and default is not _REQUIRED:
            return value
        return Config(value, self.architecture, self.where, f"{self.path}{key}.")

    def reject(self, fields: dict[str, Any]) -> None:
        """Refuse fields that change the maths when set to anything but the value we implement (null is fine)."""
        for key, supported in fields.items():
            value = self.data.get(key)
            if value is not None and value != supported:
                raise self.unsupported(key, value, repr(supported))
