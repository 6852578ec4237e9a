"""Training-time model wrappers: LoRA adapters (PEFT) and gradient checkpointing.

With LoRA, every training stage starts a fresh adapter on the current weights and merges it at the end, so the model
saved after a stage is an ordinary full checkpoint and, within a stage, "adapter disabled" is exactly the stage-start
(round-start) model — the reference of SGPO's rounds, with no second copy of the weights in memory.
"""
from __future__ import annotations

from contextlib import contextmanager

from ..config import ModelConfig


@contextmanager
def trainable(model, cfg: ModelConfig):
    """Yield the model to train (a PEFT model with LoRA when ``cfg.lora_r`` > 0); afterwards the plain model is back,
    with the adapter merged into its weights. ``cfg.gradient_checkpointing`` trades compute for activation memory."""
    lora_r, gradient_checkpointing = cfg.lora_r, cfg.gradient_checkpointing
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    train_model = model
    if lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        train_model = get_peft_model(model, lora)
    try:
        yield train_model
    finally:
        if lora_r > 0:
            train_model.merge_and_unload()
        if gradient_checkpointing:
            model.gradient_checkpointing_disable()
            model.config.use_cache = True
