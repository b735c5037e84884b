"""Teacher -> student hand-off of logits without pickling the tensors.

The teacher publishes a dict of tensors (top-k values and indices, or full logits) and gets back a small
``LogitsHandle`` that travels through Ray as ordinary metadata; the student opens the handle and gets
tensors back.

Transports:
- ``shared_memory``: teacher and student on the same host (always so when co-located on one device, and
  on CPU). The teacher copies into a named POSIX shared-memory segment it owns; the student maps the same
  pages, so what crosses Ray is a name, shapes and offsets. Segments are reused (a ring of ``slots``), so
  steady state allocates nothing.
- ``object_store``: the fallback when the two ends are on different hosts. The tensors go as numpy
  arrays, which Ray stores without pickling and the reader maps zero-copy from its local object store.

CUDA IPC (teacher and student ranks sharing one GPU) plugs in as a third transport with the same two
calls; it comes with the GPU strategies.

Protocol: a slot is overwritten ``slots`` publishes later. The pipeline hands each handle to the student
and waits for its step before the teacher publishes again, so a reader never sees a slot being rewritten.
"""

from __future__ import annotations

import uuid
import warnings
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Literal

import numpy as np
import torch

Transport = Literal["shared_memory", "object_store"]
_ALIGN = 64  # bytes; keeps every tensor in a segment cache-line aligned


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the segment


@dataclass(frozen=True)
class LogitsHandle:
    """What the student needs to find the teacher's tensors. Small and cheap to send through Ray."""

    transport: Transport
    tensors: tuple[TensorSpec, ...]
    segment: str | None = None  # shared-memory segment name
    arrays: dict[str, np.ndarray] | None = None  # object-store payload


def _layout(tensors: dict[str, torch.Tensor]) -> tuple[tuple[TensorSpec, ...], int]:
    specs, offset = [], 0
    for name, tensor in tensors.items():
        specs.append(TensorSpec(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset))
        nbytes = tensor.numel() * tensor.element_size()
        offset += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
    return tuple(specs), max(offset, _ALIGN)


def _view(buffer, spec: TensorSpec) -> torch.Tensor:
    dtype = getattr(torch, spec.dtype)
    count = int(np.prod(spec.shape, dtype=np.int64))
    if count == 0:
        return torch.empty(spec.shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=spec.offset).view(spec.shape)


class LogitsPublisher:
    """Teacher side: owns the shared-memory segments and unlinks them on ``close``."""

    def __init__(self, transport: Transport = "shared_memory", slots: int = 2):
        self.transport = transport
        self._prefix = f"kd_{uuid.uuid4().hex[:12]}"
        self._segments: list[shared_memory.SharedMemory | None] = [None] * slots
        self._next = 0

    def publish(self, tensors: dict[str, torch.Tensor]) -> LogitsHandle:
        tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
        specs, nbytes = _layout(tensors)
        if self.transport == "object_store":
            return LogitsHandle("object_store", specs, arrays={n: t.numpy() for n, t in tensors.items()})

        slot = self._next
        self._next = (self._next + 1) % len(self._segments)
        segment = self._segments[slot]
        if segment is None or segment.size < nbytes:
            if segment is not None:
                segment.close()
                segment.unlink()
            # Grow with headroom so that varying batch widths do not reallocate every step.
            segment = shared_memory.SharedMemory(
                name=f"{self._prefix}_{slot}_{uuid.uuid4().hex[:6]}", create=True, size=int(nbytes * 1.25)
            )
            self._segments[slot] = segment
        for spec in specs:
            _view(segment.buf, spec).copy_(tensors[spec.name])
        return LogitsHandle("shared_memory", specs, segment=segment.name)

    def close(self) -> None:
        for index, segment in enumerate(self._segments):
            if segment is not None:
                segment.close()
                segment.unlink()
                self._segments[index] = None


class LogitsReceiver:
    """Student side: maps the teacher's segments (cached by name) and returns tensor views into them."""

    def __init__(self) -> None:
        self._attached: dict[str, shared_memory.SharedMemory] = {}

    def open(self, handle: LogitsHandle) -> dict[str, torch.Tensor]:
        if handle.transport == "object_store":
            assert handle.arrays is not None
            with warnings.catch_warnings():
                # Arrays from the object store are read-only views; the loss only reads them.
                warnings.simplefilter("ignore", UserWarning)
                return {spec.name: torch.from_numpy(handle.arrays[spec.name]) for spec in handle.tensors}
        segment = self._attach(handle.segment)
        return {spec.name: _view(segment.buf, spec) for spec in handle.tensors}

    def _attach(self, name: str | None) -> shared_memory.SharedMemory:
        assert name is not None
        segment = self._attached.get(name)
        if segment is None:
            segment = shared_memory.SharedMemory(name=name, create=False)
            # The teacher owns the segment; without this the reader's resource tracker would unlink it (or warn
            # about a leak) when this process exits.
            resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
            self._attached[name] = segment
            self._forget_stale(keep=name)
        return segment

    def _forget_stale(self, keep: str) -> None:
        # A segment the teacher replaced (it grew) is unlinked already; drop our mapping when no view is alive.
        prefix = keep.rsplit("_", 2)[0]
        slot = keep.rsplit("_", 2)[1]
        for name in [n for n in self._attached if n != keep and n.startswith(f"{prefix}_{slot}_")]:
            try:
                self._attached.pop(name).close()
            except BufferError:
                pass  # a tensor view still points into it; the mapping goes when the process does

    def close(self) -> None:
        for segment in self._attached.values():
            try:
                segment.close()
            except BufferError:
                pass
        self._attached.clear()
