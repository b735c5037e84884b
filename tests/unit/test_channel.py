"""The logits hand-off: what the student opens equals what the teacher published, across processes; which
transport two ends get; and the slot protocol (a slot is never rewritten while a reader holds it)."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill_trainer import channel
from distill_trainer.channel import (
    SHM_DIR,
    CudaIpc,
    DeviceIdentity,
    LogitsReceiver,
    SlotBusyError,
    choose_transport,
    make_transport,
)

# The reader runs as an unrelated process, as a Ray actor does (a multiprocessing child would share the
# parent's resource tracker, which is not the situation the channel is built for).
READER = """
import pickle, sys
from distill_trainer.channel import LogitsReceiver
receiver = LogitsReceiver()
handle = pickle.loads(sys.stdin.buffer.read())
tensors = receiver.open(handle)
sys.stdout.buffer.write(pickle.dumps({name: t.tolist() for name, t in tensors.items()}))
del tensors
receiver.release(handle)
receiver.close()
"""


def open_in_another_process(handle):
    done = subprocess.run([sys.executable, "-c", READER], input=pickle.dumps(handle), capture_output=True,
                          timeout=120, check=True)
    return {name: torch.tensor(values) for name, values in pickle.loads(done.stdout).items()}


def test_shared_memory_handle_carries_tensors_to_another_process():
    publisher = make_transport("shared_memory")
    try:
        values, indices = torch.randn(5, 7), torch.randint(0, 1000, (5, 7), dtype=torch.int32)
        handle = publisher.publish({"values": values, "indices": indices})
        assert handle.arrays is None  # only a name, shapes and offsets travel
        received = open_in_another_process(handle)
        assert torch.equal(received["values"], values)
        assert torch.equal(received["indices"], indices)
    finally:
        publisher.close()


def test_segments_are_reused_and_grow_when_needed():
    publisher, receiver = make_transport("shared_memory", slots=2), LogitsReceiver()
    try:
        names = []
        for _ in range(4):
            handle = publisher.publish({"logits": torch.randn(4, 8)})
            receiver.release(handle)
            names.append(handle.segment)
        assert names[0] == names[2] and names[1] == names[3] and names[0] != names[1]
        big = torch.randn(64, 128)
        handle = publisher.publish({"logits": big})
        assert handle.segment != names[0]
        assert torch.equal(receiver.open(handle)["logits"], big)
    finally:
        receiver.close()
        publisher.close()


def test_empty_tensors_survive_the_hand_off():
    publisher, receiver = make_transport("shared_memory"), LogitsReceiver()
    try:
        handle = publisher.publish({"values": torch.zeros(0, 4), "indices": torch.zeros(0, 4, dtype=torch.int32)})
        opened = receiver.open(handle)
        assert opened["values"].shape == (0, 4) and opened["indices"].dtype == torch.int32
    finally:
        receiver.close()
        publisher.close()


def test_object_store_transport_round_trips():
    publisher, receiver = make_transport("object_store"), LogitsReceiver()
    logits = torch.randn(3, 11)
    handle = publisher.publish({"logits": logits})
    assert handle.segment is None
    assert torch.equal(receiver.open(handle)["logits"], logits)


# A teacher that publishes into both slots, prints its segment names, then waits until told to close (or killed).
TEACHER = """
import sys, torch
from distill_trainer.channel import make_transport
publisher = make_transport("shared_memory", slots=2)
names = [publisher.publish({"logits": torch.randn(64, 100)}).segment for _ in range(2)]
print(" ".join(names), flush=True)
sys.stdin.readline()
publisher.close()
"""


def start_teacher():
    # Its own session, so that SIGKILL to the group takes its resource tracker along, as when Ray kills a worker
    # (the tracker would otherwise unlink the segments after the teacher's death).
    process = subprocess.Popen([sys.executable, "-c", TEACHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, start_new_session=True)
    return process, process.stdout.readline().split()


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="segments are files under /dev/shm on Linux only")
def test_a_new_publisher_removes_the_segments_of_killed_runs_and_keeps_live_ones():
    killed, killed_names = start_teacher()
    live, live_names = start_teacher()
    try:
        assert len(killed_names) == len(live_names) == 2
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
        assert all((SHM_DIR / name).exists() for name in killed_names)  # the leak: nobody unlinked them

        make_transport("shared_memory").close()  # the next run's teacher starts

        assert not any((SHM_DIR / name).exists() for name in killed_names)
        assert all((SHM_DIR / name).exists() for name in live_names)
    finally:
        live.communicate("close\n", timeout=60)
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
    assert live.returncode == 0
    assert not any((SHM_DIR / name).exists() for name in live_names)


@pytest.mark.skipif(not Path("/proc/self/ns/pid").exists(), reason="needs Linux /proc")
def test_only_segments_whose_owner_is_provably_gone_are_removed(tmp_path):
    own = make_transport("object_store")  # no segments; the names below mimic other publishers'
    namespace, start = channel._own_identity()
    pid = channel._base36(os.getpid())
    no_such_pid = channel._base36(int(Path("/proc/sys/kernel/pid_max").read_text()) + 1)
    other_namespace = channel._base36(int(namespace, 36) + 1)
    names = {
        f"kd_{namespace}_{no_such_pid}_{start}_ab12_0_c0ffee": "removed",  # its process is gone
        f"kd_{namespace}_{pid}_{channel._base36(int(start, 36) + 1)}_ab12_1_c0ffee": "removed",  # pid reused
        f"kd_{namespace}_{pid}_{start}_ab12_0_c0ffee": "kept",  # a live process (this one)
        f"kd_{other_namespace}_{no_such_pid}_{start}_ab12_0_c0ffee": "kept",  # another container's pid
        "kd_0_1_0_ab12_0_c0ffee": "kept",  # owner unknown (made where /proc could not tell)
        "kd_3f2a9c0d1e4b_0_a1b2c3": "kept",  # the older naming: whose it is cannot be told
        "other_segment": "kept",
    }
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # ends, and is not reaped until wait() below
    while channel._stat_fields(zombie.pid)[0] != "Z":
        time.sleep(0.05)
    zombie_start = channel._start_time(channel._stat_fields(zombie.pid))
    names[f"kd_{namespace}_{channel._base36(zombie.pid)}_{zombie_start}_ab12_0_c0ffee"] = "removed"  # never runs again
    for name in names:
        (tmp_path / name).write_bytes(b"x" * 10)
    removed = channel.remove_stale_segments(tmp_path)
    zombie.wait()
    assert sorted(removed) == sorted(name for name, fate in names.items() if fate == "removed")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, fate in names.items() if fate == "kept")
    own.close()


def test_segment_names_say_whose_they_are():
    publisher = make_transport("shared_memory")
    try:
        name = publisher.publish({"logits": torch.randn(2, 3)}).segment
        identity = channel._own_identity()
        if identity is not None:
            namespace, start = identity
            assert name.startswith(f"kd_{namespace}_{channel._base36(os.getpid())}_{start}_")
        assert len(name) <= 40
    finally:
        publisher.close()


# --- which transport two ends get ------------------------------------------------------------------------------------

HOST, OTHER_HOST = "node-a/boot-1/22", "node-b/boot-2/22"
GPU0, GPU1 = "GPU-0000aaaa", "GPU-1111bbbb"


@pytest.mark.parametrize("producer, consumer, requested, expected", [
    (DeviceIdentity(HOST, GPU0), DeviceIdentity(HOST, GPU0), "same_device", "cuda_ipc"),  # same GPU
    (DeviceIdentity(HOST, GPU0), DeviceIdentity(HOST, GPU1), "same_device", "shared_memory"),  # same host
    (DeviceIdentity(HOST), DeviceIdentity(HOST), "same_device", "shared_memory"),  # CPU ranks of one host
    (DeviceIdentity(HOST, GPU0), DeviceIdentity(HOST), "same_device", "shared_memory"),
    (DeviceIdentity(HOST, GPU0), DeviceIdentity(OTHER_HOST, GPU0), "same_device", "object_store"),  # other host
    (DeviceIdentity(HOST), DeviceIdentity(OTHER_HOST), "same_device", "object_store"),
    (DeviceIdentity(HOST, GPU0), DeviceIdentity(HOST, GPU0), "object_store", "object_store"),  # backend: ray
])
def test_transport_is_chosen_by_device_identity(producer, consumer, requested, expected):
    assert choose_transport(producer, consumer, requested) == expected


def test_two_processes_of_this_host_have_the_same_host_identity():
    here = DeviceIdentity.of(torch.device("cpu"))
    code = "import torch; from distill_trainer.channel import DeviceIdentity; print(DeviceIdentity.of(torch.device('cpu')).host)"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert there.stdout.strip() == here.host and here.gpu is None
    assert choose_transport(here, DeviceIdentity(there.stdout.strip())) == "shared_memory"


# --- the slot protocol -----------------------------------------------------------------------------------------------


def test_a_slot_is_never_rewritten_while_a_reader_holds_it():
    publisher, receiver = make_transport("shared_memory", slots=2), LogitsReceiver()
    publisher.wait_seconds = 0.2
    try:
        first, second = torch.full((3, 5), 1.0), torch.full((3, 5), 2.0)
        held = publisher.publish({"logits": first})
        receiver.release(publisher.publish({"logits": second}))
        view = receiver.open(held)["logits"]  # the student reads slot 0 and has not released it

        with pytest.raises(SlotBusyError, match="slot 0 still holds publish 1"):
            publisher.publish({"logits": torch.full((3, 5), 3.0)})
        assert torch.equal(view, first)  # untouched

        receiver.release(held)
        third = publisher.publish({"logits": torch.full((3, 5), 3.0)})
        assert (third.slot, third.sequence, third.segment) == (0, 3, held.segment)  # the same slot, rewritten now
        assert torch.equal(receiver.open(third)["logits"], torch.full((3, 5), 3.0))
    finally:
        receiver.close()
        publisher.close()


# A student that opens a handle, holds it for a while checking that its contents do not change, then releases it.
HOLDING_READER = """
import pickle, sys, time
from distill_trainer.channel import LogitsReceiver
receiver = LogitsReceiver()
handle = pickle.loads(sys.stdin.buffer.read())
logits = receiver.open(handle)["logits"]
before = logits.clone()
print("opened", flush=True)
time.sleep(1.0)
unchanged = bool((logits == before).all())
receiver.release(handle)
print("unchanged" if unchanged else "rewritten", flush=True)
"""


def test_the_teacher_waits_until_a_reader_in_another_process_releases_the_slot():
    publisher = make_transport("shared_memory", slots=1)
    try:
        handle = publisher.publish({"logits": torch.full((64, 100), 7.0)})
        reader = subprocess.Popen([sys.executable, "-c", HOLDING_READER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=False)
        reader.stdin.write(pickle.dumps(handle))
        reader.stdin.close()
        assert reader.stdout.readline().strip() == b"opened"
        started = time.monotonic()
        rewritten = publisher.publish({"logits": torch.full((64, 100), 8.0)})  # the only slot: waits for release
        waited = time.monotonic() - started
        assert reader.stdout.readline().strip() == b"unchanged"
        assert reader.wait(timeout=60) == 0
        assert waited > 0.5 and rewritten.segment == handle.segment
    finally:
        publisher.close()


def test_the_object_store_transport_needs_no_release():
    publisher, receiver = make_transport("object_store"), LogitsReceiver()
    handles = [publisher.publish({"logits": torch.full((2, 2), float(i))}) for i in range(5)]  # never released
    assert [float(receiver.open(h)["logits"][0, 0]) for h in handles] == [0.0, 1.0, 2.0, 3.0, 4.0]


# --- CUDA IPC ---------------------------------------------------------------------------------------------------------


def test_the_cuda_export_is_rebuilt_on_the_consumers_index_of_the_same_gpu(monkeypatch):
    # Ray gives each actor its own CUDA_VISIBLE_DEVICES: the producer's index 0 may be the consumer's index 3.
    import torch.multiprocessing.reductions as reductions

    rebuilt = {}
    monkeypatch.setattr(channel, "cuda_index_of", lambda gpu: {"GPU-1111bbbb": 3}[gpu])
    monkeypatch.setattr(reductions, "rebuild_cuda_tensor", lambda *args: rebuilt.setdefault("args", args))
    producer_args = ("cls", (8,), (1,), 0, "storage", torch.uint8, 0, b"handle", 8, 0, False, b"ref", 0, b"ev", True)
    channel.rebuild_cuda_export(channel.CudaExport("ab12_0_1", "GPU-1111bbbb", producer_args))
    assert rebuilt["args"][6] == 3 and rebuilt["args"][:6] == producer_args[:6] and rebuilt["args"][7:] == producer_args[7:]


def test_cuda_ipc_refuses_expandable_segments_in_the_teacher(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128,expandable_segments:True")
    with pytest.raises(RuntimeError, match="pidfd_getfd"):
        CudaIpc().publish({"logits": torch.zeros(2, 2)})


def test_cuda_buffer_views_follow_the_layout():
    # The byte layout CudaIpc uses in its flat buffers, checked on a CPU buffer.
    tensors = {"values": torch.randn(5, 3), "indices": torch.randint(0, 9, (5, 3), dtype=torch.int32),
               "empty": torch.zeros(0, 4)}
    specs, nbytes = channel._layout(tensors)
    buffer = torch.zeros(nbytes, dtype=torch.uint8)
    for spec in specs:
        channel._byte_view(buffer, spec).copy_(tensors[spec.name])
    for spec in specs:
        assert torch.equal(channel._byte_view(buffer, spec), tensors[spec.name])
        assert spec.offset % 64 == 0


CUDA_READER = """
import pickle, sys, torch
from distill_trainer.channel import LogitsReceiver
receiver = LogitsReceiver()
results = []
for handle in pickle.loads(sys.stdin.buffer.read()):
    tensors = receiver.open(handle)
    results.append(({n: t.cpu() for n, t in tensors.items()}, tensors["values"].data_ptr()))
    receiver.release(handle)
