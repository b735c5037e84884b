"""Console entry points: ``kubedistill train|cache-teacher|demo|operator``.

``examples/start_distill_pipeline.py --config_path DIR --config_name NAME`` (the original launcher's
interface) calls ``launch`` below too, so both paths validate and report errors the same way.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from .checkpoint import CheckpointError
from .config import ConfigError, DistillConfig, compose_config, load_config
from .data import DataError
from .pipeline import NonFiniteLossError
from .rank_failures import ClusterError

# Mistakes in the user's config, data, output or resume paths, another run's checkpoints in output_dir, a
# full disk, a diverged run: one message and exit status 2, no traceback. The cluster (a lost node or
# rank, no room for the ranks): its message, status 3.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, CheckpointError, NonFiniteLossError)


def _run(load: Callable[[], DistillConfig], work: Callable[[DistillConfig], str]) -> int:
    """Validate, run ``work`` (which returns the closing summary), and turn user mistakes into one readable
    message and exit status 2 (the cluster's: 3)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = work(load())
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ClusterError as error:  # not the user's mistake: a node or rank lost, or no room for the ranks
        print(f"error: {error}", file=sys.stderr)
        return 3
    print(summary)
    return 0


def _train(config: DistillConfig) -> str:
    from .pipeline import DistillPipeline

    result = DistillPipeline(config).run()
    lines = [f"finished at step {result.final_step}; checkpoint: {result.last_checkpoint}"]
    lines += [f"  {name} = {value:.4f}" for name, value in sorted(result.eval_metrics.items())]
    return "\n".join(lines)


def _cache_teacher(config: DistillConfig) -> str:
    from .teacher_cache.writer import CacheTeacherRun

    result = CacheTeacherRun(config).run()
    return (f"teacher cache complete: {result.directory} ({result.records} records in {result.shards} shards; "
            f"{result.written} written now, in {result.seconds:.1f} s)")


def launch(load: Callable[[], DistillConfig]) -> int:
    """``kubedistill train``: validate, run, and turn user mistakes into one readable message and exit status 2."""
    return _run(load, _train)


def cache_teacher(load: Callable[[], DistillConfig]) -> int:
    """``kubedistill cache-teacher``: write (or finish) the teacher cache of a config; errors as ``launch``."""
    return _run(load, _cache_teacher)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The operator and the demo have their own argument parsers.
    if argv and argv[0] == "operator":
        from distill_operator.__main__ import main as operator_main

        return operator_main(argv[1:])
    if argv and argv[0] == "demo":
        from .demo.run import main as demo_main

        return demo_main(argv[1:])

    parser = argparse.ArgumentParser(prog="kubedistill", description="Knowledge distillation of LLMs on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="run a distillation from a YAML config",
        description="Run a distillation. Overrides use Hydra syntax: key=value, nested.key=value, +new_key=value.",
    )
    train.add_argument("config", help="path to the YAML config, e.g. examples/tiny/distill.yaml")
    train.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. max_steps=100 kd_objective=reverse_kl")
    cache = commands.add_parser(
        "cache-teacher",
        help="run only the teacher over a config's training data and write its targets to teacher_cache_dir",
        description="Write the teacher cache of a distill config: the teacher's targets (top-k log-probabilities "
        "with their indices and the tail mass, or the full vocabulary with logits_topk=0) for every training record, "
        "to teacher_cache_dir, in shards. A training run with the same config and teacher_cache_dir then starts no "
        "teacher. Rerun after an interruption: only the missing shards are written. Overrides use Hydra syntax.",
    )
    cache.add_argument("config", help="path to the YAML config of the training runs that will read the cache")
    cache.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. teacher_cache_dir=/data/cache")
    commands.add_parser("demo", help="build a tiny teacher and student offline and distill on CPU (see --help)")
    commands.add_parser("operator", help="run the DistillJob Kubernetes operator (see `kubedistill operator --help`)")

    args = parser.parse_args(argv)
    if args.command == "cache-teacher":
        return cache_teacher(lambda: load_config(args.config, args.overrides))
    return launch(lambda: load_config(args.config, args.overrides))


def start_distill_pipeline(argv: Sequence[str] | None = None) -> int:
    """``start_distill_pipeline.py --config_path DIR --config_name NAME [key=value ...]``."""
    parser = argparse.ArgumentParser(description="Start a distillation pipeline from a Hydra config directory.")
    parser.add_argument("--config_path", required=True, help="directory holding the YAML config")
    parser.add_argument("--config_name", required=True, help="config file name without .yaml")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. max_steps=100")
    args = parser.parse_args(argv)
    return launch(lambda: compose_config(args.config_path, args.config_name, args.overrides))


if __name__ == "__main__":
    sys.exit(main())
