"""Measured peaks of sgpo's own training calls (NLL, DPO, the reference pass) on a model of a given size: what
``tests/models/test_memory.py`` holds the computed figures of ``sgpo.models.sizes`` against, and what the GPU check measures."""
from __future__ import annotations

from sgpo.models.sizes import held_bytes, peak_bytes


def training_peak(model, positions: int, kind: str = "nll", lora_r: int = 0, steps: int = 2) -> int:
    """The measured peak on ``model``'s device (``peak_bytes``, plus the model's own bytes) of ``steps`` optimizer
    steps of one micro-batch of ``positions`` each, through sgpo's own training calls with gradient checkpointing:
    NLL on a one-token prompt (every position's logits kept), or DPO on pairs of a two-token prompt and two halves;
    LoRA (r = ``lora_r``, every linear layer) when ``lora_r``. The weights are trained (random ones are)."""
    import torch

    from sgpo.config.schema import DPOConfig, ModelConfig, TrainConfig
    from sgpo.training.adapters import trainable
    from sgpo.training.dpo import TokenPair, train_dpo
    from sgpo.training.loop import Job
    from sgpo.training.sft import NLLExample, train_nll

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = lambda k: tuple(torch.randint(3, vocab, (k,), generator=g).tolist())  # noqa: E731
    job = Job(0, 0, show_progress=False, max_positions=positions)
    half = (positions - 2) // 2

    def train():
        with trainable(model, ModelConfig(gradient_checkpointing=True, lora_r=lora_r), seed=0) as m:
            if kind == "nll":
                train_nll(m, [NLLExample(ids(1), ids(positions - 1)) for _ in range(steps)],
                          TrainConfig(batch_size=1, checkpoint_every=0), job)
            else:
                train_dpo(m, [TokenPair(ids(2), ids(half), ids(half), 0.0, 0.0) for _ in range(steps)],
                          DPOConfig(batch_size=1, checkpoint_every=0), job)

    device = next(model.parameters()).device.type
    return held_bytes(model) + peak_bytes(train, device)


def reference_peak(model, positions: int) -> int:
    """The measured peak (as ``training_peak``) of the reference pass over pairs that make one forward of
    ``positions`` (the packed layout: four pairs of a prompt of half a row and two quarter-row responses, so that the
    logits of half the positions are kept)."""
    import torch

    from sgpo.training.dpo import TokenPair, reference_logps

    vocab, row = model.config.vocab_size, positions // 4
    g = torch.Generator().manual_seed(0)
    ids = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731
    pairs = [TokenPair(ids(row // 2), ids(row // 4), ids(row // 4)) for _ in range(4)]
    device = next(model.parameters()).device.type
    run = lambda: reference_logps(model, pairs, pad_id=0, batch_size=4, show_progress=False)  # noqa: E731
    return held_bytes(model) + peak_bytes(run, device)
