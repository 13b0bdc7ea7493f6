"""Checkpoint: a lazy view of a Hugging Face safetensors checkpoint (local folder or Hub cache, single or sharded).

Tensors are never loaded whole unless asked: a TensorRef reads any range of rows straight from the file into a
numpy buffer, so memory holds only the rows being converted (no mmap that grows with the page cache, no torch).
The checkpoint also records which tensors were consumed, so a family mapping that forgets a tensor fails loudly.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from builder.errors import CheckpointError

_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
    "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu,  # power-of-two block scales (UE8M0)
}
# 8-bit float weights carry separate scales (builder/fp8.py): reading one as plain floats would drop them
_SCALED_DTYPES = ("F8_E4M3", "F8_E5M2")

_MAX_HEADER = 100 * 1024 * 1024
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]


@dataclass(frozen=True)
class TensorRef:
    """One tensor inside one safetensors file; reads rows on demand."""

    name: str
    path: Path
    dtype: str  # safetensors dtype tag, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(_DTYPES[self.dtype])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.numpy_dtype.itemsize

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start:stop) along axis 0 in the stored dtype (a 0-d/1-d tensor reads whole when stop is None)."""
        shape = self.shape or (1,)
        stop = shape[0] if stop is None else min(stop, shape[0])
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        itemsize = self.numpy_dtype.itemsize
        count = (stop - start) * row_items * itemsize
        # Read straight into a writable numpy buffer (no bytes object to copy from), looping because one read()
        # returns at most ~2 GiB on Linux; each call opens its own descriptor, so threads may read side by side.
        data = np.empty(count, np.uint8)
        view, done = memoryview(data), 0
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.offset + start * row_items * itemsize)
                while done < count:
                    got = f.readinto(view[done:])
                    if not got:
                        break
                    done += got
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read tensor {self.name} ({exc.strerror or exc}). Check that the "
                                  "checkpoint files are still there and readable.") from None
        if done != count:
            raise CheckpointError(f"{self.path.name}: tensor {self.name} is truncated (wanted {count} bytes at offset "
                                  f"{self.offset}, file ended early). Re-download the file.")
        array = data.view(self.numpy_dtype).reshape((stop - start, *shape[1:]))
        return array if self.shape else array.reshape(())

    def read_float(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows as float32 (bf16/fp16 widen exactly; float32 data is returned as read, without a copy)."""
        if self.dtype in _SCALED_DTYPES:
            raise CheckpointError(f"{self.path.name}: tensor {self.name} is {self.dtype}, an 8-bit float weight "
                                  "whose values need their scales; this architecture's mapping reads it as plain "
                                  "floats. Export a bf16 copy of the checkpoint, or use a family that reads FP8.")
        return self.read(start, stop).astype(np.float32, copy=False)


def read_header(path: Path) -> dict[str, TensorRef]:
    """Parse one safetensors file's header, checking that every tensor lies inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {len(prefix)} bytes). Re-download it.")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER or header_len + 8 > size:
                raise CheckpointError(f"{path}: corrupt safetensors header (header length {header_len}, file size "
                                      f"{size}). The file is truncated or not safetensors; re-download it.")
            header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc}). Re-download the file.") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror}).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object "
                              "mapping tensor names to dtype/shape/offsets). Re-download the file.")
    header.pop("__metadata__", None)
    base = 8 + header_len
    refs = {}
    for name, info in header.items():
        try:
            dtype = info.get("dtype")
            start, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError):
            raise CheckpointError(f"{path}: corrupt safetensors header: the entry for tensor {name!r} lacks a valid "
                                  f"dtype/shape/data_offsets ({str(info)[:80]}). Re-download the file.") from None
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name} has dtype {dtype}, which ortbuild cannot read "
                                  f"(readable: {', '.join(_DTYPES)}).")
        ref = TensorRef(name, path, dtype, shape, base + start)
        if min(shape, default=0) < 0 or start < 0 or end - start != ref.nbytes:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name} (shape {list(shape)}, {dtype}) "
                                  f"has data_offsets [{start}, {end}], which do not fit its shape. Re-download the file.")
        if base + end > size:
            raise CheckpointError(f"{path.name}: tensor {name} (shape {list(ref.shape)}, {dtype}) extends past the end "
                                  f"of the file ({size} bytes): the file is truncated. Re-download it.")
        refs[name] = ref
    return refs


