"""How a model runs on a worker's ranks: the interface (base.py) and its implementations, by ``strategy_name``.

``STRATEGIES`` maps each ``strategy_name`` of the config to ``"module:Class"``; the module is imported only when
that strategy is used (megatron-core is an optional extra). A new strategy adds one line here.
"""

from __future__ import annotations

import importlib

STRATEGIES: dict[str, str] = {
    "torch_train": "distill_trainer.strategies.torch:TorchTrainStrategy",
    "torch_infer": "distill_trainer.strategies.torch:TorchInferStrategy",
    "megatron_train": "distill_trainer.strategies.megatron:MegatronTrainStrategy",
    "megatron_infer": "distill_trainer.strategies.megatron:MegatronInferStrategy",
}


def strategy_class(name: str):
    """The class registered as ``name`` (a TrainStrategy for ``*_train``, an InferStrategy for ``*_infer``)."""
    try:
        target = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy_name {name!r}; known: {', '.join(sorted(STRATEGIES))}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
