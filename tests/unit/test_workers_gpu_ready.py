"""The GPU path of the workers, checked on CPU: teardown order (students let go of their teachers' CUDA IPC
buffers before the teachers free them), each rank on the GPU Ray assigned it, and a group rendezvous whose port
rank 0 holds from the moment it names it. CUDA and Ray are faked at their boundary (``torch.cuda.*``,
``ray.*``); the process groups that really form are gloo groups on 127.0.0.1."""

import errno
import multiprocessing
import queue
import socket

import pytest
import ray
import torch
import torch.distributed as dist

from distill_trainer.config import config_from_dict
from distill_trainer import workers
from distill_trainer.workers import TeacherWorker, Workers

# --- shutdown order ------------------------------------------------------------------------------------------------


class FakeActor:
    """An actor handle whose ``close.remote()`` records the call and returns a reference naming the actor."""

    def __init__(self, name: str, events: list):
        self.name = name
        self.close = self  # so that actor.close.remote() is self.remote()
        self._events = events

    def remote(self):
        self._events.append(("close", self.name))
        return self.name  # the "ObjectRef" of the call


@pytest.fixture
def ray_boundary(monkeypatch):
    """Fakes ray.get / ray.kill / remove_placement_group; returns the recorded events and the names whose close
    fails (ray.get raises for them, as for a timeout or a dead actor)."""
    events, failing = [], set()

    def get(ref, timeout=None):
        events.append(("waited", ref, timeout))
        if ref in failing:
            raise ray.exceptions.GetTimeoutError(f"{ref} did not close in time")

    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "kill", lambda actor: events.append(("kill", actor.name)))
    monkeypatch.setattr(ray.util, "remove_placement_group", lambda group: events.append(("remove", group)))
    return events, failing


def workers_of(events: list) -> Workers:
    return Workers(students=[FakeActor("s0", events), FakeActor("s1", events)],
                   teachers=[FakeActor("t0", events), FakeActor("t1", events)], placement_group="pg")


def test_students_are_closed_and_killed_before_any_teacher_is_closed(ray_boundary):
    events, _ = ray_boundary
    workers_of(events).shutdown()
    waits = [event for event in events if event[0] == "waited"]
    assert all(timeout is not None and timeout <= 30 for _, _, timeout in waits)  # a stuck actor cannot hang us
    assert [event[:2] for event in events] == [
        ("close", "s0"), ("close", "s1"), ("waited", "s0"), ("waited", "s1"), ("kill", "s0"), ("kill", "s1"),
        ("close", "t0"), ("close", "t1"), ("waited", "t0"), ("waited", "t1"), ("kill", "t0"), ("kill", "t1"),
        ("remove", "pg"),
    ]


def test_a_student_whose_close_times_out_is_killed_before_any_teacher_is_closed(ray_boundary):
    events, failing = ray_boundary
    failing.add("s0")
    workers_of(events).shutdown()  # no error: tearing down goes on
    order = [event[:2] for event in events]
    assert order.index(("kill", "s0")) < order.index(("close", "t0"))
    assert ("waited", "s1") in order and ("kill", "t1") in order and order[-1] == ("remove", "pg")


def test_after_a_lost_rank_students_are_killed_without_waiting_and_teachers_get_a_short_close(ray_boundary):
    events, _ = ray_boundary
    workers_of(events).shutdown(rank_lost=True)
    assert [event[:2] for event in events] == [
        ("kill", "s0"), ("kill", "s1"),
        ("close", "t0"), ("close", "t1"), ("waited", "t0"), ("waited", "t1"), ("kill", "t0"), ("kill", "t1"),
        ("remove", "pg"),
    ]
    assert all(timeout <= 5 for kind, _, timeout in (e for e in events if e[0] == "waited"))


# --- each rank on its own GPU ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("gpu_ids, visible, index", [
    (["2"], "2", 0),  # Ray narrowed CUDA_VISIBLE_DEVICES to the actor's GPU
    ([3], "0,1,2,3", 3),  # an actor that sees every GPU
    ([1], None, 1),  # nothing set: the id is the CUDA index
    (["1"], "0,1", 1),  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1: the node's list, untouched
    (["GPU-b7"], "GPU-a1, GPU-b7", 1),  # ids given as UUIDs
])
def test_the_local_cuda_index_is_the_place_of_the_ray_gpu_id_among_the_visible_devices(gpu_ids, visible, index):
    assert workers.local_cuda_index(gpu_ids, visible) == index


@pytest.mark.parametrize("gpu_ids, visible, reason", [
    ([], "0,1", "exactly one GPU"),  # an actor that asked for no GPU
    ([0, 1], "0,1", "exactly one GPU"),
    (["2"], "0,1", "not visible"),
    (["2"], "", "not visible"),
    (["GPU-b7"], None, "not visible"),
])
def test_an_actor_without_exactly_one_visible_gpu_is_refused_with_its_ids(gpu_ids, visible, reason):
    with pytest.raises(RuntimeError, match=reason) as refused:
        workers.local_cuda_index(gpu_ids, visible)
    assert str([str(i) for i in gpu_ids]) in str(refused.value) and f"CUDA_VISIBLE_DEVICES={visible!r}" in str(
        refused.value)


@pytest.fixture
def config():
    """A valid config; the teacher ranks made from it never load a model (no ``build``)."""
    return config_from_dict({"max_steps": 1, "student_pretrain": "/models/student", "teacher_pretrain": "/models/t",
                             "student": {"data_args": {"file_name": "/data/train.jsonl"}}}, "test")


