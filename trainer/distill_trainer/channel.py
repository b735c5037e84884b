"""Teacher -> student hand-off of logits without pickling the tensors.

The teacher publishes a dict of tensors (top-k values and indices, or full logits) and gets back a small
``LogitsHandle`` that travels through Ray as ordinary metadata; the student opens the handle and gets
tensors back, and releases it once its step no longer reads them.

Transports (``Transport``: ``publish`` on the teacher; ``open`` and ``release`` on the student), chosen by
``choose_transport`` from where the two ends are (``DeviceIdentity``), not from Ray's node ids:

- ``CudaIpc`` (same GPU): a ring of CUDA buffers on the teacher, each exported once with torch's
  ``reduce_tensor``; the export (ints and bytes) is the handle. The student rebuilds each buffer once, keeps
  it, and opens later handles as views of it: no copy, no host round trip. Ray gives each actor its own
  ``CUDA_VISIBLE_DEVICES``, so the producer's device index means nothing to the student: the handle names the
  GPU by UUID and the student maps it to its own index. The teacher copies its targets into the slot and
  synchronizes its stream before it returns the handle (torch makes a consumer wait on the producer's event
  only the first time it opens a storage, so a reused buffer needs this each time).
  The allocator must export plain device allocations (``check_allocator_for_ipc``, at the first publish): with
  ``expandable_segments`` torch exports memory as a file descriptor that the consumer fetches with
  ``pidfd_getfd``, which unprivileged containers (Kubernetes pods without CAP_SYS_PTRACE) refuse; the
  ``cudaMallocAsync`` backend cannot export at all. Both are refused, whether set in the environment
  (``PYTORCH_CUDA_ALLOC_CONF`` / ``PYTORCH_ALLOC_CONF``) or from code.
- ``SharedMemory`` (same host): the teacher copies into named POSIX shared-memory segments it owns (a ring
  of slots); the student maps the same pages, so what crosses Ray is a name, shapes and offsets.
- ``ObjectStore`` (other hosts, or ``logits_transfer_backend: ray``): the tensors go as numpy arrays, which
  Ray stores without pickling and the reader maps zero-copy from its local object store.

Slot protocol (the two same-host transports). A publisher has ``slots`` buffers used in turn, and a small
control segment in shared memory holding, per slot, the sequence number the reader has released. Each
handle carries its slot and sequence number (1, 2, ... per publisher). The student calls ``release(handle)``
when its step is done with the tensors, which writes that sequence
number into the slot's entry. Before the teacher rewrites a slot it waits until the entry holds the sequence
number it last published there (``SlotBusyError`` after ``wait_seconds``; ``last_wait_seconds`` says how long
the last publish waited): a slot is never rewritten while a reader holds it, whatever the order in which the
driver calls the two sides. Segments and CUDA buffers are reused, so steady state allocates nothing; a slot
grows (new segment or buffer, new export) when a step's tensors do not fit.

On a GPU the student's kernels that read a slot may still be queued when its step calls ``release``. Two ways
to make the release safe, chosen by the teacher (``CudaIpc(release=...)``; the handle tells the student):

- ``"event"`` (default): the student records an interprocess CUDA event of its own on its current stream and
  puts the event's IPC handle in the slot's control entry before the sequence number; the teacher's stream
  waits on that event (``wait_event``: a wait on the GPU, the teacher's host does not stall) before it copies
  into the slot. The student's record precedes its sequence number, and its next record on that slot comes
  only after the teacher's next publish there, so the teacher waits on exactly the reads it is about to
  overwrite.
- ``"stream"``: the student synchronizes its current stream before it releases (its CPU stops launching ahead
  on every micro-batch).

Leftover segments: a teacher killed with SIGKILL (with its whole process group, as Ray does when the driver
dies) never unlinks its segments, and each can be tokens x vocabulary x 4 bytes of /dev/shm. A segment's name
says whose it is, ``kd_<pid namespace>_<pid>_<process start time>_<publisher>_<slot or c>_<generation>``, and
every new shared-memory publisher first removes the segments of processes that are gone: same pid namespace,
and that pid no longer exists or now belongs to a process started at another time (pid reuse). Segments of live
processes, of other pid namespaces sharing /dev/shm (containers; their pids mean nothing here), and names in any
other form are never touched. Linux only (elsewhere segments are not listed as files and nothing is removed).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import ClassVar, Literal, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

TransportKind = Literal["cuda_ipc", "shared_memory", "object_store"]
# What logits_transfer_backend asks for: the best hand-off the two ends' places allow, or the object store.
Requested = Literal["same_device", "object_store"]
_ALIGN = 64  # bytes; keeps every tensor in a segment cache-line aligned
SHM_DIR = Path("/dev/shm")  # where Linux keeps POSIX shared-memory segments, one file each
_SEGMENT_NAME = re.compile(r"^kd_([0-9a-z]+)_([0-9a-z]+)_([0-9a-z]+)_[0-9a-f]+_(?:\d+|c)_[0-9a-f]+$")
DEFAULT_WAIT_SECONDS = 600.0  # how long a publisher waits for the reader to release a slot
SLOT_HEADROOM = 1.25  # a slot grows to this times what a publish needs, so that varying widths rarely regrow it
# Where PyTorch reads its allocator settings from the environment (see check_allocator_for_ipc).
_ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
# A CUDA IPC event handle (cudaIpcEventHandle_t) is 64 bytes; a control entry holds its length, then the handle.
_EVENT_HANDLE_BYTES = 64
ReleaseWait = Literal["event", "stream"]


class SlotBusyError(RuntimeError):
    """The reader has not released the slot the publisher needs next."""


# ----------------------------------------------------------------------------------------- where the ends are


@dataclass(frozen=True)
class DeviceIdentity:
    """Where one end of the channel runs: its host and, on a GPU, that GPU's UUID.

    ``host`` is equal for two processes exactly when they share POSIX shared memory: the kernel's boot id, the
    hostname and the device number of the /dev/shm mount (containers on one machine each have their own).
    """

    host: str
    gpu: Optional[str] = None

    @classmethod
    def of(cls, device: torch.device) -> "DeviceIdentity":
        gpu = gpu_uuid(device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else None
        return cls(host_identity(), gpu)


def host_identity() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    try:
        shm = str(SHM_DIR.stat().st_dev)
    except OSError:
        shm = "?"
    return f"{socket.gethostname()}/{boot}/{shm}"


def gpu_uuid(index: int) -> str:
    """The UUID of local CUDA device ``index`` (the same string in every process that sees the GPU)."""
    return str(torch.cuda.get_device_properties(index).uuid)


def cuda_index_of(uuid_: str) -> int:
    """This process's index of the GPU with UUID ``uuid_`` (indices depend on CUDA_VISIBLE_DEVICES)."""
    for index in range(torch.cuda.device_count()):
        if gpu_uuid(index) == uuid_:
            return index
    raise RuntimeError(f"GPU {uuid_} is not visible to this process (CUDA_VISIBLE_DEVICES="
                       f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r})")