sys.stdout.buffer.write(pickle.dumps(results))
receiver.close()
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a CUDA device, and this machine has none")
def test_cuda_ipc_handle_round_trips_to_another_process_without_copies():
    # release="stream": the reader process exits before the second publish, and an event of an ended process
    # cannot be opened (the event path is checked by tests/gpu/gpu_check.py, with a live student).
    publisher = make_transport("cuda_ipc", slots=1, release="stream")
    try:
        sent = {"values": torch.randn(16, 8, device="cuda"),
                "indices": torch.randint(0, 100, (16, 8), device="cuda", dtype=torch.int32)}
        handle = publisher.publish(sent)
        assert len(pickle.dumps(handle)) < 4096  # only the export travels, not the tensors
        assert handle.cuda.gpu == channel.gpu_uuid(torch.cuda.current_device())
        done = subprocess.run([sys.executable, "-c", CUDA_READER], input=pickle.dumps([handle]), capture_output=True,
                              timeout=300, check=True)
        [(received, _)] = pickle.loads(done.stdout)
        assert torch.equal(received["values"], sent["values"].cpu())
        assert torch.equal(received["indices"], sent["indices"].cpu())
        publisher.wait_seconds = 5.0
        again = publisher.publish(sent)  # the reader released the only slot: no wait, the same exported buffer
        assert again.cuda == handle.cuda and again.sequence == 2
    finally:
        publisher.close()


