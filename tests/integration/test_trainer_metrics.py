"""A real (tiny) distillation run with metrics_port set serves the kubedistill_trainer_* series over HTTP."""

from __future__ import annotations

import math
import socket
import urllib.request

import pytest

from prometheus_client.parser import text_string_to_metric_families

from distill_trainer import prometheus_sink as ps
from distill_trainer.config import config_from_dict
from distill_trainer.pipeline import DistillPipeline
from tests.conftest import tiny_config_dict


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class ScrapedAtTheEnd(DistillPipeline):
    """The real pipeline; its Prometheus sink is scraped over HTTP as the run ends, just before it stops serving."""

    scrapes: list[dict] = []

    def _sinks(self):
        sinks = super()._sinks()
        (sink,) = [s for s in sinks if isinstance(s, ps.PrometheusSink)]
        close = sink.close

        def scrape_then_close():
            self.scrapes.append(scrape(sink.port))
            close()

        sink.close = scrape_then_close
        return sinks


def test_run_with_metrics_port_serves_every_trainer_series(tiny_setup, tmp_path, local_ray, monkeypatch):
    monkeypatch.delenv("KUBEDISTILL_DISTILLJOB_NAME", raising=False)
    port = free_port()
    config = config_from_dict(tiny_config_dict(
        tiny_setup, tmp_path, max_steps=2, save_steps=2, eval_steps=2, eval_exact_match=True, eval_max_new_tokens=4,
        metrics_port=port, exp_name="metrics-test"))
    pipeline = ScrapedAtTheEnd(config, num_threads=1, console=False)
    result = pipeline.run()

    (samples,) = pipeline.scrapes
    job = {"distilljob_namespace": "", "distilljob_name": "", "exp_name": "metrics-test"}

    def get(name, **extra):
        return samples.get((name, tuple(sorted({**job, **extra}.items()))))

    assert get(ps.STEP) == result.final_step == 2 and get(ps.MAX_STEPS) == 2
    for term in ("total", "distill", "student"):
        assert math.isfinite(get(ps.LOSS, term=term)) and get(ps.LOSS, term=term) > 0, term
    assert get(ps.LOSS, term="total") == result.last_train_metrics["train/loss"]
    for phase in ("teacher_forward", "logits_transfer", "student_step"):
        assert get(ps.STEP_PHASE_SECONDS, phase=phase) >= 0, phase
    assert get(ps.STEP_PHASE_SECONDS, phase="student_step") > 0
    assert get(ps.LEARNING_RATE) > 0 and get(ps.GRAD_NORM) > 0 and get(ps.TOKENS_PER_SECOND) > 0
    assert get(ps.EVAL_LOSS) == result.eval_metrics["val/loss"]
    assert get(ps.EVAL_EXACT_MATCH) == result.eval_metrics["val/exact_match"]
    assert get(ps.LAST_CHECKPOINT_STEP) == 2
    assert get(ps.START_TIMESTAMP) <= get(ps.LAST_CHECKPOINT_TIMESTAMP)
    assert get(ps.NONFINITE_STEPS) == 0
    # After the run nothing listens any more (metrics_linger_seconds is 0 by default).
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