def choose_transport(producer: DeviceIdentity, consumer: DeviceIdentity,
                     requested: Requested = "same_device") -> TransportKind:
    """Same GPU -> CUDA IPC; same host -> shared memory; otherwise (or when asked) the object store."""
    if requested == "object_store" or producer.host != consumer.host:
        return "object_store"
    if producer.gpu is not None and producer.gpu == consumer.gpu:
        return "cuda_ipc"
    return "shared_memory"


# ----------------------------------------------------------------------------------------- handles and layout


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the segment or buffer


@dataclass(frozen=True)
class CudaExport:
    """One CUDA buffer as exported once by the teacher: ``reduce_tensor``'s arguments (ints, bytes, types)."""

    key: str  # publisher, slot and generation: the student rebuilds each key once
    gpu: str  # the buffer's GPU UUID
    args: tuple
    release: ReleaseWait = "event"  # how the student makes its release safe (module docstring)


@dataclass(frozen=True)
class LogitsHandle:
    """What the student needs to find the teacher's tensors. Small and cheap to send through Ray."""

    transport: TransportKind
    tensors: tuple[TensorSpec, ...]
    segment: Optional[str] = None  # shared memory: the slot's segment name
    arrays: Optional[dict[str, np.ndarray]] = None  # object store: the payload
    cuda: Optional[CudaExport] = None  # CUDA IPC: the slot's buffer
    slot: int = 0
    sequence: int = 0  # this publisher's count of publishes; what ``release`` hands back
    control: Optional[str] = None  # the publisher's control segment (released sequence number per slot)


