"""Several processes (``accelerate launch``): who does what, and the few collectives the recipe needs.

A run started with plain ``python``/``sgpo`` has one process and no Accelerator: every helper here is then a no-op
or the identity. Under ``accelerate launch`` (or ``torchrun``) every process runs the whole recipe; they agree on
every decision because every decision is derived from the config, the data and the run directory, and:

* generation: the batches of the fixed plan are dealt out whole (batch k to rank k mod world size; with vLLM, one
  engine per process, the calls of whole batches); results are gathered on every rank and only the main process
  appends them to the run files;
* training: every global batch is split into disjoint slices, one per rank (see ``sgpo.training.loop``);
* files: only the main process writes; the others wait at a barrier, then read what it wrote.
"""
from __future__ import annotations

import os
from typing import Any

_LAUNCHER_FLAGS = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")


def sharding_asked() -> list[str]:
    """The sharded strategies the launcher's environment asks for (``DEEPSPEED``, ``FSDP``)."""
    return [k.split("_")[-1] for k in _LAUNCHER_FLAGS if os.environ.get(k, "").lower() in ("1", "true")]


def launched_distributed() -> bool:
    """True when this process was started by a multi-process launcher (or asks for DeepSpeed/FSDP)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 or bool(sharding_asked())


class Dist:
    """The process group as the recipe sees it. ``accelerator`` is None in a single plain process."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.is_main = self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def slot(self) -> tuple[int, int] | None:
        """(local rank, processes on this machine) under a launcher, else None: which GPU, or which share of the
        cores, this process's generation engine gets."""
        if self.accelerator is None:
            return None
        return self.accelerator.local_process_index, int(os.environ.get("LOCAL_WORLD_SIZE", self.world) or self.world)

    @property
    def device(self):
        return self.accelerator.device if self.accelerator is not None else None

    @property
    def sharded(self) -> bool:
        """True when training shards the weights (FSDP, DeepSpeed): trained weights must be gathered to be used."""
        return is_sharded(self.accelerator)

    def barrier(self) -> None:
        if self.accelerator is not None and self.world > 1:
            self.accelerator.wait_for_everyone()

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every rank (picklable objects)."""
        if self.world <= 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def gather(self, items: list) -> list:
        """Every rank's ``items`` concatenated in rank order, on every rank."""
        if self.world <= 1:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))

    def all_agree(self, ok: bool) -> bool:
        """True only when ``ok`` holds on every rank (so that all raise, or none does)."""
        if self.world <= 1:
            return ok
        return all(self.gather([bool(ok)]))


def is_sharded(accelerator) -> bool:
    if accelerator is None:
        return False
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def _sharded_on_cpu(kind: str, handlers: list):
    """An Accelerator whose processes (on CPUs, over gloo) train with FSDP or DeepSpeed as the launcher's config asks
    (``kind``: ``FSDP`` or ``DEEPSPEED``): accelerate itself selects either only with GPUs, but its FSDP2 path
    (``prepare``, ``backward``, ``get_state_dict``) and DeepSpeed's engine (its CPU accelerator falls back to gloo)
    run on CPU processes once accelerate's state says so. This is how the sharded branch runs without a GPU (tests,
    CI)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    fsdp = kind == "FSDP"
    plugin = FullyShardedDataParallelPlugin() if fsdp else DeepSpeedPlugin()  # from the launcher's settings
    acc = Accelerator(cpu=True, kwargs_handlers=handlers, **({"fsdp_plugin": plugin} if fsdp else
                                                             {"deepspeed_plugin": plugin}))
    for state in (PartialState(), AcceleratorState()):  # ``prepare`` reads the one, re-reads the other
        state.distributed_type = DistributedType[kind]
    if fsdp:
        AcceleratorState().fsdp_plugin = plugin
    else:  # what AcceleratorState's set-up does for DeepSpeed, skipped on the CPU
        plugin.set_mixed_precision("no")
        plugin.select(_from_accelerator_state=True)
        AcceleratorState().deepspeed_plugins = plugin
    if acc.is_main_process:
        import logging

        logging.getLogger("sgpo").info("training with %s on CPU processes (gloo), %d processes", kind,
                                       acc.num_processes)
    return acc


def _whole_models() -> None:
    """Under ZeRO-3, accelerate's DeepSpeed set-up makes transformers build every model partitioned (``zero.Init``
    at ``from_pretrained``): empty placeholders outside DeepSpeed's engine, which cannot generate or score the
    reference pass. sgpo loads whole models (as under DDP, one copy per process, 16 GB for 8B in bf16); DeepSpeed
    partitions the one it trains when the training call prepares it."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def is_deepspeed(accelerator) -> bool:
    if accelerator is None:
        return False
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def setup(device: str = "auto", timeout_minutes: float = 360.0) -> Dist:
    """A ``Dist`` for this process: with an Accelerator when launched by a multi-process launcher, whose collectives
    wait ``timeout_minutes`` for the slowest process (NCCL's default, 10 minutes, is shorter than a rollout or a judge
    pass at paper scale)."""
    if not launched_distributed():
        return Dist(None)
    from datetime import timedelta

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # On a machine without a GPU (or with model.device=cpu) the processes talk over gloo on the CPU. Accelerate only
    # sets the process group up on CPU when asked, so ask whenever there is no GPU to use.
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    sharded = sharding_asked()
    handlers = [InitProcessGroupKwargs(timeout=timedelta(minutes=timeout_minutes))]
    acc = (_sharded_on_cpu(sharded[0], handlers) if cpu and sharded
           else Accelerator(cpu=cpu, kwargs_handlers=handlers))
    if is_deepspeed(acc):
        _whole_models()
    if acc.num_processes != int(os.environ.get("WORLD_SIZE", "1") or 1):
        raise RuntimeError(f"the launcher started {os.environ.get('WORLD_SIZE')} processes but accelerate set up "
                           f"{acc.num_processes}: check the accelerate config")
    if sharded and not is_sharded(acc) and acc.is_main_process:
        import logging

        logging.getLogger("sgpo").warning("%s was asked for but accelerate set up %s; training runs data-parallel",
                                          sharded[0], acc.distributed_type)
    if not acc.is_main_process:  # one process reports; the others only speak up for problems
        import logging

        logging.getLogger("sgpo").setLevel(logging.WARNING)
    return Dist(acc)