class Checkpoint:
    """A folder holding config.json and safetensors weights (single file or sharded with an index)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.config = self._read_config()
        self._refs = self._index_tensors()
        self._consumed: set[str] = set()
        self._skipped: dict[str, set[str]] = {}  # reason -> tensors left out on purpose

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def resolve(cls, model: str, input_dir: str | None = None, cache_dir: str | None = None) -> "Checkpoint":
        """`-i` folder, else `-m` as a local folder, else `-m` as a Hub id (download or cache, HF_HUB_OFFLINE)."""
        if input_dir:
            folder = Path(input_dir)
            if not folder.is_dir():
                raise CheckpointError(f"input folder {folder} does not exist (-i/--input).")
            return cls(folder)
        path = Path(model).expanduser()
        if path.is_dir():
            return cls(path)
        if path.exists():
            raise CheckpointError(f"-m {model}: is a file, not a folder. Point -m at the folder holding the "
                                  "checkpoint's config.json and *.safetensors files, or give a Hub id (owner/name).")
        if looks_like_path(model):
            raise CheckpointError(f"-m {model}: no such folder ({path.resolve()} does not exist). Check the path; a "
                                  "Hub id has the form owner/name.")
        local = path.parent if len(path.parts) > 1 and path.parent.is_dir() else None
        try:
            return cls(download(model, cache_dir))
        except CheckpointError as exc:
            if local is None:
                raise
            hub = str(exc).removeprefix(model + ": ")
            raise CheckpointError(f"-m {model}: no such folder (there is a folder {local}, but it holds no "
                                  f"{path.name}), and as a Hub id: {hub}") from exc.__cause__

    def _read_config(self) -> dict:
        path = self.folder / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{self.folder}: no config.json. Point -m/-i at the folder holding the checkpoint's "
                                  "config.json and *.safetensors files.")
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: invalid JSON ({exc}). Re-download the checkpoint's config.json.") from None
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc.strerror}).") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: expected a JSON object of model settings, found a JSON "
                                  f"{type(config).__name__}. Re-download the checkpoint's config.json.")
        return config

    def _index_tensors(self) -> dict[str, TensorRef]:
        index_path = self.folder / "model.safetensors.index.json"
        refs: dict[str, TensorRef] = {}
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text()).get("weight_map", {})
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc}). Re-download it.") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard file names. "
                                      "Re-download it.")
            headers = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = self.folder / shard
                if not shard_path.is_file():
                    raise CheckpointError(f"{index_path.name} lists shard {shard}, which is missing from "
                                          f"{self.folder}. Download every shard of the checkpoint.")
                headers[shard] = read_header(shard_path)
            for name, shard in weight_map.items():
                if name not in headers[shard]:
                    raise CheckpointError(f"tensor {name} missing from {shard} (index says it is there). The "
                                          "checkpoint is incomplete or its index is stale; re-download it.")
                refs[name] = headers[shard][name]
            return refs
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(p.name for p in self.folder.glob("*.pt"))
            if pickles:
                raise CheckpointError(
                    f"{self.folder} holds only pickle weights ({', '.join(pickles[:3])}), which can execute code when "
                    "loaded; ortbuild refuses them. Convert the checkpoint to safetensors first "
                    "(transformers: model.save_pretrained(dir, safe_serialization=True)).")
            raise CheckpointError(f"{self.folder}: no *.safetensors weights found. Point -m/-i at the folder that holds "
                                  "the checkpoint's weights (a Hub download may have been interrupted).")
        for path in files:
            refs.update(read_header(path))
        return refs

    # -- access ------------------------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) and a for a in archs):
            raise CheckpointError(f"{self.folder / 'config.json'}: 'architectures' is {archs!r}; expected a list of "
                                  'model class names, e.g. "architectures": ["LlamaForCausalLM"]. Fix the config.')
        if not archs:
            raise CheckpointError(f"{self.folder / 'config.json'} has no 'architectures' entry; cannot tell which "
                                  "model this is. Add the model class transformers saves there, e.g. "
                                  '"architectures": ["LlamaForCausalLM"].')
        return archs[0]

    @property
    def remote_code(self) -> list[str]:
        """The auto_map entries of config.json: the checkpoint's own modelling code (trust_remote_code), which
        ortbuild never imports; builders.checkpoint_family decides whether the architecture is exported anyway."""
        auto_map = self.config.get("auto_map")
        return sorted(auto_map) if isinstance(auto_map, dict) else ([str(auto_map)] if auto_map else [])

    def names(self) -> list[str]:
        return sorted(self._refs)

    def has(self, name: str) -> bool:
        return name in self._refs

    def tensor(self, name: str) -> TensorRef:
        ref = self._refs.get(name)
        if ref is None:
            raise CheckpointError(f"{self.architecture}: tensor {name} missing from the checkpoint in {self.folder} "
                                  "(the config implies it). The checkpoint is incomplete or does not match its config.")
        self._consumed.add(name)
        return ref

    def ignore(self, *names: str, reason: str) -> None:
        """Leave tensors out on purpose (e.g. a vision tower when exporting the text decoder), saying why: the
        reasons and names are reported (see skipped); anything else nobody used is an error."""
        present = {n for n in names if n in self._refs}
        self._consumed.update(present)
        if present:
            self._skipped.setdefault(reason, set()).update(present)

    def skipped(self) -> dict[str, list[str]]:
        """reason -> sorted names of the tensors left out on purpose."""
        return {reason: sorted(names) for reason, names in self._skipped.items()}

    def unconsumed(self) -> list[str]:
        return sorted(set(self._refs) - self._consumed)

    def read_json(self, filename: str) -> dict | None:
        path = self.folder / filename
        return json.loads(path.read_text()) if path.is_file() else None


def looks_like_path(model: str) -> bool:
    """A -m value that can only be a path: starts with . / ~, has a backslash, or more than one / (owner/name)."""
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1


def download(repo_id: str, cache_dir: str | None) -> Path:
    """Resolve a Hub id to a local snapshot: only config, tokenizer and safetensors files; honours HF_HUB_OFFLINE.

    A failure says its real cause (offline, no such repository, gated, network) and chains the Hub's exception, so
    `-v` shows it.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError("huggingface_hub is not installed; pass a local folder with -m or -i.") from None
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # huggingface_hub raises many kinds; hub_failure tells them apart
        raise CheckpointError(f"{repo_id}: {hub_failure(exc, repo_id, cache_dir)}") from exc