def _layout(tensors: dict[str, torch.Tensor]) -> tuple[tuple[TensorSpec, ...], int]:
    specs, offset = [], 0
    for name, tensor in tensors.items():
        specs.append(TensorSpec(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset))
        nbytes = tensor.numel() * tensor.element_size()
        offset += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
    return tuple(specs), max(offset, _ALIGN)


def ring_bytes(tensors: dict[str, torch.Tensor], slots: int) -> int:
    """What a ring of ``slots`` slots takes once every slot has held ``tensors`` (meta tensors will do): the
    same-host transports' shared-memory segments or CUDA buffers."""
    _, nbytes = _layout(tensors)
    return slots * int(nbytes * SLOT_HEADROOM)


def _view(buffer, spec: TensorSpec) -> torch.Tensor:
    dtype = getattr(torch, spec.dtype)
    count = int(np.prod(spec.shape, dtype=np.int64))
    if count == 0:
        return torch.empty(spec.shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=spec.offset).view(spec.shape)


def _byte_view(buffer: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """``spec``'s tensor as a view of a flat uint8 tensor (a CUDA buffer), at its aligned offset."""
    dtype = getattr(torch, spec.dtype)
    count = int(np.prod(spec.shape, dtype=np.int64))
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    return buffer[spec.offset : spec.offset + nbytes].view(dtype).view(spec.shape)


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


# ----------------------------------------------------------------------------------------- transports


class Transport(ABC):
    """One way to hand a step's tensors from a teacher rank to its student rank.

    An instance serves one side: the teacher's ``publish``es (and owns what it published until ``close``), the
    student's ``open``s handles and ``release``s them when its step no longer reads the tensors.
    """

    kind: ClassVar[TransportKind]
    last_wait_seconds: float = 0.0  # teacher: how long the last publish waited for the reader to free its slot

    @abstractmethod
    def publish(self, tensors: dict[str, torch.Tensor]) -> LogitsHandle:
        """Teacher: make ``tensors`` readable by the student; the handle says where they are."""

    @abstractmethod
    def open(self, handle: LogitsHandle) -> dict[str, torch.Tensor]:
        """Student: the published tensors (views where the transport allows; read only)."""

    def release(self, handle: LogitsHandle) -> None:
        """Student: done reading ``handle``'s tensors; the teacher may rewrite their slot."""

    def close(self) -> None:
        """Free what this side holds (the teacher's segments and buffers; the student's mappings)."""


class ObjectStore(Transport):
    """The tensors themselves, as numpy arrays in the handle (Ray's object store carries them)."""

    kind = "object_store"

    def publish(self, tensors: dict[str, torch.Tensor]) -> LogitsHandle:
        tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
        specs, _ = _layout(tensors)
        return LogitsHandle("object_store", specs, arrays={n: t.numpy() for n, t in tensors.items()})

    def open(self, handle: LogitsHandle) -> dict[str, torch.Tensor]:
        assert handle.arrays is not None
        with warnings.catch_warnings():
            # Arrays from the object store are read-only views; the loss only reads them.
            warnings.simplefilter("ignore", UserWarning)
            return {spec.name: torch.from_numpy(handle.arrays[spec.name]) for spec in handle.tensors}


def _attach_segment(name: str) -> shared_memory.SharedMemory:
    segment = shared_memory.SharedMemory(name=name, create=False)
    match = _SEGMENT_NAME.match(name)
    if match is None or int(match[2], 36) != os.getpid():
        # The teacher owns the segment; without this the reader's resource tracker would unlink it (or warn about
        # a leak) when this process exits. (Not when this process made it: that registration is the teacher's.)
        resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
    return segment


class _SlotRing(Transport):
    """The slot protocol of the same-host transports (module docstring): which slot the teacher writes next,
    waiting until the student has released it, and the student's release."""

    # Bytes per slot after the released sequence numbers in the control segment (CudaIpc: the student's event).
    entry_extra_bytes: ClassVar[int] = 0

    def __init__(self, slots: int, wait_seconds: float):
        if slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots}")
        self.slots = slots
        self.wait_seconds = wait_seconds
        self._token = uuid.uuid4().hex[:4]  # tells apart the publishers of one process
        self._control: Optional[shared_memory.SharedMemory] = None  # teacher: made on the first publish
        self._released: Optional[np.ndarray] = None  # [slots] int64 in the control segment, written by the reader
        self._published = [0] * slots  # teacher: the sequence number last published in each slot
        self._sequence = 0
        self._controls: dict[str, tuple[shared_memory.SharedMemory, np.ndarray]] = {}  # student: by name

    def _next_slot(self) -> tuple[int, int]:
        """The slot to write next and its sequence number, once the reader has released that slot."""
        if self._control is None:
            self._control = shared_memory.SharedMemory(
                name=f"{_owner_prefix()}_{self._token}_c_{uuid.uuid4().hex[:6]}", create=True,
                size=(8 + self.entry_extra_bytes) * self.slots,
            )
            self._released = np.ndarray((self.slots,), dtype=np.int64, buffer=self._control.buf)
            self._released[:] = 0
        slot = self._sequence % self.slots
        started = time.monotonic()
        deadline = started + self.wait_seconds
        while int(self._released[slot]) < self._published[slot]:
            if time.monotonic() >= deadline:
                raise SlotBusyError(
                    f"slot {slot} still holds publish {self._published[slot]}, which the student has not released "
                    f"after {self.wait_seconds:g} s (it released {int(self._released[slot])}); a student step must "
                    f"call release(handle) when it is done with the tensors"
                )
            time.sleep(0.0005)
        self.last_wait_seconds = time.monotonic() - started
        self._sequence += 1
        self._published[slot] = self._sequence
        return slot, self._sequence

    def _handle(self, specs, slot: int, sequence: int, **where) -> LogitsHandle:
        assert self._control is not None
        return LogitsHandle(self.kind, specs, slot=slot, sequence=sequence, control=self._control.name, **where)

    def _control_of(self, name: str) -> tuple[shared_memory.SharedMemory, np.ndarray]:
        """Student: the control segment ``name`` and its released sequence numbers, attached once."""
        entry = self._controls.get(name)
        if entry is None:
            segment = _attach_segment(name)
            slots = segment.size // (8 + self.entry_extra_bytes)
            entry = self._controls[name] = (segment, np.ndarray((slots,), np.int64, segment.buf))
        return entry

    def release(self, handle: LogitsHandle) -> None:
        if handle.control is None:
            return
        _, released = self._control_of(handle.control)
        released[handle.slot] = handle.sequence  # one aligned 8-byte store: the teacher sees old or new, never half

    def close(self) -> None:
        self._released = None  # the array holds an export of the segment's buffer
        if self._control is not None:
            self._control.close()
            self._control.unlink()
            self._control = None
        for name in list(self._controls):
            segment, _ = self._controls.pop(name)
            try:
                segment.close()
            except BufferError:
                pass


