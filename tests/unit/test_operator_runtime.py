"""The operator's runtime state lives in one OperatorRuntime, configured from the flags (or the environment)."""

from __future__ import annotations

import asyncio
import threading

from distill_operator import handlers, runtime
from distill_operator.__main__ import build_parser, settings_from_args
from distill_operator.runtime import OperatorRuntime
from distill_operator.settings import OperatorSettings


def test_no_module_keeps_runtime_state_in_globals():
    for module in (handlers, runtime):
        for name, value in vars(module).items():
            mutable = isinstance(value, (dict, set, list, type(threading.Lock()), asyncio.Task))
            assert not mutable or name.startswith("__"), f"{module.__name__}.{name} is module state"


def test_runtime_from_environment_matches_the_flags():
    env = {"KUBEDISTILL_RECONCILE_INTERVAL_SECONDS": "0.5", "KUBEDISTILL_ALLOWED_SERVICE_ACCOUNTS": "ml/*",
           "KUBEDISTILL_METRICS_CLIENTS": ""}
    from_env = OperatorRuntime.from_env(env)
    args = build_parser().parse_args(["--reconcile-interval", "0.5", "--allow-service-account", "ml/*",
                                      "--metrics-client", ""])
    assert from_env.reconcile_interval == args.reconcile_interval == 0.5
    assert from_env.settings == settings_from_args(args)
    assert OperatorRuntime.from_env({}).reconcile_interval == runtime.DEFAULT_RECONCILE_INTERVAL == 10
    assert OperatorRuntime.from_env({}).settings == OperatorSettings()


def _body(name: str, state: str | None, generation: int = 1, observed: int | None = 1) -> dict:
    status = {"state": state, "observedGeneration": observed} if state else {}
    return {"metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "generation": generation},
            "spec": {"image": "x"}, "status": status}


def test_runtimes_are_independent_and_forget_deleted_jobs():
    first, second = OperatorRuntime(), OperatorRuntime()
    # A finished job is only recorded (no API call: this runtime has no API client and must not need one).
    first.distilljob_event("MODIFIED", _body("done", "Succeeded"), "ns", "done")
    assert ("ns", "done") in first._watched and ("ns", "done-progress") in first._progress_of
    assert not second._watched and first._api is None
    first._retry.add(("ns", "done"))
    first._acted.add(("ns", "done"))
    first.distilljob_event("DELETED", _body("done", "Succeeded"), "ns", "done")
    assert not (first._watched or first._retry or first._acted or first._progress_of or first._locks)


def test_progress_of_an_unknown_configmap_is_ignored():
    state = OperatorRuntime()
    state.progress_event("MODIFIED", {"metadata": {"ownerReferences": [{"uid": "x"}]}, "data": {}}, "ns", "a-progress")
    assert state._api is None


def test_handlers_reach_the_runtime_through_kopf_memo():
    import kopf

    memo = kopf.Memo()
    settings = kopf.OperatorSettings()

    async def startup_and_cleanup():
        await handlers.configure(settings=settings, memo=memo)
        assert isinstance(memo.runtime, OperatorRuntime) and memo.runtime._timer_task is not None
        await handlers.stop_timer(memo=memo)
        assert memo.runtime._timer_task is None

    asyncio.run(startup_and_cleanup())
    given = OperatorRuntime(reconcile_interval=3)
    memo = kopf.Memo(runtime=given)

    async def keeps_a_given_runtime():
        await handlers.configure(settings=settings, memo=memo)
        await handlers.stop_timer(memo=memo)

    asyncio.run(keeps_a_given_runtime())
    assert memo.runtime is given
