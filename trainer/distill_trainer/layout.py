"""The parallel layout against the models' shapes, checked before Ray starts.

Megatron-Core asserts its layout constraints only once a rank builds its model, after Ray, the actors and the
process groups are up (``AssertionError: num_layers should be divisible by pipeline_model_parallel_size``). The
same constraints are checked here from each model's ``config.json``, and a layout that cannot work is refused
with the numbers and what would fit:

- the pipeline gives every stage at least one transformer layer (layers >= pp_size), and explicit
  ``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage`` leave the middle stages an equal
  number of layers, at least one each (Megatron-Core's rule for uneven pipelines, checked in its
  ``TransformerConfig.__post_init__`` and ``get_num_layers_to_build``);
- tensor parallelism splits attention heads, key/value heads (query groups) and the MLP's inner width:
  each % tp_size == 0.

Pipeline splits (``pipeline_stage_layers``). When pp_size divides the layers and neither count is set, every stage
gets layers / pp_size (Megatron's default). When it does not divide them and neither is set, Megatron itself would
refuse (``num_layers should be divisible by pipeline_model_parallel_size``); here a split is chosen instead and
passed to Megatron as ``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage``: the one with
the fewest layers on the busiest stage, and of those the one with the first and last stages lightest, the last
lightest of all (the first stage also embeds, the last also computes the output layer and the loss, with a
vocabulary of 150k columns the heaviest single layer of a Qwen-sized model). 3 layers over 2 stages: 2 | 1; 28 over
3: 9 | 10 | 9; 30 over 4: 7 | 8 | 8 | 7. The chosen split is logged; setting either count chooses another.

The vocabulary needs no check: Megatron pads it to a multiple of 128 x tp_size (``megatron_bridge.padded_vocab_size``),
so every vocabulary size splits over any tp_size; the padded columns are masked to -inf. The world size
(len(device_mapping) a multiple of tp_size x pp_size) is checked by the config itself (``DistillConfig``), and the
number of micro-batches per step only warns: Megatron's non-interleaved 1F1B schedule runs any number of them,
fewer than pp_size only idles the stages longer (``pipeline_bubble_warning``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from .config import ConfigError, DistillConfig

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # config.json keys that may hold the layer count
# (what Megatron splits, the config.json keys that may hold it, the parallel size that splits it)
_SPLITS = (
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


FIRST, LAST = "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"


def _auto_split(layers: int, pp_size: int) -> list[int]:
    """Layers per stage when pp_size does not divide them (2 <= pp_size <= layers): Megatron's uneven form (first and
    last stage free, the middle ones equal), the busiest stage as light as possible, then the first and last stages
    lightest, the last lightest of all."""
    best = None
    for middle in range(1, layers + 1) if pp_size > 2 else [0]:
        ends = layers - (pp_size - 2) * middle
        for first in range(1, ends):
            last = ends - first
            key = (max(first, middle, last), max(first, last), last)
            if best is None or key < best[0]:
                best = (key, [first] + [middle] * (pp_size - 2) + [last])
    return best[1]


def pipeline_stage_layers(layers: int, pp_size: int, first: int | None = None, last: int | None = None, *,
                          where: str = "strategy_args", model: str = "the model") -> list[int]:
    """The transformer layers of each pipeline stage, as Megatron-Core 0.16.1 builds them from pp_size and
    ``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage`` (``first`` / ``last``; None: not
    set), or the split chosen when pp_size does not divide the layers and neither is set (module docstring).
    ValueError, naming ``where``'s fields, ``model`` and the numbers, for a split Megatron cannot build."""
    if pp_size == 1:
        if first is not None or last is not None:
            name = FIRST if first is not None else LAST
            raise ValueError(f"{where}.{name} needs {where}.pp_size > 1 (it is 1)")
        return [layers]
    if layers < pp_size:
        raise ValueError(
            f"{where}.pp_size={pp_size} is more than the {layers} transformer layers of {model}: every pipeline stage "
            f"needs at least one layer; pp_size values that fit: {'1' if layers == 1 else f'1 to {layers}'}")
    if first is None and last is None:
        return [layers // pp_size] * pp_size if layers % pp_size == 0 else _auto_split(layers, pp_size)
    set_names = " + ".join(f"{where}.{name}={value}" for name, value in ((FIRST, first), (LAST, last))
                           if value is not None)
    rest = layers - (first or 0) - (last or 0)
    middle = pp_size - (first is not None) - (last is not None)  # the stages that share the rest equally
    if middle == 0 and rest != 0:
        raise ValueError(f"{set_names} must add up to the {layers} transformer layers of {model} with "
                         f"{where}.pp_size=2 (got {layers - rest})")
    if middle and (rest < middle or rest % middle):
        leave = "leave" if middle < pp_size - 1 else "leaves"
        raise ValueError(
            f"{set_names} {leave} {max(rest, 0)} of the {layers} transformer layers of {model} for the other "
            f"{middle} pipeline stage(s) of {where}.pp_size={pp_size}; Megatron gives each of them the same number, "
            f"at least one: the rest must be a positive multiple of {middle}")
    share = rest // middle if middle else 0
    return [first if first is not None else share] + [share] * (pp_size - 2) + [last if last is not None else share]


def pipeline_split_settings(layers: int, pp_size: int, first: int | None = None, last: int | None = None) -> dict:
    """TransformerConfig fields for the split of ``pipeline_stage_layers``: none for Megatron's even default, else
    ``num_layers_in_first_pipeline_stage`` and ``num_layers_in_last_pipeline_stage`` (the middle stages follow)."""
    stages = pipeline_stage_layers(layers, pp_size, first, last)
    if first is None and last is None and len(set(stages)) == 1:
        return {}
    return {FIRST: stages[0], LAST: stages[-1]}


def describe_split(side: str, layers: int, pp_size: int, first: int | None = None,
                   last: int | None = None) -> str | None:
    """The log line for a split pp_size does not make evenly by itself (None for an even split)."""
    stages = pipeline_stage_layers(layers, pp_size, first, last)
    if first is None and last is None and len(set(stages)) == 1:
        return None
    how = "as set" if first is not None or last is not None else (
        f"chosen because pp_size={pp_size} does not divide them; set {side}.strategy_args.{FIRST} / {LAST} "
        "for another split")
    return (f"{side}: {layers} transformer layers over {pp_size} pipeline stages: {' | '.join(map(str, stages))} "
            f"({FIRST}={stages[0]}, {LAST}={stages[-1]}; {how})")


def layout_problems(side: str, model_path: str, model_config: Mapping[str, Any], tp_size: int,
                    pp_size: int, first: int | None = None, last: int | None = None) -> list[str]:
    """Each split of ``model_config`` (a config.json as a dict) that ``tp_size`` / ``pp_size`` (with ``first`` /
    ``last``: the side's num_layers_in_first/last_pipeline_stage) cannot make."""
    sizes = {"tp_size": tp_size, "pp_size": pp_size}
    problems = []
    layers = _first(model_config, _LAYER_KEYS)
    if layers is not None:
        try:
            pipeline_stage_layers(layers, pp_size, first, last, where=f"{side}.strategy_args", model=model_path)
        except ValueError as error:
            problems.append(str(error))
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


def pipeline_bubble_warning(pp_size: int, micro_batches: int) -> str | None:
    """Megatron's 1F1B schedule runs any number of micro-batches per step, but with fewer than pp_size each stage
    idles for most of the step: the bubble is (pp - 1) / (m + pp - 1) of it. Not an error; worth a warning."""
    if pp_size == 1 or micro_batches >= pp_size:
        return None
    bubble = (pp_size - 1) / (micro_batches + pp_size - 1)
    return (f"student.training_args.gradient_accumulation_steps={micro_batches} is below pp_size={pp_size}: each "
            f"pipeline stage idles {bubble:.0%} of every step (Megatron's 1F1B bubble, (pp-1)/(m+pp-1)); "
            f"gradient_accumulation_steps >= {4 * pp_size} keeps it at most {(pp_size - 1) / (5 * pp_size - 1):.0%}")


def check_parallel_layout(config: DistillConfig, sides: Sequence[str] | None = None) -> None:
    """Refuse (ConfigError) a Megatron layout that the student's or the teacher's shape cannot take; ``sides``:
    the sides that run (default: the student, and the teacher when the run has a live one)."""
    import json
    from pathlib import Path

    from .config import runs_live_teacher

    problems, splits = [], []
    if sides is None:
        sides = ["student"] + (["teacher"] if runs_live_teacher(config) else [])
    for side in sides:
        args = getattr(config, side).strategy_args
        first, last = getattr(args, FIRST, None), getattr(args, LAST, None)
        if not args.strategy_name.startswith("megatron") or (
                args.tp_size == 1 and args.pp_size == 1 and first is None and last is None):
            continue
        path = config.student_pretrain if side == "student" else config.teacher_pretrain
        config_file = Path(path) / "config.json"
        try:
            model_config = json.loads(config_file.read_text())
        except (OSError, ValueError):
            continue  # a model without a readable config.json is refused where the model is loaded
        model_config = model_config.get("text_config", model_config)  # multimodal configs nest the LM's
        side_problems = layout_problems(side, path, model_config, args.tp_size, args.pp_size, first, last)
        problems += side_problems
        layers = _first(model_config, _LAYER_KEYS)
        if not side_problems and layers is not None:
            splits.append(describe_split(side, layers, args.pp_size, first, last))
    if problems:
        raise ConfigError("the parallel layout does not fit the model:\n  " + "\n  ".join(problems))
    for split in filter(None, splits):
        logging.getLogger(__name__).info(split)
    student = config.student
    if "student" in sides and student.strategy_args.strategy_name.startswith("megatron"):
        warning = pipeline_bubble_warning(student.strategy_args.pp_size,
                                          student.training_args.gradient_accumulation_steps)
        if warning:
            logging.getLogger(__name__).warning(warning)