class SharedMemory(_SlotRing):
    """A ring of POSIX shared-memory segments on the teacher; the student maps them (cached by name).

    Starting a teacher's instance first removes the segments that publishers of ended (killed) processes left.
    """

    kind = "shared_memory"

    def __init__(self, slots: int = 2, wait_seconds: float = DEFAULT_WAIT_SECONDS, *, clean_up: bool = True):
        super().__init__(slots, wait_seconds)
        if clean_up:
            remove_stale_segments()
        self._segments: list[Optional[shared_memory.SharedMemory]] = [None] * slots
        self._attached: dict[str, shared_memory.SharedMemory] = {}

    def publish(self, tensors: dict[str, torch.Tensor]) -> LogitsHandle:
        tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
        specs, nbytes = _layout(tensors)
        slot, sequence = self._next_slot()
        segment = self._segments[slot]
        if segment is None or segment.size < nbytes:
            if segment is not None:
                segment.close()
                segment.unlink()
            # Grow with headroom so that varying batch widths do not reallocate every step.
            segment = shared_memory.SharedMemory(
                name=f"{_owner_prefix()}_{self._token}_{slot}_{uuid.uuid4().hex[:6]}", create=True,
                size=int(nbytes * SLOT_HEADROOM),
            )
            self._segments[slot] = segment
        for spec in specs:
            _view(segment.buf, spec).copy_(tensors[spec.name])
        return self._handle(specs, slot, sequence, segment=segment.name)

    def open(self, handle: LogitsHandle) -> dict[str, torch.Tensor]:
        assert handle.segment is not None
        segment = self._attached.get(handle.segment)
        if segment is None:
            segment = self._attached[handle.segment] = _attach_segment(handle.segment)
            self._forget_replaced(keep=handle.segment)
        return {spec.name: _view(segment.buf, spec) for spec in handle.tensors}

    def _forget_replaced(self, keep: str) -> None:
        # A segment the teacher replaced (its slot grew) is unlinked already; drop our mapping when no view is alive.
        prefix, slot, _ = keep.rsplit("_", 2)
        for name in [n for n in self._attached if n != keep and n.startswith(f"{prefix}_{slot}_")]:
            try:
                self._attached.pop(name).close()
            except BufferError:
                pass  # a tensor view still points into it; the mapping goes when the process does

    def close(self) -> None:
        for index, segment in enumerate(self._segments):
            if segment is not None:
                segment.close()
                segment.unlink()
                self._segments[index] = None
        for segment in self._attached.values():
            try:
                segment.close()
            except BufferError:
                pass
        self._attached.clear()
        super().close()