def test_cuda_ipc_refuses_the_cuda_malloc_async_backend(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
    with pytest.raises(RuntimeError, match="PYTORCH_CUDA_ALLOC_CONF='backend:cudaMallocAsync' selects the "
                                           "cudaMallocAsync backend, which cannot export"):
        CudaIpc().publish({"logits": torch.zeros(2, 2)})


def test_cuda_ipc_refuses_the_cuda_malloc_async_backend_in_use(monkeypatch):
    # What torch reports once CUDA is up (the backend may come from a setting this process cannot read back).
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "cudaMallocAsync")
    with pytest.raises(RuntimeError, match="backend in use is cudaMallocAsync"):
        channel.check_allocator_for_ipc()


ALLOCATOR_SET_FROM_CODE = """
import sys, torch
from distill_trainer.channel import CudaIpc
torch._C._accelerator_setAllocatorSettings(sys.argv[1])  # what torch.cuda.memory._set_allocator_settings calls
try:
    CudaIpc().publish({"logits": torch.zeros(2, 2)})
except RuntimeError as error:
    print(error)
"""


@pytest.mark.parametrize("setting, reason", [("expandable_segments:True", "pidfd_getfd"),
                                             ("backend:cudaMallocAsync", "cannot export")])
def test_cuda_ipc_refuses_allocator_settings_made_from_code(setting, reason):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    done = subprocess.run([sys.executable, "-c", ALLOCATOR_SET_FROM_CODE, setting], capture_output=True, text=True,
                          timeout=120, env=env, check=True)
    assert f"settings made from code ('{setting}')" in done.stdout and reason in done.stdout, done.stdout + done.stderr


