"""Memory: training maps its large buffers on their own and leaves glibc with a threshold at which the heap serves
generation's buffers again (the peak and speed effects are measured by benchmarks/training_memory.py); the training
memory estimate (``sgpo.models.sizes``) against a peak measured on a CPU; the vLLM engine's share of the GPU beside training,
and the policy's loaded copy let go during a vLLM rollout."""
import ctypes
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sgpo.models import loading as models
from sgpo.models import sizes
from sgpo.training import memory

REPO = Path(__file__).resolve().parents[2]


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


def test_training_buffers_are_mapped_and_the_threshold_is_raised_after(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    with models.mapped_buffers():
        assert libc.calls == [(-3, models.MAPPED_THRESHOLD)]  # M_MMAP_THRESHOLD while training
    assert libc.calls[1:] == [(-3, 32 << 20), (-1, 64 << 20)]  # glibc's upper values afterwards
    libc.calls.clear()
    with pytest.raises(RuntimeError):
        with models.mapped_buffers():
            raise RuntimeError("a failed training step")
    assert libc.calls[-2:] == [(-3, 32 << 20), (-1, 64 << 20)]  # restored on failure too


def test_without_glibc_nothing_is_set(monkeypatch):
    def missing(name):
        raise OSError(name)

    monkeypatch.setattr(ctypes, "CDLL", missing)
    with models.mapped_buffers():
        pass


# -- the training-memory estimate (sgpo.models.sizes) against a measured peak, and the vLLM engine's share beside it ----------
FACTOR = (0.9, 1.25)  # the estimate may over-state a measured peak by 25%, never under-state it by more than 10%


def measured_training_peak(shape: dict, positions: int, kind: str) -> tuple[int, sizes.Shape]:
    """The peak of torch's allocations (``memory.training_peak``: the CPU profiler) while a random bf16 Llama of
    ``shape`` trains for two optimizer steps of one micro-batch of ``positions`` each, gradient checkpointing on,
    through sgpo's own training calls (NLL or DPO, MasterAdamW: the one-GPU path); and its ``sizes.Shape``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      max_position_embeddings=positions + 8, **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    peak = memory.training_peak(model, positions, kind)
    return peak, sizes.Shape(params, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size)


def test_the_estimate_matches_a_measured_peak_where_the_logits_dominate():
    """DPO on 2,048 positions over a 2k vocabulary, a 0.39M-parameter model: the LM head's bf16 logits and the fp32
    log-sum-exp chunks autograd keeps for the backward are most of the peak (measured 57.5 MB, estimated 62.8 MB; the
    estimate before it counted them, bf16 logits and one fp32 chunk, said 29 MB)."""
    peak, shape = measured_training_peak(dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                              vocab_size=2048), 2048, "dpo")
    estimate = sizes.per_gpu_bytes(shape, "single GPU", 1, 2048)
    assert FACTOR[0] * peak <= estimate <= FACTOR[1] * peak, (estimate / 1e6, peak / 1e6)
    assert peak > 1.5 * sizes.state_bytes(shape, "single GPU", 1)[1]  # the activations do dominate here


def test_the_estimate_matches_a_measured_peak_at_the_optimizer_step():
    """NLL on 32 positions, a 4.2M-parameter model: the peak is MasterAdamW's step, 24 bytes a parameter (bf16 weights
    and gradients, fp32 masters, their fp32 gradients, two moments and AdamW's foreach temporary; measured 100.7 MB,
    estimated the same); the estimate before it counted 16 bytes and said 70 MB."""
    peak, shape = measured_training_peak(dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                              vocab_size=512), 32, "nll")
    estimate = sizes.per_gpu_bytes(shape, "single GPU", 1, 32)
    assert FACTOR[0] * peak <= estimate <= FACTOR[1] * peak, (estimate / 1e6, peak / 1e6)
    assert abs(peak / shape.params - 24) < 0.5


def test_peak_bytes_counts_what_is_held_at_once_on_a_cpu():
    def work():
        a = torch.zeros(1000, 1000)  # 4 MB
        b = torch.zeros(2000, 1000)  # 8 MB: 12 MB at once
        del a
        c = torch.zeros(500, 1000)  # 2 MB more, after 4 MB were freed
        return b, c

    assert sizes.peak_bytes(work) == 12_000_000


def test_each_strategy_s_vllm_share_leaves_training_its_estimate_on_the_paper_s_gpus():
    """On 80 GB GPUs the default share of every strategy that can train the 8B model leaves training at least its
    estimate (CUDA's context apart); one GPU and DDP cannot fully fine-tune 8B at any share, but leave a 1B run its
    room; a 1B run under every strategy fits."""
    eight, one = sizes.SHAPES["8B (Llama-3-8B)"], sizes.SHAPES["1B (Llama-3.2-1B)"]
    for strategy, share in sizes.VLLM_SHARES.items():
        left = (1 - share) * sizes.PAPER_GPU - sizes.CUDA_CONTEXT
        assert sizes.per_gpu_bytes(one, strategy, 8, 8192) <= left, strategy
        fits_8b = sizes.per_gpu_bytes(eight, strategy, 8, 8192) <= left
        assert fits_8b == (strategy not in ("single GPU", "DDP")), strategy
        if fits_8b:  # and vLLM gets room for the 8B model's 16 GB of weights and a KV cache of 8 GB at least
            assert share * sizes.PAPER_GPU >= 2 * eight.params + 8e9, strategy
    assert set(sizes.VLLM_SHARES) == set(sizes.STRATEGIES)


@pytest.mark.parametrize("env, lora, strategy", [
    ({}, False, "single GPU"), ({"WORLD_SIZE": "8"}, False, "DDP"),
    ({"WORLD_SIZE": "8"}, True, "LoRA (single GPU / DDP)"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "WORLD_SIZE": "8"}, False, "ZeRO-2"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "WORLD_SIZE": "8"}, True, "ZeRO-3"),
    ({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "8"}, False, "FSDP")])
def test_the_engine_s_share_is_the_launch_strategy_s_unless_set(monkeypatch, env, lora, strategy):
    from sgpo.config import schema as config
    from sgpo.generation.vllm_backend import worker_options

    for key in ("WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert sizes.launch_strategy(lora) == strategy
    sets = [f"model.lora_r={16 if lora else 0}"]
    assert worker_options(config.load(None, sets), "cpu")["gpu_memory"] == sizes.VLLM_SHARES[strategy]
    set_share = config.load(None, sets + ["generation.vllm_gpu_memory=0.7"])
    assert worker_options(set_share, "cpu")["gpu_memory"] == 0.7


def test_the_dry_run_s_vllm_lines_give_the_share_and_what_it_leaves(monkeypatch):
    from sgpo.config import schema as config

    cfg = config.load(REPO / "configs" / "paper" / "sgpo-llama-3-8b.yaml")
    text = "\n".join(sizes.memory_lines(cfg))
    assert "the shape of 8B (Llama-3-8B)" in text
    zero3 = next(line for line in text.splitlines() if line.strip().startswith("ZeRO-3"))
    assert zero3.split()[1:] == ["0.50", "39", "GB", "30", "GB", "fits"]
    assert "does not fit" in next(line for line in text.splitlines() if line.strip().startswith("DDP"))
    assert sizes.memory_lines(config.load(None, ["generation.backend=engine"])) == []


def test_a_vllm_rollout_lets_the_loaded_model_go_and_the_next_use_loads_the_same_weights(tmp_path, tiny_path,
                                                                                        tiny_tokenizer):
    """During a vLLM rollout the engine, not this process, needs the GPU: the policy's loaded copy (trained, saved
    for the rollout) is freed, and training after the rollout gets the saved weights back. The built-in engine keeps
    generating with the loaded model."""
    from sgpo.config.schema import ModelConfig
    from sgpo.models.policy import Policy
    from sgpo.run.stages import RunDir

    run = RunDir(tmp_path / "run")
    stages, dist = SimpleNamespace(current="round_1"), SimpleNamespace(barrier=lambda: None)
    policy = Policy(ModelConfig(name=tiny_path, dtype="float32"), tiny_tokenizer, "cpu", run, stages, dist, "vllm")
    model = policy.model
    with torch.no_grad():
        next(model.parameters()).add_(0.5)  # "trained"
    policy.trained()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    held = weakref.ref(model)
    del model
    assert policy.generator == str(run.path("round_1", "model"))  # saved for the rollout …
    assert held() is None  # … and no longer in memory
    again = policy.model.state_dict()
    assert all(torch.equal(again[k], v) for k, v in want.items())
    assert policy.generator_at(tiny_path) == tiny_path and policy._model is None  # another model's rollout: the same

    engine = Policy(ModelConfig(name=tiny_path, dtype="float32"), tiny_tokenizer, "cpu", run, stages, dist)
    assert engine.generator is engine.model
