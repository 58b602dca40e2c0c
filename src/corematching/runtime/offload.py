"""Core-neuron slices of FFN weights that accelerate keeps offloaded (on disk, or in CPU memory off the device).

A model loaded with `from_pretrained(..., device_map=..., offload_folder=...)` keeps an offloaded module's weights
on the meta device; an accelerate hook (`AlignDevicesHook`, offload=True) brings them in from its `weights_map`
for each forward and drops them after. Core-neuron decoding needs only the core rows of gate/up and the core
columns of down, so this module reads just those from the same store, once per prefill decision, into tensors on
the hook's execution device; decode steps then compute with them and never call the offloaded modules.

What is read, per projection of width F (neurons) and hidden size H, for the union U of core neurons:
  - gate, up [F, H] (row-major): the |U| core rows, as runs of consecutive rows: |U| * H elements;
  - down [H, F]: its core columns are strided (|U| scattered elements in each of the H rows), so the reader
    streams the whole matrix in blocks of rows and keeps the core columns: H * F elements read, H * |U| kept;
  - biases: gate/up bias rows at U, down's whole bias.
Stores: safetensors files (accelerate reads the checkpoint in place), `.dat` files written by accelerate into the
offload folder (raw row-major arrays), and in-memory state dicts (CPU offload), sliced without a full copy.
"""

import json
import os
import struct
import threading
from dataclasses import dataclass

import torch

from ..models import FFNParts

ROW_BLOCK_BYTES = 64 << 20  # down_proj is streamed in blocks of rows of at most this size

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


def offload_hook(module: torch.nn.Module):
    """The accelerate hook that brings this module's weights in from an offload store, or None."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])  # SequentialHook holds several
    for candidate in hooks:
        if getattr(candidate, "offload", False) and getattr(candidate, "weights_map", None) is not None:
            return candidate
    return None


def is_offloaded(parts: FFNParts) -> bool:
    """Whether any projection of the FFN keeps its weight offloaded (meta device, brought in by a hook)."""
    projections = (parts.gate, parts.up, parts.down)
    return any(linear is not None and linear.weight.device.type == "meta" for linear in projections)


def readable(linear: torch.nn.Module) -> bool:
    """An offloaded projection whose weight this module can read slices of."""
    hook = offload_hook(linear)
    if hook is None:
        return False
    try:
        return _locate(hook.weights_map, "weight") is not None
    except (KeyError, OSError, ValueError):  # a store of another kind, or a file that is gone or unreadable
        return False


@dataclass
class CoreSlices:
    """The core-neuron weights of one FFN read from its offload store (on the execution device)."""

    up: torch.Tensor  # [U, H]
    up_bias: torch.Tensor | None
    gate: torch.Tensor | None  # [U, H]
    gate_bias: torch.Tensor | None
    down: torch.Tensor  # [H, U]
    down_bias: torch.Tensor | None
    bytes_read: int  # bytes read from the store to build them (see the module docstring)


def read_core_slices(parts: FFNParts, union: torch.Tensor) -> CoreSlices:
    """Read the FFN's core rows (gate, up) and columns (down) at the sorted neuron indices `union` [U]."""
    reader = _Reader()
    index = union.detach().to("cpu", torch.long)
    up, up_bias = reader.rows(parts.up, index)
    gate, gate_bias = reader.rows(parts.gate, index) if parts.gate is not None else (None, None)
    down = reader.columns(parts.down, index)
    down_bias = reader.whole_bias(parts.down)
    return CoreSlices(up, up_bias, gate, gate_bias, down, down_bias, reader.bytes_read)


# ---------------------------------------------------------------------------------------------- stores


@dataclass
class _StoredArray:
    """A row-major array inside a file: byte offset, stored dtype and shape; `dtype` is what the model uses."""

    path: str
    offset: int
    stored_dtype: torch.dtype
    shape: tuple[int, ...]
    dtype: torch.dtype


_HEADERS: dict[tuple[str, float], dict] = {}  # (safetensors path, mtime) -> its header, parsed once
_HEADERS_LOCK = threading.Lock()


def _safetensors_header(path: str) -> tuple[int, dict]:
    """(offset of the data section, header) of a safetensors file."""
    key = (path, os.path.getmtime(path))
    with _HEADERS_LOCK:
        found = _HEADERS.get(key)
        if found is None:
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                found = (8 + length, json.loads(handle.read(length)))
            _HEADERS[key] = found
    return found


def _locate(weights_map, name: str):
    """Where the offloaded tensor `name` of a module lives: a _StoredArray (a file), a torch.Tensor (in memory),
    or None when the module has no such tensor. Raises KeyError for a store this module cannot read."""
    dataset, key = getattr(weights_map, "dataset", None), name
    if dataset is not None and hasattr(weights_map, "prefix"):
        key = f"{weights_map.prefix}{name}"
    else:
        dataset = weights_map
    state_dict = getattr(dataset, "state_dict", None)
    if isinstance(state_dict, dict) and key in state_dict:
        return state_dict[key]
    index = getattr(dataset, "index", None)
    if isinstance(index, dict):
        info = index.get(key)
        if info is None:
            return None
        dtype = getattr(torch, info["dtype"]) if "dtype" in info else None
        if info.get("safetensors_file") is not None:
            path = info["safetensors_file"]
            data_start, header = _safetensors_header(path)
            entry = header[info.get("weight_name", key)]
            stored = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if stored is None:
                raise KeyError(f"a safetensors tensor of dtype {entry['dtype']}")
            start = data_start + entry["data_offsets"][0]
            return _StoredArray(path, start, stored, tuple(entry["shape"]), dtype or stored)
        path = os.path.join(dataset.save_folder, f"{key}.dat")  # accelerate's own offload files
        return _StoredArray(path, 0, dtype, tuple(info["shape"]), dtype)
    if isinstance(dataset, dict):  # a plain state dict
        return dataset.get(key)
    raise KeyError(f"an offload store of type {type(dataset).__name__}")