_EXPANDABLE = re.compile(r"expandable_segments\s*:\s*true", re.IGNORECASE)
_ASYNC_BACKEND = re.compile(r"backend\s*:\s*cudamallocasync", re.IGNORECASE)


def _allocator_problem(settings: str) -> Optional[str]:
    """Why allocator settings ``settings`` break CUDA IPC, or None when they do not."""
    if _EXPANDABLE.search(settings):
        return ("enables expandable_segments: its CUDA IPC exports would need pidfd_getfd, which unprivileged "
                "containers refuse")
    if _ASYNC_BACKEND.search(settings):
        return "selects the cudaMallocAsync backend, which cannot export its memory through CUDA IPC"
    return None


def check_allocator_for_ipc() -> None:
    """Refuse allocator settings under which the teacher's CUDA IPC exports fail (module docstring): from the
    environment (named), from code (``torch._C._accelerator_setAllocatorSettings``, which is what
    ``torch.cuda.memory._set_allocator_settings`` calls), and the allocator backend actually in use."""
    fix = ("Leave it out of the teacher's environment (system_envs / teacher.system_envs) and code, or use "
           "logits_transfer_backend: ray")
    for var in _ALLOC_CONF_VARS:
        problem = _allocator_problem(os.environ.get(var, ""))
        if problem:
            raise RuntimeError(f"{var}={os.environ[var]!r} {problem}. {fix}")
    live = getattr(torch._C, "_accelerator_getAllocatorSettings", None)  # absent in older torch
    settings = live() if live is not None else ""
    problem = _allocator_problem(settings)
    if problem:
        raise RuntimeError(f"the CUDA allocator's settings made from code ({settings!r}) {problem}. {fix}")
    if torch.cuda.is_initialized() and torch.cuda.get_allocator_backend() == "cudaMallocAsync":
        raise RuntimeError(f"the CUDA allocator backend in use is cudaMallocAsync, which cannot export its memory "
                           f"through CUDA IPC. {fix}")


def _event_entry(control: memoryview, slots: int, slot: int) -> memoryview:
    """The bytes of ``slot``'s event entry in a CudaIpc control segment: after the ``slots`` released sequence
    numbers, per slot an int64 length and the student's event IPC handle."""
    start = 8 * slots + slot * CudaIpc.entry_extra_bytes
    return control[start : start + CudaIpc.entry_extra_bytes]


