"""The output folder: written whole into a sibling temporary folder and renamed into place only on success.

A failed or interrupted export removes its temporary folder and never touches an existing output.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

import onnx_ir as ir

from builder.errors import OutputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", "config.json")
EXTERNAL_DATA_SUFFIX = ".data"


def check_destination(output: Path, overwrite: bool) -> None:
    """Refuse a non-empty output folder (unless overwrite) before any work starts."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"output path {output} exists and is not a folder (--overwrite only replaces folders). "
                          "Remove the file or choose another -o.")
    try:
        non_empty = output.is_dir() and any(output.iterdir())
    except OSError as exc:
        raise OutputError(f"cannot list output folder {output}: {exc.strerror}. Choose another -o.") from None
    if non_empty and not overwrite:
        raise OutputError(f"output folder {output} exists and is not empty. Pass --overwrite to replace it, or choose "
                          "another -o.")
    parent = output.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"cannot write {output}: {parent} is a file, not a folder. Choose another -o.")
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"cannot create {parent} for -o {output}: {exc.strerror}. Choose a writable -o.") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write to {parent} (permission denied). Choose a writable -o.")


def weight_bytes(model: ir.Model) -> int:
    """Bytes of every initializer (what the external data file and model.onnx will hold, within a few KB)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values())


def check_free_space(model: ir.Model, output: Path) -> None:
    """Refuse an export whose weights cannot fit on -o's disk, before a byte is written. The new folder is written
    whole beside `output` (an existing one, with --overwrite, stays until the new one is complete), so the weights'
    size must be free on the output's file system."""
    need = weight_bytes(model)
    parent = output.resolve().parent
    free = shutil.disk_usage(parent).free
    if need > free:
        raise OutputError(f"not enough disk space for {output}: the model's weights take {need / 2**20:.1f} MiB "
                          f"({need} bytes) and {parent} has {free / 2**20:.1f} MiB free. Free space or choose another "
                          "-o.")


def _describe_oserror(exc: OSError, where: Path) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(f"disk full while writing {where}. Free space (other writers filled the disk after the "
                           "export checked it had room for the weights) or choose another -o.")
    return OutputError(f"cannot write {where}: {exc.strerror or exc}. Check that -o is on a writable disk, or choose "
                       "another -o.")


@contextmanager
def atomic_folder(output: Path, overwrite: bool):
    """Yield a temporary folder beside `output`; on success it replaces `output`, on any failure it is removed."""
    output = Path(output)
    check_destination(output, overwrite)
    # os.mkdir (not tempfile.mkdtemp, which makes 0700 folders) so the renamed output gets the usual umask mode.
    tmp = output.resolve().parent / f".{output.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise _describe_oserror(exc, output) from None
    try:
        yield tmp
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            output.rename(old)
            try:
                tmp.rename(output)
            except BaseException:
                old.rename(output)  # put the previous good output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _describe_oserror(exc, output) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# glibc malloc parameters (mallopt): M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX; their defaults.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
_REUSE = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 64 << 20, _M_ARENA_MAX: 1}
_DEFAULTS = {_M_MMAP_THRESHOLD: 128 << 10, _M_TRIM_THRESHOLD: 128 << 10, _M_TOP_PAD: 128 << 10, _M_ARENA_MAX: 0}


@contextmanager
def reuse_block_memory():
    """While weights stream, keep freed row-block buffers in the heap for the next block (glibc only).

    Every block allocates the same few multi-MB numpy temporaries; by default glibc maps each one fresh and unmaps
    it on free, so every block page-faults its memory in again: on the 1.5 GB Qwen3 probe that was ~4 s of system
    time out of ~12 s CPU. Reusing heap memory cuts it to ~1 s; RSS keeps the (bounded) block working set.
    Arrays of 32 MB or more (whole-tensor transposes) are still mapped and returned on free. One arena for all
    threads: with one per worker thread each kept its own free blocks and peak RSS wandered by +-80 MB run to run
    (GPT-OSS probe: 240-400 MB; one arena: 250-265 MB; the few large allocations hardly contend).
    The defaults are put back afterwards (thresholds fixed, not adaptive) and the heap trimmed, so a long-lived
    caller gets its memory back; glibc fixes the arena limit the first time a thread needs an arena, so in a
    process whose first worker threads start during an export the single arena stays.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to tune
        yield
        return
    for param, value in _REUSE.items():
        mallopt(param, value)
    try:
        yield
    finally:
        for param, value in _DEFAULTS.items():
            mallopt(param, value)
        malloc_trim(0)


EXTERNAL_THRESHOLD = 1024  # tensors larger than this go to the external data file; smaller ones stay in model.onnx


def save_model(model: ir.Model, folder: Path, filename: str, progress=None) -> None:
    """model.onnx + one external data file, tensors written sequentially in graph order, one at a time."""
    data = filename + EXTERNAL_DATA_SUFFIX
    callback = None
    if progress is not None:
        sizes = [v.const_value.nbytes for v in model.graph.initializers.values()]
        progress.begin_weights(sum(n for n in sizes if n > EXTERNAL_THRESHOLD), folder / data)
        callback = progress.save_callback
    try:
        with reuse_block_memory():
            ir.save(model, folder / filename, external_data=data, size_threshold_bytes=EXTERNAL_THRESHOLD,
                    callback=callback)
    finally:
        if progress is not None:
            progress.end_weights()


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=4) + "\n")


def copy_tokenizer(source: Path, folder: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
            copied.append(name)
    return copied