class _Reader:
    """Reads slices of offloaded tensors and counts the bytes it reads."""

    def __init__(self):
        self.bytes_read = 0

    def rows(self, linear, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight's rows at `index`, and the bias's entries there (None without a bias)."""
        device = _device_of(linear)
        weight = self._rows_of(self._source(linear, "weight"), index, device)
        bias_source = self._source(linear, "bias")
        bias = None if bias_source is None else self._rows_of(bias_source, index, device)
        return weight, bias

    def columns(self, linear, index: torch.Tensor) -> torch.Tensor:
        """The weight's columns at `index` [H, U]: the matrix streamed in blocks of rows, core columns kept."""
        device = _device_of(linear)
        source = self._source(linear, "weight")
        if isinstance(source, torch.Tensor):
            taken = source.detach().index_select(1, index.to(source.device))
            self.bytes_read += taken.numel() * taken.element_size()
            return taken.to(device)
        rows, cols = source.shape
        row_bytes = cols * source.stored_dtype.itemsize
        block = max(1, ROW_BLOCK_BYTES // row_bytes)
        out = torch.empty(rows, index.numel(), dtype=source.dtype, device=device)
        with open(source.path, "rb", buffering=0) as handle:
            for start in range(0, rows, block):
                stop = min(rows, start + block)
                chunk = self._read(handle, source, start, stop)
                out[start:stop] = chunk.index_select(1, index).to(device=device, dtype=source.dtype)
        return out

    def whole_bias(self, linear) -> torch.Tensor | None:
        source = self._source(linear, "bias")
        if source is None:
            return None
        if isinstance(source, torch.Tensor):
            self.bytes_read += source.numel() * source.element_size()
            return source.detach().to(_device_of(linear))
        with open(source.path, "rb", buffering=0) as handle:
            whole = self._read(handle, source, 0, source.shape[0])
        return whole.to(device=_device_of(linear), dtype=source.dtype)

    def _source(self, linear, name: str):
        """The module's own tensor when it is resident, else where the store keeps it (None: no such tensor)."""
        tensor = getattr(linear, name, None)
        if tensor is None:
            return None
        if tensor.device.type != "meta":
            return tensor
        hook = offload_hook(linear)
        if hook is None:
            raise ValueError(f"the {name} of {type(linear).__name__} is on the meta device without an offload hook")
        source = _locate(hook.weights_map, name)
        if source is None:
            raise ValueError(f"the offload store has no {name} for an offloaded {type(linear).__name__}")
        return source

    def _rows_of(self, source, index: torch.Tensor, device) -> torch.Tensor:
        if isinstance(source, torch.Tensor):
            taken = source.detach().index_select(0, index.to(source.device))
            self.bytes_read += taken.numel() * taken.element_size()
            return taken.to(device)
        out = torch.empty((index.numel(), *source.shape[1:]), dtype=source.stored_dtype)
        with open(source.path, "rb", buffering=0) as handle:
            for first, last, at in _runs(index):  # consecutive rows are read together
                out[at : at + last - first] = self._read(handle, source, first, last)
        return out.to(device=device, dtype=source.dtype)

    def _read(self, handle, source: _StoredArray, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of a stored array, in its stored dtype (on the CPU)."""
        row_elements = 1
        for size in source.shape[1:]:
            row_elements *= size
        row_bytes = row_elements * source.stored_dtype.itemsize
        out = torch.empty((stop - start, *source.shape[1:]), dtype=source.stored_dtype)
        buffer = memoryview(out.view(torch.uint8).numpy()).cast("B")
        handle.seek(source.offset + start * row_bytes)
        wanted, done = (stop - start) * row_bytes, 0
        while done < wanted:
            count = handle.readinto(buffer[done:])
            if not count:
                raise OSError(f"{source.path}: ended after {done} of {wanted} bytes of an offloaded tensor")
            done += count
        self.bytes_read += wanted
        return out


def _runs(index: torch.Tensor):
    """Sorted indices -> (first, last + 1, position in the index) of each run of consecutive values."""
    values = index.tolist()
    at = 0
    while at < len(values):
        end = at
        while end + 1 < len(values) and values[end + 1] == values[end] + 1:
            end += 1
        yield values[at], values[end] + 1, at
        at = end + 1


def _device_of(linear) -> torch.device:
    """Where the module computes: its hook's execution device, else where its weight is."""
    hook = offload_hook(linear)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)  # accelerate names an accelerator by its index
    return linear.weight.device