class FakeEvent:
    """torch.cuda.Event at the boundary: records what was done to it (CUDA calls mocked; no GPU here)."""

    log: list = []
    count = 0

    def __init__(self, interprocess=False):
        assert interprocess
        FakeEvent.count += 1
        self.handle = f"event-{FakeEvent.count}".encode().ljust(64, b"\0")

    def record(self, stream):
        FakeEvent.log.append(("record", self.handle[:7], stream))

    def ipc_handle(self):
        return self.handle

    @classmethod
    def from_ipc_handle(cls, device, handle):
        opened = cls.__new__(cls)
        opened.handle = handle
        FakeEvent.log.append(("open", handle[:7], device))
        return opened


class FakeStream:
    def __init__(self, name):
        self.name = name

    def wait_event(self, event):
        FakeEvent.log.append(("wait", event.handle[:7], self.name))

    def synchronize(self):
        FakeEvent.log.append(("synchronize", self.name))


def test_a_cuda_ipc_release_records_an_event_that_the_teachers_stream_waits_on(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    FakeEvent.log = []
    teacher, student = CudaIpc(slots=2), CudaIpc()
    try:
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream("student"))
        slot, sequence = teacher._next_slot()  # the ring's first publish in slot 0 (the control segment appears)
        export = channel.CudaExport("tk_0_1", "GPU-0", (), "event")
        handle = teacher._handle((), slot, sequence, cuda=export)
        student._opened[export.key] = torch.zeros(8, dtype=torch.uint8)  # as if opened: a stand-in for the buffer
        teacher._wait_for_student_reads(slot, "cuda:0")
        assert FakeEvent.log == []  # a slot's first use waits for nothing
        student.release(handle)
        assert FakeEvent.log == [("record", b"event-1", student_stream := FakeEvent.log[0][2])]
        assert student_stream.name == "student" and int(teacher._released[slot]) == sequence
        # The ring comes back to slot 0: the teacher's stream waits on the student's event, opened from its handle.
        teacher._next_slot()
        slot_again, _ = teacher._next_slot()
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream("teacher"))
        teacher._wait_for_student_reads(slot_again, "cuda:0")
        assert slot_again == slot and FakeEvent.log[1:] == [("open", b"event-1", "cuda:0"),
                                                            ("wait", b"event-1", "teacher")]
        # "stream": the student synchronizes instead, and records nothing.
        FakeEvent.log = []
        student.release(channel.LogitsHandle("cuda_ipc", (), cuda=channel.CudaExport("tk_0_1", "GPU-0", (), "stream"),
                                             slot=0, sequence=3, control=handle.control))
        assert FakeEvent.log == [("synchronize", "teacher")]
    finally:
        student.close()
        teacher.close()