def _root_cause(exc: BaseException) -> BaseException:
    seen = set()
    while (exc.__cause__ or exc.__context__) is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return exc


def hub_failure(exc: Exception, repo_id: str, cache_dir: str | None) -> str:
    """Why a Hub download failed, and what to do, in one sentence."""
    from huggingface_hub import constants, is_offline_mode
    from huggingface_hub import errors as hub

    cache = cache_dir or constants.HF_HUB_CACHE
    local = " Or pass a local checkpoint folder with -m/-i."
    if isinstance(exc, hub.GatedRepoError):
        return (f"the model is gated on the Hugging Face Hub. Accept its terms at https://huggingface.co/{repo_id} and "
                "log in (hf auth login, or set HF_TOKEN)." + local)
    if isinstance(exc, hub.RepositoryNotFoundError):
        return ("no such model on the Hugging Face Hub (or it is private: log in with hf auth login, or set HF_TOKEN). "
                "Check the id (owner/name)." + local)
    if isinstance(exc, hub.RevisionNotFoundError):
        return f"the Hub has no such revision of this model ({exc})." + local
    if isinstance(exc, hub.LocalEntryNotFoundError):
        if is_offline_mode():
            return (f"not in the Hugging Face cache {cache}, and HF_HUB_OFFLINE is set, so nothing is downloaded. "
                    "Download it once with HF_HUB_OFFLINE unset, or pass -c with the cache that holds it." + local)
        cause = _root_cause(exc)
        why = f"{type(cause).__name__}: {cause}" if cause is not exc else str(exc).splitlines()[0]
        return (f"cannot reach the Hugging Face Hub ({why}) and the model is not in the cache {cache}. Check the "
                "network (or HF_ENDPOINT / proxy settings)." + local)
    if isinstance(exc, hub.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "an error")
        return f"the Hugging Face Hub answered {status}: {str(exc).splitlines()[0]}." + local
    if isinstance(exc, OSError) and not isinstance(exc, hub.EntryNotFoundError):
        return f"cannot write the download to {cache} ({type(exc).__name__}: {exc}). Choose another cache with -c."
    return f"could not fetch from the Hugging Face Hub ({type(exc).__name__}: {exc})." + local
