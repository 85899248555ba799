"""Reading and writing safetensors one tensor at a time.

Reading goes through `safetensors.safe_open`, which memory-maps a file and copies out only the
tensor asked for; `tensor_index` lists names and shapes from the headers alone, so a converter
can check a whole model before reading any data and then read tensors in the order it needs.
Writing uses the format directly (an 8-byte little-endian header length, a JSON header of names,
dtypes, shapes and byte ranges, then the raw bytes), because the library only writes whole
dicts: knowing every shape in advance, the header goes first and each tensor is produced,
written and freed in turn. A model larger than `max_shard_bytes` is split into
`model-0000i-of-0000n.safetensors` files plus the `model.safetensors.index.json` that
transformers reads.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Sequence

import ml_dtypes
import numpy as np
from safetensors import safe_open

from jaxlm.run.errors import DataError, MissingFileError
from jaxlm.weights.hf import model_dir

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
           "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64)}
_CODES = {v: k for k, v in _DTYPES.items()}


def weight_files(hf_dir: str) -> list[str]:
    """The safetensors files of a HF model directory: the index's shards, or the single file;
    every one confined to the directory (`model_dir.confined`)."""
    index = model_dir.confined(hf_dir, INDEX_FILE)
    if index is not None:
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{os.path.join(hf_dir, INDEX_FILE)}: not a safetensors index "
                            f"({type(e).__name__}: {e}); it needs a weight_map of tensor names "
                            "to files", path=index) from None
        where = os.path.join(hf_dir, INDEX_FILE)
        paths = [model_dir.confined(hf_dir, str(name), where) for name in names]
        missing = [os.path.join(hf_dir, str(n)) for n, p in zip(names, paths) if p is None]
        if missing:
            raise MissingFileError(f"{where} lists missing files: {missing}", path=where)
        return paths
    single = model_dir.confined(hf_dir, SINGLE_FILE)
    if single is not None:
        return [single]
    found = sorted(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else "no such directory"
    raise MissingFileError(f"{hf_dir} has neither {INDEX_FILE} nor {SINGLE_FILE} (found: "
                           f"{found}); only safetensors weights are read (no .bin)",
                           path=hf_dir)


def _corrupt(path: str, e: Exception) -> DataError:
    return DataError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                     f"{' '.join(str(e).split())}); download or convert it again", path=path)


def read_tensor(path: str, name: str) -> np.ndarray:
    """The tensor `name` of the file `path`, read alone.

    A fresh safe_open per tensor: the file stays memory-mapped only while one tensor is copied
    out, so mapped pages of tensors already converted never count towards the RSS."""
    try:
        with safe_open(path, framework="numpy") as f:
            return f.get_tensor(name)
    except Exception as e:  # noqa: BLE001  (safetensors raises its own and OS errors)
        raise _corrupt(path, e) from e


def iter_tensors(paths: Sequence[str]) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(name, load) for every tensor of the files; `load()` reads just that tensor."""
    for path in paths:
        try:
            with safe_open(path, framework="numpy") as f:
                names = list(f.keys())
        except Exception as e:  # noqa: BLE001
            raise _corrupt(path, e) from e
        for name in names:
            yield name, lambda path=path, name=name: read_tensor(path, name)


def tensor_index(paths: Sequence[str]) -> list[tuple[str, str, tuple[int, ...], str]]:
    """(name, file, shape, safetensors dtype code such as "BF16" or "I64") of every tensor of
    the files, from their headers (no data read)."""
    out = []
    for path in paths:
        try:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    info = f.get_slice(name)
                    out.append((name, path, tuple(info.get_shape()), str(info.get_dtype())))
        except Exception as e:  # noqa: BLE001
            raise _corrupt(path, e) from e
    return out


def is_float_code(code: str) -> bool:
    """True for the safetensors dtype codes of floating-point tensors (F16, BF16, F32, F8_...)."""
    return code.startswith(("F", "BF"))


def dtype_code(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype not in _CODES:
        raise ValueError(f"cannot write {dtype} to safetensors; use one of "
                         f"{[str(d) for d in _CODES]}")
    return _CODES[dtype]


def _header(entries: Sequence[tuple[str, tuple[int, ...]]], dtype: np.dtype) -> bytes:
    header, offset = {}, 0
    for name, shape in entries:
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": dtype_code(dtype), "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}  # transformers expects a PyTorch-format file
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def plan_shards(entries: Sequence[tuple[str, tuple[int, ...]]], dtype: np.dtype,
                max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive groups of tensors of at most `max_shard_bytes` (a larger tensor alone)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_model(out_dir: str, entries: Sequence[tuple[str, tuple[int, ...]]],
                produce: Callable[[str], np.ndarray], dtype: np.dtype,
                max_shard_bytes: int) -> list[str]:
    """Writes the tensors `entries` (name, shape), each made by `produce(name)` when its turn
    comes, as one file or shards + index; returns the files written."""
    dtype = np.dtype(dtype)
    shards = plan_shards(entries, dtype, max_shard_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(_header(shard, dtype))
            for tensor, shape in shard:
                array = np.ascontiguousarray(produce(tensor), dtype=dtype)
                if array.shape != tuple(shape):
                    raise ValueError(f"{tensor}: produced shape {array.shape}, expected "
                                     f"{tuple(shape)}")
                f.write(array.reshape(-1).view(np.uint8).data)
                total += array.nbytes
                weight_map[tensor] = name
                del array
    if len(shards) > 1:
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