def test_event_handles_round_trip_through_a_control_entry():
    control = memoryview(bytearray(3 * (8 + CudaIpc.entry_extra_bytes)))
    assert channel.read_event_handle(control, 3, 1) == b""
    channel.write_event_handle(control, 3, 1, b"x" * 64)
    channel.write_event_handle(control, 3, 2, b"y" * 64)
    assert channel.read_event_handle(control, 3, 1) == b"x" * 64 and channel.read_event_handle(control, 3, 2) == b"y" * 64
    assert bytes(control[: 8 * 3]) == bytes(24)  # the released sequence numbers are untouched
    with pytest.raises(ValueError, match="does not fit"):
        channel.write_event_handle(control, 3, 0, b"z" * 65)


def test_a_publish_says_how_long_it_waited_for_its_slot():
    publisher, receiver = make_transport("shared_memory", slots=1), LogitsReceiver()
    try:
        handle = publisher.publish({"logits": torch.zeros(4, 4)})
        assert publisher.last_wait_seconds < 0.5
        receiver.open(handle)
        import threading

        threading.Timer(0.3, receiver.release, args=(handle,)).start()
        publisher.publish({"logits": torch.ones(4, 4)})  # waits until the timer releases the only slot
        assert publisher.last_wait_seconds >= 0.25
    finally:
        receiver.close()
        publisher.close()
