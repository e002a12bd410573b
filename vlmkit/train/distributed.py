"""Several processes, one run: DDP under `torchrun` / `accelerate launch` (NCCL on GPUs, gloo on CPU).

The launcher sets WORLD_SIZE, RANK and LOCAL_RANK; without them everything here is a no-op and the
loop runs as one process. Each step, every rank takes its own slice of the same global batch (the
data order depends on the seed and epoch only), DDP averages the gradients, and the loss is weighted
by each rank's share of the step's labelled tokens, so N processes with batch b train exactly as one
process with batch N*b. Only rank 0 writes (config, checkpoints, logs, the model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def all_sum(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch_dist.all_reduce(t)
        return t.item()

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def wrap(self, model):
        """The module to run forward/backward through: DDP when there are several processes."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        from vlmkit.model.frozen_bf16 import COPY

        # bf16-frozen's copies are buffers (so compiled blocks share a graph) but alike on every rank: not broadcast
        copies = [name for name, _ in model.named_buffers() if name.rsplit(".", 1)[-1] == COPY]
        if copies:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, copies)
        ids = [self.local_rank] if torch.cuda.is_available() else None
        return DistributedDataParallel(model, device_ids=ids)

    def close(self) -> None:
        if self.active and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def setup() -> Dist:
    """Join the process group the launcher describes, or a single-process Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(backend)
    return Dist(rank, world, local_rank)


def decoder_layers(model) -> list:
    """The language model's transformer blocks: the ModuleList as long as its layer count."""
    from torch import nn

    from vlmkit.model.lora import language_model

    lm = language_model(model)
    config = getattr(lm, "config", None) or getattr(model.config, "text_config", None)
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for module in lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return list(module)
    return []


def shard(model, dist: Dist) -> int:
    """FSDP (version 2, `fully_shard`): each decoder layer its own unit, everything else in the root
    unit. Parameters are split across ranks and gathered one unit at a time in forward and backward,
    so a model that does not fit one device trains on several."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dist.device().type, (dist.world,))
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(layers) + 1


def full_state_dict(model) -> dict:
    """Every rank must call this (it gathers); rank 0 gets the whole state dict on CPU, others {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
