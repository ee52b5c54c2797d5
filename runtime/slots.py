"""The KV cache of the step graph (ar_step.onnx): one preallocated buffer per layer for keys and one for values,
a row (slot) per sequence, written in place by the graph and never copied between steps.

    keys   [slots, kv_heads, capacity, head_dim]
    values [slots, kv_heads, capacity, head_dim], or [slots, kv_heads, head_dim, capacity] transposed where the
           step graph's attention is not one fused node (see export/step.py); the manifest's values_transposed
           says which

Position p of a sequence lives at index p of its slot's capacity axis. A step over the first `rows` slots binds each
buffer's first rows (a contiguous prefix) as both the graph's cache.* input and its cache_out.* output, so ONNX
Runtime's scatters write the new keys and values into the buffer itself. On CUDA the buffers are device memory that
no step copies to the host. `resize` changes the capacity of every slot, keeping what each holds (the one copy, made
when the longest sequence outgrows the buffer, amortized over many steps by growing in blocks).
"""

from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort


def capacity_axis(name: str, values_transposed: bool) -> int:
    """The capacity axis of the step graph's cache.N.key or cache.N.value (or cache_out.*)."""
    return 3 if values_transposed and name.endswith(".value") else 2


def capacity_for(positions: int) -> int:
    """A capacity that holds `positions`, rounded up to a block of 1/16 to 1/8 of it (at least 16): a resize every
    so many positions, and attention reads at most 1/8 more than it needs."""
    block = max(16, 1 << max(0, positions.bit_length() - 4))
    return -(-positions // block) * block


class SlotCache:
    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: npt.DTypeLike,
        slots: int,
        capacity: int,
        device: str = "cpu",
        device_id: int = 0,
        ortvalues: bool | None = None,
        values_transposed: bool = True,
    ) -> None:
        """ortvalues: the buffers are OrtValues (device memory; the default off the CPU) rather than numpy
        arrays. values_transposed: the values' layout (the module's docstring)."""
        self.layers, self.kv_heads, self.head_dim, self.dtype = layers, kv_heads, head_dim, np.dtype(dtype)
        self.values_transposed = values_transposed
        self.slots, self.device, self.device_id = slots, device, device_id
        self.ortvalues = device != "cpu" if ortvalues is None else ortvalues
        self.capacity = 0
        self.buffers: list[Any] = []  # per layer, keys then values: numpy arrays or OrtValues
        # the IOBindings that point at these buffers, made by the backend and kept with them: a binding must never
        # outlive the memory it names, so a resize drops them and they go when the cache does
        self.bindings: dict[Any, Any] = {}  # rows, or (rows, width) on a device -> binding
        self._arenas, self._turn = [np.empty(0, self.dtype), np.empty(0, self.dtype)], 1  # host buffers' memory
        self.resize(capacity)

    def shapes(self, rows: int, capacity: int) -> list[tuple]:
        """The shape of every buffer (key, value per layer) over `rows` slots."""
        key = (rows, self.kv_heads, capacity, self.head_dim)
        return [key, (rows, self.kv_heads, self.head_dim, capacity) if self.values_transposed else key] * self.layers

    def resize(self, capacity: int) -> None:
        """Every slot gets `capacity` positions; the first min(old, new) of each are kept, the rest zeroed (masked
        positions must hold finite values: 0 x NaN is NaN)."""
        if capacity == self.capacity:
            return
        keep = min(capacity, self.capacity)
        kept = (np.s_[:, :, :keep], np.s_[:, :, :, :keep] if self.values_transposed else np.s_[:, :, :keep])
        rest = (np.s_[:, :, keep:], np.s_[:, :, :, keep:] if self.values_transposed else np.s_[:, :, keep:])
        shapes = self.shapes(self.slots, capacity)
        fresh = self._host_buffers(shapes) if not self.ortvalues else [np.empty(s, self.dtype) for s in shapes]
        for index, buffer in enumerate(fresh):
            if keep:
                old = self.buffers[index].numpy() if self.ortvalues else self.buffers[index]
                buffer[kept[index % 2]] = old[kept[index % 2]]
            buffer[rest[index % 2]] = 0
        if self.ortvalues:  # device memory, resized through the host, once per resize
            fresh = [ort.OrtValue.ortvalue_from_numpy(host, self.device, self.device_id) for host in fresh]
        self.buffers, self.capacity, self.bindings = fresh, capacity, {}

    def _host_buffers(self, shapes: list[tuple]) -> list[np.ndarray]:
        """Buffers of these shapes in the arena the current ones are not in. Two arenas take turns, so a resize
        writes into memory the process already holds: in fresh memory, faulting its pages in cost as much as the
        copy itself (docs/benchmarks.md, "Smaller measurements"). Host memory: up to 2.5x
        the buffers' own; after a shrink, the other arena (the longer buffers') is let go, so a server does not
        keep its longest request's cache."""
        sizes = [int(np.prod(shape)) for shape in shapes]
        self._turn = 1 - self._turn
        if not sum(sizes) <= self._arenas[self._turn].size <= 2 * sum(sizes):  # too small, or far too large
            self._arenas[self._turn] = np.empty(sum(sizes) * 5 // 4, self.dtype)  # room for a few resizes more
        if self._arenas[1 - self._turn].size > 2 * sum(sizes):  # a shrink: the old buffers' arena goes, its
            self._arenas[1 - self._turn] = np.empty(0, self.dtype)  # memory freed once the resize drops them
        offsets = np.cumsum([0, *sizes])
        return [
            self._arenas[self._turn][start : start + size].reshape(shape)
            for start, size, shape in zip(offsets, sizes, shapes)
        ]

    @property
    def host_bytes(self) -> int:
        """Host memory the buffers' two arenas hold (0 where the buffers are OrtValues)."""
        return sum(arena.nbytes for arena in self._arenas)

    def pointer(self, index: int) -> int:
        buffer = self.buffers[index]
        return buffer.data_ptr() if self.ortvalues else buffer.ctypes.data

    def bind(self, binding: ort.IOBinding, inputs: list[str], outputs: list[str], rows: int) -> None:
        """Binds the first `rows` slots of every buffer as both input and output of one step."""
        for index, (name, out, shape) in enumerate(zip(inputs, outputs, self.shapes(rows, self.capacity))):
            pointer = self.pointer(index)
            binding.bind_input(name, self.device, self.device_id, self.dtype, list(shape), pointer)
            binding.bind_output(out, self.device, self.device_id, self.dtype, list(shape), pointer)

    def read(self, index: int) -> np.ndarray:
        """A copy of one buffer on the host as [slots, kv_heads, capacity, head_dim], values too (for tests and
        inspection)."""
        buffer = self.buffers[index]
        buffer = np.array(buffer.numpy() if self.ortvalues else buffer)
        return buffer.transpose(0, 1, 3, 2).copy() if index % 2 and self.values_transposed else buffer