def write_event_handle(control: memoryview, slots: int, slot: int, handle: bytes) -> None:
    if len(handle) > _EVENT_HANDLE_BYTES:
        raise ValueError(f"a CUDA IPC event handle of {len(handle)} bytes does not fit in {_EVENT_HANDLE_BYTES}")
    entry = _event_entry(control, slots, slot)
    entry[8 : 8 + len(handle)] = handle
    entry[:8] = len(handle).to_bytes(8, "little")  # the length last: a handle is complete once it is non-zero


def read_event_handle(control: memoryview, slots: int, slot: int) -> bytes:
    """The student's event handle of ``slot`` (empty before its first release there)."""
    entry = _event_entry(control, slots, slot)
    return bytes(entry[8 : 8 + int.from_bytes(entry[:8], "little")])


def rebuild_cuda_export(export: CudaExport) -> torch.Tensor:
    """The teacher's exported buffer in this process, on this process's index of the same GPU (by UUID).

    Call once per export and keep the tensor: torch counts one consumer reference per export, and rebuilding
    an export it has already opened releases that reference again.
    """
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = list(export.args)
    args[6] = cuda_index_of(export.gpu)  # the producer's device index, in the producer's CUDA_VISIBLE_DEVICES
    return rebuild_cuda_tensor(*args)


class CudaIpc(_SlotRing):
    """A ring of CUDA buffers on the teacher, each exported once; the student rebuilds each once and keeps it.

    ``release``: how a student's release protects the slot from the teacher's next write (module docstring).
    """

    kind = "cuda_ipc"
    entry_extra_bytes = 8 + _EVENT_HANDLE_BYTES  # the student's release event, per slot

    def __init__(self, slots: int = 2, wait_seconds: float = DEFAULT_WAIT_SECONDS,
                 device: Optional[torch.device] = None, release: ReleaseWait = "event"):
        super().__init__(slots, wait_seconds)
        if release not in ("event", "stream"):
            raise ValueError(f"release must be 'event' or 'stream', not {release!r}")
        self.device = device
        self.release_wait = release
        self._buffers: list[Optional[torch.Tensor]] = [None] * slots  # teacher: flat uint8 buffers
        self._exports: list[Optional[CudaExport]] = [None] * slots
        self._generation = 0
        self._student_events: dict[bytes, torch.cuda.Event] = {}  # teacher: the student's events, by IPC handle
        self._opened: dict[str, torch.Tensor] = {}  # student: rebuilt buffers by export key
        self._events: dict[tuple[str, int], torch.cuda.Event] = {}  # student: its release event per (control, slot)

    def publish(self, tensors: dict[str, torch.Tensor]) -> LogitsHandle:
        from torch.multiprocessing.reductions import reduce_tensor

        if self._sequence == 0:  # the first publish
            check_allocator_for_ipc()
        device = self.device or next((t.device for t in tensors.values() if t.is_cuda),
                                     torch.device("cuda", torch.cuda.current_device()))
        specs, nbytes = _layout(tensors)
        slot, sequence = self._next_slot()
        self._wait_for_student_reads(slot, device)
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < nbytes:
            # The old buffer goes back to torch, which keeps it allocated while the student still maps it.
            self._buffers[slot] = None
            buffer = torch.empty(int(nbytes * SLOT_HEADROOM), dtype=torch.uint8, device=device)
            self._generation += 1
            self._buffers[slot] = buffer
            _, args = reduce_tensor(buffer)
            self._exports[slot] = CudaExport(f"{self._token}_{slot}_{self._generation}",
                                             gpu_uuid(buffer.device.index), tuple(args), self.release_wait)
        for spec in specs:
            _byte_view(buffer, spec).copy_(tensors[spec.name].detach(), non_blocking=True)
        # The student reads on its own stream in another process: the data must be complete before the handle
        # leaves (torch syncs on the producer's event only the first time a storage is opened).
        torch.cuda.current_stream(buffer.device).synchronize()
        return self._handle(specs, slot, sequence, cuda=self._exports[slot])

    def _wait_for_student_reads(self, slot: int, device: torch.device) -> None:
        """Teacher, event mode: order this stream's next writes after the student's reads of ``slot`` (the
        student recorded its event before it released the slot, which ``_next_slot`` has seen)."""
        if self.release_wait != "event" or self._control is None:
            return
        handle = read_event_handle(self._control.buf, self.slots, slot)
        if not handle:  # the slot's first use: nothing to wait for
            return
        event = self._student_events.get(handle)
        if event is None:
            event = self._student_events[handle] = torch.cuda.Event.from_ipc_handle(device, handle)
        torch.cuda.current_stream(device).wait_event(event)

    def open(self, handle: LogitsHandle) -> dict[str, torch.Tensor]:
        export = handle.cuda
        assert export is not None
        buffer = self._opened.get(export.key)
        if buffer is None:
            # A new generation of a slot replaces the old one (the teacher grew it): drop our reference to that.
            slot_prefix = export.key.rsplit("_", 1)[0]
            for key in [k for k in self._opened if k.rsplit("_", 1)[0] == slot_prefix]:
                del self._opened[key]
            buffer = self._opened[export.key] = rebuild_cuda_export(export)
        return {spec.name: _byte_view(buffer, spec) for spec in handle.tensors}

    def buffer_of(self, handle: LogitsHandle) -> Optional[torch.Tensor]:
        """Student: the rebuilt buffer that ``handle``'s opened tensors are views of (None if not opened)."""
        return self._opened.get(handle.cuda.key) if handle.cuda is not None else None

    def release(self, handle: LogitsHandle) -> None:
        buffer = self.buffer_of(handle)
        if buffer is not None and handle.control is not None:
            stream = torch.cuda.current_stream(buffer.device)
            if handle.cuda.release == "event":
                self._record_release_event(handle, stream)
            else:
                stream.synchronize()  # our kernels that read the slot are done
        super().release(handle)

    def _record_release_event(self, handle: LogitsHandle, stream) -> None:
        """Student: mark the end of this stream's reads of the slot with our event; the first time, put the
        event's IPC handle in the slot's control entry (before ``release`` writes the sequence number)."""
        key = (handle.control, handle.slot)
        event = self._events.get(key)
        if event is None:
            # Interprocess events must have timing off (the default); recorded first, so it is created on
            # the buffer's device.
            event = self._events[key] = torch.cuda.Event(interprocess=True)
            event.record(stream)
            segment, released = self._control_of(handle.control)
            write_event_handle(segment.buf, len(released), handle.slot, event.ipc_handle())
        else:
            event.record(stream)

    def close(self) -> None:
        self._buffers = [None] * self.slots
        self._exports = [None] * self.slots
        self._student_events.clear()
        self._events.clear()
        self._opened.clear()
        if torch.cuda.is_initialized():
            torch.cuda.ipc_collect()  # free exported blocks whose consumers are gone
        super().close()


