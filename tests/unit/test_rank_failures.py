"""A rank lost mid-run: the message a user gets (pure), how a failure is recognised through Ray's wrappers, that the
first failure is raised without waiting for the other ranks (real local Ray), and the gloo interface choice."""

from __future__ import annotations

import time

import pytest

from distill_trainer import node_network
from distill_trainer.rank_failures import LostNode, dead_nodes_of, get_all, lost_rank_cause, lost_rank_message


def test_a_lost_node_is_named_with_its_ranks_the_step_and_the_checkpoint_to_resume_from():
    node = LostNode("b" * 56, "10.200.0.2", "host-b")
    text = lost_rank_message(failed="student rank 1 on host-b (10.200.0.2)", error_text="The actor died",
                             dead_nodes=[node], ranks_on={node.node_id: ["student rank 1", "teacher rank 1"]},
                             step=7, newest_checkpoint="/out/checkpoint-6")
    assert text.startswith("lost Ray node 10.200.0.2 (host-b, node bbbbbbbb), where student rank 1, teacher rank 1 "
                           "ran, during step 7. The run stopped.")
    assert "The newest checkpoint is /out/checkpoint-6: rerun with resume_from_checkpoint=true" in text


def test_a_dead_rank_on_a_live_node_is_named_by_rank_and_first_line_of_the_reason():
    text = lost_rank_message(failed="teacher rank 0 on host-a (10.0.0.1)", error_text="killed by OOM\ntrace...",
                             dead_nodes=[], ranks_on={}, step=3, newest_checkpoint=None)
    assert text.startswith("teacher rank 0 on host-a (10.0.0.1) died (killed by OOM), during step 3.")
    assert "No checkpoint was written yet: a rerun starts from the beginning" in text


def test_only_the_runs_own_dead_nodes_are_reported():
    nodes = [{"NodeID": "a", "Alive": True, "NodeManagerAddress": "1", "NodeManagerHostname": "x"},
             {"NodeID": "b", "Alive": False, "NodeManagerAddress": "2", "NodeManagerHostname": "y"},
             {"NodeID": "c", "Alive": False, "NodeManagerAddress": "3", "NodeManagerHostname": "z"}]
    assert dead_nodes_of(nodes, {"a", "b"}) == [LostNode("b", "2", "y")]


def test_a_rank_failure_is_found_inside_a_task_error():
    from ray import exceptions

    died = exceptions.ActorDiedError()
    wrapped = exceptions.RayTaskError("train_step", "traceback", died)
    assert lost_rank_cause(died) is died
    assert isinstance(lost_rank_cause(wrapped), exceptions.RayActorError)
    assert lost_rank_cause(ValueError("user error")) is None


def test_the_first_failure_is_raised_while_other_ranks_still_run(local_ray):
    import ray

    @ray.remote(num_cpus=0)
    def slow():
        time.sleep(30)

    @ray.remote(num_cpus=0)
    def fails():
        raise RuntimeError("rank 1 failed")

    start = time.monotonic()
    with pytest.raises(ray.exceptions.RayTaskError, match="rank 1 failed"):
        get_all([slow.remote(), fails.remote()])  # in list order, ray.get would wait 30 s for the first
    assert time.monotonic() - start < 15


def test_gloo_is_bound_to_the_interface_of_the_nodes_address_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv(node_network.GLOO_INTERFACE_ENV, raising=False)
    assert node_network.interface_with_address("127.0.0.1") == "lo"
    assert node_network.interface_with_address("192.0.2.123") is None  # TEST-NET: on no interface
    node_network.bind_gloo_to("127.0.0.1")
    assert node_network.os.environ[node_network.GLOO_INTERFACE_ENV] == "lo"
    monkeypatch.setenv(node_network.GLOO_INTERFACE_ENV, "eth7")
    node_network.bind_gloo_to("127.0.0.1")
    assert node_network.os.environ[node_network.GLOO_INTERFACE_ENV] == "eth7"


def test_no_room_names_what_the_ranks_need_and_what_the_cluster_has():
    from distill_trainer.rank_failures import no_room_message

    text = no_room_message(4, {"CPU": 1, "GPU": 1}, 300, {"CPU": 32.0, "GPU": 2.0, "memory": 1e11},
                           {"CPU": 30.0, "GPU": 0.0}, alive_nodes=1)
    assert text.startswith("the Ray cluster found no room for the run's ranks within 300 s: they need 4 bundle(s) "
                           "of {CPU 1, GPU 1}")
    assert "the cluster has 1 live node(s) with CPU 32, GPU 2 in all, CPU 30, GPU 0 free" in text


def test_waiting_for_room_names_what_the_ranks_wait_for():
    from distill_trainer.rank_failures import waiting_for_room_message

    text = waiting_for_room_message(2, {"CPU": 1}, {"CPU": 0.5, "memory": 1e9}, alive_nodes=1)
    assert text == ("2 bundle(s) of {CPU 1}; the cluster has 1 live node(s) with CPU 0.5 free (a missing node that "
                    "joins, or a finished job, makes room)")
