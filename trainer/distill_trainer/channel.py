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

Leftover segments: a teacher killed with SIGKILL (with its whole process group, as Ray does when the driver
dies) never unlinks its segments, and each can be tokens x vocabulary x 4 bytes of /dev/shm. A segment's name
says whose it is, ``kd_<pid namespace>_<pid>_<process start time>_<publisher>_<slot>_<generation>``, and every
new publisher first removes the segments of processes that are gone: same pid namespace, and that pid no
longer exists or now belongs to a process started at another time (pid reuse). Segments of live processes,
of other pid namespaces sharing /dev/shm (containers; their pids mean nothing here), and names in any other
form are never touched. Linux only (elsewhere segments are not listed as files and nothing is removed).
"""

from __future__ import annotations

import logging
import os
import re
import uuid
import warnings
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import Literal

import numpy as np
import torch

log = logging.getLogger(__name__)

Transport = Literal["shared_memory", "object_store"]
_ALIGN = 64  # bytes; keeps every tensor in a segment cache-line aligned
SHM_DIR = Path("/dev/shm")  # where Linux keeps POSIX shared-memory segments, one file each
_SEGMENT_NAME = re.compile(r"^kd_([0-9a-z]+)_([0-9a-z]+)_([0-9a-z]+)_[0-9a-f]+_\d+_[0-9a-f]+$")


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


def _base36(number: int) -> str:
    digits = ""
    while True:
        number, digit = divmod(number, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[digit] + digits
        if not number:
            return digits


def _stat_fields(pid: int | str) -> list[str]:
    """/proc/PID/stat from field 3 (state) on; the command name before it may hold spaces and ')'."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def _start_time(fields: list[str]) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), base 36."""
    return _base36(int(fields[19]))


def _own_identity() -> tuple[str, str] | None:
    """(pid namespace, start time) of this process, base 36; None where /proc cannot tell (not Linux)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
        return _base36(int(namespace[namespace.index("[") + 1 : -1])), _start_time(_stat_fields("self"))
    except (OSError, ValueError, IndexError):
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True


def _owner_is_gone(namespace: str, pid: int, start: str, own_namespace: str) -> bool:
    if namespace != own_namespace or pid <= 0:
        return False  # another pid namespace (another container sharing /dev/shm): its pids mean nothing here
    if not _pid_exists(pid):
        return True
    try:
        fields = _stat_fields(pid)
        # A zombie never runs again; a different start time means the pid now belongs to another process.
        return fields[0] == "Z" or _start_time(fields) != start
    except FileNotFoundError:
        return not _pid_exists(pid)  # it ended just now, or /proc hides it (hidepid): ask once more
    except (OSError, ValueError, IndexError):
        return False


def remove_stale_segments(directory: Path = SHM_DIR) -> list[str]:
    """Unlink the segments of publishers whose process is gone (see the module docstring); returns their names."""
    own = _own_identity()
    if own is None or not directory.is_dir():
        return []
    removed, freed = [], 0
    for entry in directory.iterdir():
        match = _SEGMENT_NAME.match(entry.name)
        if match is None or not _owner_is_gone(match[1], int(match[2], 36), match[3], own[0]):
            continue
        try:
            size = entry.stat().st_size
            entry.unlink()
        except OSError:  # gone already, or another user's (/dev/shm is sticky): not ours to remove
            continue
        removed.append(entry.name)
        freed += size
    if removed:
        log.warning("removed %d shared-memory segment(s) of ended runs from %s (%.1f MB)", len(removed), directory,
                    freed / 1e6)
    return removed


def _owner_prefix() -> str:
    """``kd_<pid namespace>_<pid>_<start time>`` of this process ("0" where unknown: nothing cleans those)."""
    namespace, start = _own_identity() or ("0", "0")
    return f"kd_{namespace}_{_base36(os.getpid())}_{start}"


class LogitsPublisher:
    """Teacher side: owns the shared-memory segments and unlinks them on ``close``.

    Starting one first removes the segments that publishers of ended (killed) processes left behind.
    """

    def __init__(self, transport: Transport = "shared_memory", slots: int = 2):
        self.transport = transport
        if transport == "shared_memory":
            remove_stale_segments()
        self._token = uuid.uuid4().hex[:4]  # tells apart the publishers of one process
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
                name=f"{_owner_prefix()}_{self._token}_{slot}_{uuid.uuid4().hex[:6]}", create=True,
                size=int(nbytes * 1.25),
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
