"""Opening a llama.cpp GGUF file and reading its metadata: the part of ``minisdpo.convert`` that
its weights side and its tokenizer side (``minisdpo.gguf_tokenizer``) share.

``open_gguf`` checks that the file is a complete little-endian GGUF file before anything else
reads it; ``read_field`` and ``read_int_field`` read one metadata value. Every problem is a
``ConvertError`` (``minisdpo.convert.ConvertError``, the same class) naming the file and the
problem.
"""
from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np
from gguf import GGUFReader   # minisdpo.convert says how to install it when it is missing

__all__ = ["ConvertError", "open_gguf", "read_field", "read_int_field", "float32_value", "GGUF_MAGIC"]

GGUF_MAGIC = b"GGUF"


class ConvertError(ValueError):
    """A GGUF file that cannot be converted as it is; the message names the file and the problem."""


_MISSING = object()


def open_gguf(path: str) -> GGUFReader:
    """A reader over ``path``, after checking that it is a complete GGUF file."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ConvertError(f"{path}: not a GGUF file (its first bytes are {magic!r}, not {GGUF_MAGIC!r})")
    try:
        reader = GGUFReader(path)
    # The reader walks the header with numpy views of a memory map: a cut or corrupt file shows
    # up as whichever of these the first bad read raises.
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
    if reader.byte_order != "I":
        # The reader swaps plain arrays, but not the float16 scales inside quantised blocks.
        raise ConvertError(f"{path}: GGUF file of the other byte order (big-endian) is not supported")
    size = os.path.getsize(path)
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ConvertError(f"{path}: truncated GGUF file: tensor {t.name!r} ends at byte {end}, "
                               f"the file has {size} bytes")
    return reader


def read_field(reader: GGUFReader, key: str, path: str, default: Any = _MISSING) -> Any:
    """The value of metadata ``key``; ``default`` when the file lacks it (none given: an error)."""
    entry = reader.get_field(key)
    if entry is None:
        if default is _MISSING:
            raise ConvertError(f"{path}: missing metadata key {key!r}")
        return default
    return entry.contents()


def read_int_field(reader: GGUFReader, key: str, path: str, default: Any = _MISSING) -> Any:
    """``read_field`` for a value that must be one integer."""
    value = read_field(reader, key, path, default)
    if value is not default and (not isinstance(value, int) or isinstance(value, bool)):
        # e.g. a per-layer array of head counts, which a plain Llama cannot express
        raise ConvertError(f"{path}: metadata {key!r} should be one integer, got {value!r:.80}")
    return value


def float32_value(value: float) -> float:
    """The shortest decimal that rounds to the same float32: GGUF stores 1e-5 as float32, which
    reads back as 9.999999747378752e-06; the original config said 1e-05."""
    return float(str(np.float32(value)))
