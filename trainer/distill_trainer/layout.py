"""The parallel layout against the models' shapes, checked before Ray starts.

Megatron-Core asserts its layout constraints only once a rank builds its model, after Ray, the actors and the
process groups are up (``AssertionError: num_layers should be divisible by pipeline_model_parallel_size``). The
same constraints are checked here from each model's ``config.json``, and a layout that cannot work is refused
with the numbers and what would fit:

- the pipeline splits the transformer layers evenly: layers % pp_size == 0;
- tensor parallelism splits attention heads, key/value heads (query groups) and the MLP's inner width:
  each % tp_size == 0.

The vocabulary needs no check: Megatron pads it to a multiple of 128 x tp_size, and the padded columns are masked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import ConfigError, DistillConfig

# (what Megatron splits, the config.json keys that may hold it, the parallel size that splits it)
_SPLITS = (
    ("transformer layers", ("num_hidden_layers", "n_layer", "num_layers"), "pp_size"),
    ("attention heads", ("num_attention_heads", "n_head"), "tp_size"),
    ("key/value heads", ("num_key_value_heads",), "tp_size"),
    ("MLP inner width", ("intermediate_size", "ffn_hidden_size", "n_inner"), "tp_size"),
)


def _first(model_config: Mapping[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = model_config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def layout_problems(side: str, model_path: str, model_config: Mapping[str, Any], tp_size: int,
                    pp_size: int) -> list[str]:
    """Each split of ``model_config`` (a config.json as a dict) that ``tp_size`` / ``pp_size`` cannot make evenly."""
    sizes = {"tp_size": tp_size, "pp_size": pp_size}
    problems = []
    for what, keys, size_name in _SPLITS:
        count, size = _first(model_config, keys), sizes[size_name]
        if count is None or size == 1 or count % size == 0:
            continue
        fits = [d for d in range(1, count + 1) if count % d == 0]
        problems.append(
            f"{side}.strategy_args.{size_name}={size} does not divide the {count} {what} of {model_path} "
            f"(Megatron splits them evenly over {size_name}); {size_name} values that fit: "
            f"{', '.join(map(str, fits))}"
        )
    return problems


def check_parallel_layout(config: DistillConfig) -> None:
    """Refuse (ConfigError) a Megatron layout that the student's or the teacher's shape cannot take."""
    import json
    from pathlib import Path

    problems = []
    sides = ["student"] + (["teacher"] if config.distill_loss_weight > 0 else [])
    for side in sides:
        args = getattr(config, side).strategy_args
        if not args.strategy_name.startswith("megatron") or (args.tp_size == 1 and args.pp_size == 1):
            continue
        path = config.student_pretrain if side == "student" else config.teacher_pretrain
        config_file = Path(path) / "config.json"
        try:
            model_config = json.loads(config_file.read_text())
        except (OSError, ValueError):
            continue  # a model without a readable config.json is refused where the model is loaded
        model_config = model_config.get("text_config", model_config)  # multimodal configs nest the LM's
        problems += layout_problems(side, path, model_config, args.tp_size, args.pp_size)
    if problems:
        raise ConfigError("the parallel layout does not fit the model:\n  " + "\n  ".join(problems))
