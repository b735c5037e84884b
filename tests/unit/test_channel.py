"""The logits hand-off: what the student opens equals what the teacher published, across processes."""

import pickle
import subprocess
import sys

import torch

from distill_trainer.channel import LogitsPublisher, LogitsReceiver

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