TRANSPORTS: dict[str, type[Transport]] = {t.kind: t for t in (CudaIpc, SharedMemory, ObjectStore)}


def make_transport(kind: TransportKind, slots: int = 2, *, release: ReleaseWait = "event") -> Transport:
    """The teacher's side of transport ``kind`` (``release`` applies to CUDA IPC only)."""
    if kind == "object_store":
        return ObjectStore()
    if kind == "cuda_ipc":
        return CudaIpc(slots, release=release)
    return TRANSPORTS[kind](slots)


class LogitsReceiver:
    """The student's side of every transport: opens (and releases) whatever kind of handle arrives."""

    def __init__(self) -> None:
        self._readers: dict[str, Transport] = {}

    def _reader(self, kind: TransportKind) -> Transport:
        reader = self._readers.get(kind)
        if reader is None:
            reader = self._readers[kind] = (
                SharedMemory(clean_up=False) if kind == "shared_memory" else TRANSPORTS[kind]()
            )
        return reader

    def open(self, handle: LogitsHandle) -> dict[str, torch.Tensor]:
        return self._reader(handle.transport).open(handle)

    def release(self, handle: LogitsHandle) -> None:
        self._reader(handle.transport).release(handle)

    def buffer_of(self, handle: LogitsHandle) -> Optional[torch.Tensor]:
        """The rebuilt CUDA buffer an opened CUDA IPC handle's tensors are views of; None for other transports
        (for checks that the hand-off is zero-copy)."""
        reader = self._readers.get(handle.transport)
        return reader.buffer_of(handle) if isinstance(reader, CudaIpc) else None

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