@pytest.fixture
def two_gpus(monkeypatch):
    """A node with two GPUs whose CUDA_VISIBLE_DEVICES Ray leaves alone; returns the devices set_device got and a
    function that makes Ray assign GPU ``id`` to the next actor."""
    selected = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, device: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")

    def assign(gpu_id):
        monkeypatch.setattr(ray, "get_gpu_ids", lambda: [gpu_id])

    return selected, assign


def gpu_teacher(config, rank: int) -> TeacherWorker:
    return TeacherWorker(config, None, "object_store", num_threads=1, rank=rank, world_size=2, on_gpu=True)


def test_each_rank_selects_the_gpu_ray_assigned_it(config, two_gpus):
    selected, assign = two_gpus
    devices = []
    for rank in (0, 1):
        assign(rank)
        devices.append(gpu_teacher(config, rank).device)
    assert devices == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert selected == [0, 1]


def test_a_gpu_this_process_cannot_see_is_refused(config, two_gpus, monkeypatch):
    _, assign = two_gpus
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assign(2)  # the node has more GPUs than torch sees here
    with pytest.raises(RuntimeError, match=r"Ray GPU ids \[2\] make CUDA device 2, but this process sees only 2"):
        gpu_teacher(config, 0)


def test_a_cpu_rank_needs_no_ray_and_no_gpu(config, monkeypatch):
    def no_ray():
        raise AssertionError("a CPU rank asked Ray for GPU ids")

    monkeypatch.setattr(ray, "get_gpu_ids", no_ray)
    worker = TeacherWorker(config, None, "object_store", num_threads=1)
    assert worker.device == torch.device("cpu")
    worker.close()


@pytest.fixture
def recorded_groups(monkeypatch):
    """Fakes init_process_group (records its keyword arguments) and pins the node address to 127.0.0.1."""
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    return calls


def test_an_nccl_group_is_bound_to_each_ranks_device(config, two_gpus, recorded_groups):
    _, assign = two_gpus
    ranks = []
    for rank in (0, 1):
        assign(rank)
        ranks.append(gpu_teacher(config, rank))
    try:
        address, port = ranks[0].rendezvous()
        for rank in ranks:
            rank.init_group(address, port)
        assert [args[0] for args, _ in recorded_groups] == ["nccl", "nccl"]
        assert [kwargs["device_id"] for _, kwargs in recorded_groups] == [torch.device("cuda", 0),
                                                                          torch.device("cuda", 1)]
    finally:
        for rank in ranks:
            rank.close()


def test_a_gloo_group_gets_no_device(config, recorded_groups):
    worker = TeacherWorker(config, None, "object_store", num_threads=1, rank=0, world_size=2)
    try:
        worker.init_group(*worker.rendezvous())
        ((args, kwargs),) = recorded_groups
        assert args[0] == "gloo" and "device_id" not in kwargs
    finally:
        worker.close()


# --- rendezvous -----------------------------------------------------------------------------------------------------


def test_rank_0_holds_the_rendezvous_port_until_the_group_forms(config, monkeypatch):
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    worker = TeacherWorker(config, None, "object_store", num_threads=1, rank=0, world_size=2)
    try:
        address, port = worker.rendezvous()
        with socket.socket() as other_process, pytest.raises(OSError) as taken:
            other_process.bind((address, port))
        assert taken.value.errno == errno.EADDRINUSE
    finally:
        worker.close()


def _join_group(config, rank: int, rendezvous: multiprocessing.Queue, results: multiprocessing.Queue) -> None:
    """One rank of a two-rank CPU side, in its own process: rendezvous (rank 0), join, one all_reduce."""
    ray.util.get_node_ip_address = lambda: "127.0.0.1"  # no Ray cluster here; and the group stays on loopback
    worker = TeacherWorker(config, None, "object_store", num_threads=1, rank=rank, world_size=2)
    try:
        if rank == 0:
            address, port = worker.rendezvous()
            rendezvous.put((address, port))  # what _form_group hands every rank
        else:
            address, port = rendezvous.get(timeout=120)
        worker.init_group(address, port)
        total = torch.tensor([rank + 1.0])
        dist.all_reduce(total, group=worker.rank_context().group)
        results.put((rank, total.item()))
    finally:
        worker.close()


def test_two_ranks_form_a_gloo_group_through_rank_0s_rendezvous(config):
    spawn = multiprocessing.get_context("spawn")
    rendezvous, results = spawn.Queue(), spawn.Queue()
    ranks = [spawn.Process(target=_join_group, args=(config, rank, rendezvous, results)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    try:
        sums = dict(results.get(timeout=240) for _ in ranks)
    except queue.Empty:
        pytest.fail(f"the group did not form; exit codes {[p.exitcode for p in ranks]}")
    finally:
        for process in ranks:
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()
    assert sums == {0: 3.0, 1: 3.0}
    assert [process.exitcode for process in ranks] == [0, 0]


def test_a_gpu_rank_caps_its_share_of_the_gpu_it_shares(config, two_gpus, monkeypatch):
    capped = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, device: capped.append(
        (fraction, device)))
    _, assign = two_gpus
    assign(1)
    gpu_teacher(config, 1)
    config.teacher.gpu_memory_fraction = 0.3
    gpu_teacher(config, 1)
    assert capped == [(0.45, torch.device("cuda", 1)), (0.3, torch.device("cuda", 1))]
