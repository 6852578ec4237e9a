"""Training-time model wrappers: LoRA adapters (PEFT) and gradient checkpointing.

With LoRA, every training stage starts a fresh adapter on the current weights and merges it at the end, so the model
saved after a stage is an ordinary full checkpoint and, within a stage, "adapter disabled" is exactly the stage-start
(round-start) model — the reference of SGPO's rounds, with no second copy of the weights in memory.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from sgpo.config.schema import ModelConfig


@contextmanager
def trainable(model, cfg: ModelConfig, sharded: bool = False, seed: int = 0):
    """Yield the model to train (a PEFT model with LoRA when ``cfg.lora_r`` > 0); afterwards the plain model is back,
    with the adapter merged into its weights. ``cfg.gradient_checkpointing`` trades compute for activation memory.
    ``sharded`` (FSDP, DeepSpeed): the weights in memory are shards and placeholders, never merged into; the run goes
    on from the export, where the adapter is merged on the gathered weights (``merged_state``). The adapter's random
    start is drawn from ``seed``: the same in every process (FSDP does not broadcast it) and in a one-process run."""
    lora_r, gradient_checkpointing = cfg.lora_r, cfg.gradient_checkpointing
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    train_model = model
    if lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            train_model = get_peft_model(model, lora)
    try:
        yield train_model
    finally:
        if lora_r > 0 and not sharded:
            train_model.merge_and_unload()
        if gradient_checkpointing:
            model.gradient_checkpointing_disable()
            model.config.use_cache = True


def merged_state(model, state: dict) -> dict:
    """A PEFT LoRA model's gathered full ``state`` (its own key names) as the base model's state dict with every
    adapter merged: W + scaling · B·A under the base layer's name. The model only names the LoRA layers and gives their
    scaling; the weights come from ``state``. A model without adapters: ``state`` as it is."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        return state
    prefix = "base_model.model."
    out = {k.removeprefix(prefix): v for k, v in state.items() if ".lora_" not in k}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        base = f"{name.removeprefix(prefix)}.base_layer.weight"
        weight = out.pop(base).float()
        for adapter in layer.active_adapters:
            a, b = state[f"{name}.lora_A.{adapter}.weight"].float(), state[f"{name}.lora_B.{adapter}.weight"].float()
            delta = (b @ a) * layer.scaling[adapter]
            weight = weight + (delta.T if getattr(layer, "fan_in_fan_out", False) else delta)
        out[base.replace(".base_layer", "")] = weight.to(state[f"{name}.base_layer.weight"].dtype)
        bias = f"{name.removeprefix(prefix)}.base_layer.bias"
        if bias in out:
            out[bias.replace(".base_layer", "")] = out.pop(bias)
    return out
