"""Activation checkpointing of the torch strategies (model_args.disable_gradient_checkpointing: false): the decoder
layers are recomputed in the backward pass, and the gradients are those of the run without it."""

import torch

from distill_trainer.config import ModelArgs
from distill_trainer.strategies.torch import load_causal_lm


def gradients(path, model_args, batch):
    torch.manual_seed(0)
    model = load_causal_lm(path, model_args, torch.device("cpu")).train()
    calls = []
    # A module inside the checkpointed layer (transformers keeps the layer's own hooks outside the checkpoint); a
    # pre-hook, since the recomputation stops as soon as the last saved tensor is recomputed, inside the MLP.
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, len(calls), model


def test_activation_checkpointing_recomputes_layers_and_gives_the_same_gradients(tiny_setup):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 40, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # right padding, as the data pipeline collates
    labels = input_ids.roll(-1, dims=1).masked_fill(attention_mask == 0, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    plain, plain_calls, plain_model = gradients(tiny_setup.student, ModelArgs(), batch)
    checkpointed, checkpointed_calls, model = gradients(
        tiny_setup.student, ModelArgs(disable_gradient_checkpointing=False), batch)

    assert not plain_model.model.layers[0].gradient_checkpointing and model.model.layers[0].gradient_checkpointing
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the layer ran again in the backward pass
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-7, msg=name)
