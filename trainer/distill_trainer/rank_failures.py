"""A rank that dies mid-run (its node lost, its process killed): noticed at once, and reported as what was lost and
where the run can resume from.

The ranks of a side meet in collectives (the gradients' all-reduce), so when one rank dies the others wait in a
collective for it until the group's timeout (minutes). ``get_all`` therefore waits for whichever call finishes
first and raises the first failure, instead of waiting on the ranks in order. Ray reports a lost node through the
actors that ran there once its GCS has marked the node dead: after ``RAY_health_check_failure_threshold`` missed
health checks, ``RAY_health_check_period_ms`` apart (about 65 s with Ray's defaults; the operator's RayJobs set
faster ones, see ``distill_operator.render``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class ClusterError(RuntimeError):
    """The Ray cluster, not the config, stopped the run (``kubedistill train`` exits 3): a rerun may succeed."""


class RankLostError(ClusterError):
    """A rank of the run died; the message names it, its node, and the checkpoint to resume from."""


class NoRoomError(ClusterError):
    """The cluster cannot place every rank (a node is missing, or too small)."""


def no_room_message(bundles: int, bundle: Mapping[str, float], waited_s: float, total: Mapping[str, float],
                    available: Mapping[str, float], alive_nodes: int) -> str:
    """Why the ranks could not be placed: what they need, what the cluster has."""
    def amounts(resources: Mapping[str, float]) -> str:
        return ", ".join(f"{key} {value:g}" for key, value in sorted(resources.items()) if key in bundle) or "none"

    need = ", ".join(f"{key} {value:g}" for key, value in bundle.items())
    return (f"the Ray cluster found no room for the run's ranks within {waited_s:g} s: they need {bundles} bundle(s) "
            f"of {{{need}}} (one per device of device_mapping, each holding teacher rank i and student rank i); "
            f"the cluster has {alive_nodes} live node(s) with {amounts(total)} in all, {amounts(available)} free. "
            "Start the missing nodes (or free them), or lower device_mapping; nothing was trained.")


def waiting_for_room_message(bundles: int, bundle: Mapping[str, float], available: Mapping[str, float],
                             alive_nodes: int) -> str:
    """What the ranks wait for while their placement group is pending."""
    need = ", ".join(f"{key} {value:g}" for key, value in bundle.items())
    free = ", ".join(f"{key} {value:g}" for key, value in sorted(available.items()) if key in bundle) or "none"
    return (f"{bundles} bundle(s) of {{{need}}}; the cluster has {alive_nodes} live node(s) with {free} free "
            "(a missing node that joins, or a finished job, makes room)")


@dataclass(frozen=True)
class LostNode:
    node_id: str
    address: str
    hostname: str

    def __str__(self) -> str:
        return f"{self.address} ({self.hostname}, node {self.node_id[:8]})"


def rank_failures() -> tuple[type[BaseException], ...]:
    """Ray's errors that mean an actor (a rank) or what it held is gone."""
    from ray import exceptions

    return (exceptions.RayActorError, exceptions.NodeDiedError, exceptions.ObjectLostError)


def get_all(refs: Sequence[Any]) -> list[Any]:
    """``ray.get(refs)``, raising the first failure as soon as it happens rather than once every call before it in
    the list is done (a survivor waiting in a collective for a dead rank would hold it back for minutes)."""
    import ray

    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)  # a failed call raises here
    return ray.get(list(refs))


def lost_rank_cause(error: BaseException) -> BaseException | None:
    """The rank failure behind ``error`` (itself, or the cause of a task error that wraps one), else None."""
    failures = rank_failures()
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, failures):
            return error
        error = getattr(error, "cause", None) or error.__cause__
        seen += 1
    return None


def lost_rank_message(
    *,
    failed: str | None,
    error_text: str,
    dead_nodes: Sequence[LostNode],
    ranks_on: Mapping[str, Sequence[str]],
    step: int,
    newest_checkpoint: str | None,
) -> str:
    """What stopped the run and how to go on. ``failed``: the rank whose call failed ("student rank 1 on host-b
    (10.200.0.2)"), when known; ``ranks_on``: the ranks of the run on each dead node's id."""
    if dead_nodes:
        parts = []
        for node in dead_nodes:
            on = ranks_on.get(node.node_id, ())
            parts.append(f"{node}" + (f", where {', '.join(on)} ran" if on else ""))
        what = f"lost Ray node {'; '.join(parts)}"
    else:
        first_line = error_text.strip().splitlines()[0] if error_text.strip() else "no reason given"
        what = f"{failed or 'a rank'} died ({first_line})"
    resume = (f"The newest checkpoint is {newest_checkpoint}: rerun with resume_from_checkpoint=true to continue "
              "from it" if newest_checkpoint else "No checkpoint was written yet: a rerun starts from the beginning")
    return (f"{what}, during step {step}. The run stopped. {resume} once the cluster has room for every rank again "
            "(under a DistillJob the operator's retry does this).")


def dead_nodes_of(nodes: Iterable[Mapping[str, Any]], node_ids: Iterable[str]) -> list[LostNode]:
    """The run's nodes (``node_ids``) that ``ray.nodes()`` lists as not alive."""
    wanted = set(node_ids)
    return [LostNode(n["NodeID"], n.get("NodeManagerAddress", "?"), n.get("NodeManagerHostname", "?"))
            for n in nodes if n.get("NodeID") in wanted and not n.get("Alive", True)]
