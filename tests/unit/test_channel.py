"""The logits hand-off: what the student opens equals what the teacher published, across processes."""

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
from distill_trainer.channel import SHM_DIR, LogitsPublisher, LogitsReceiver

# The reader runs as an unrelated process, as a Ray actor does (a multiprocessing child would share the
# parent's resource tracker, which is not the situation the channel is built for).
READER = """
import pickle, sys
from distill_trainer.channel import LogitsReceiver
receiver = LogitsReceiver()
tensors = receiver.open(pickle.loads(sys.stdin.buffer.read()))
sys.stdout.buffer.write(pickle.dumps({name: t.tolist() for name, t in tensors.items()}))
del tensors
receiver.close()
"""


def open_in_another_process(handle):
    done = subprocess.run([sys.executable, "-c", READER], input=pickle.dumps(handle), capture_output=True,
                          timeout=120, check=True)
    return {name: torch.tensor(values) for name, values in pickle.loads(done.stdout).items()}


def test_shared_memory_handle_carries_tensors_to_another_process():
    publisher = LogitsPublisher("shared_memory")
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
    publisher, receiver = LogitsPublisher("shared_memory", slots=2), LogitsReceiver()
    try:
        names = [publisher.publish({"logits": torch.randn(4, 8)}).segment for _ in range(4)]
        assert names[0] == names[2] and names[1] == names[3] and names[0] != names[1]
        big = torch.randn(64, 128)
        handle = publisher.publish({"logits": big})
        assert handle.segment != names[0]
        assert torch.equal(receiver.open(handle)["logits"], big)
    finally:
        receiver.close()
        publisher.close()


def test_empty_tensors_survive_the_hand_off():
    publisher, receiver = LogitsPublisher("shared_memory"), LogitsReceiver()
    try:
        handle = publisher.publish({"values": torch.zeros(0, 4), "indices": torch.zeros(0, 4, dtype=torch.int32)})
        opened = receiver.open(handle)
        assert opened["values"].shape == (0, 4) and opened["indices"].dtype == torch.int32
    finally:
        receiver.close()
        publisher.close()


def test_object_store_transport_round_trips():
    publisher, receiver = LogitsPublisher("object_store"), LogitsReceiver()
    logits = torch.randn(3, 11)
    handle = publisher.publish({"logits": logits})
    assert handle.segment is None
    assert torch.equal(receiver.open(handle)["logits"], logits)


# A teacher that publishes into both slots, prints its segment names, then waits until told to close (or killed).
TEACHER = """
import sys, torch
from distill_trainer.channel import LogitsPublisher
publisher = LogitsPublisher("shared_memory", slots=2)
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

        LogitsPublisher("shared_memory").close()  # the next run's teacher starts

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
    own = LogitsPublisher("object_store")  # no segments; the names below mimic other publishers'
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
    publisher = LogitsPublisher("shared_memory")
    try:
        name = publisher.publish({"logits": torch.randn(2, 3)}).segment
        identity = channel._own_identity()
        if identity is not None:
            namespace, start = identity
            assert name.startswith(f"kd_{namespace}_{channel._base36(os.getpid())}_{start}_")
        assert len(name) <= 40
    finally:
        publisher.close()
