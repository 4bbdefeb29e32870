"""torchrun's process group for the trainers: which process this is, and the few collectives they need.

A process that torchrun did not start (or started alone) is a world of one, in which every helper returns its
input without a collective: the one-process path computes exactly what it did before. Every collective here
must be called by all ranks in the same order; the trainers keep their control flow the same on every rank.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from rich.console import Console
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU alone


def _collective_device() -> torch.device:
    """Where collective tensors live: NCCL reduces GPU tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class World:
    """This process's place among torchrun's: its rank, the world size and its GPU on the node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0, the one that writes the run folder and prints."""
        return self.rank == 0

    def span(self, n: int) -> tuple[int, int]:
        """[start, end) of this rank's contiguous part of n items; parts differ in length by one at most."""
        return self.rank * n // self.size, (self.rank + 1) * n // self.size

    def share(self, items: list[T]) -> list[T]:
        """This rank's contiguous part of a list (its span); equal parts when the world size divides its length."""
        start, end = self.span(len(items))
        return items[start:end]

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (float64, so counts stay exact)."""
        if self.size == 1:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(total)
        return total.tolist()

    def any(self, *flags: bool) -> list[bool]:
        """For each flag, whether it is set on some rank: decisions every rank must take alike."""
        if self.size == 1:
            return list(flags)
        found = torch.tensor([float(f) for f in flags], device=_collective_device())
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return [bool(f) for f in found.tolist()]

    def barrier(self) -> None:
        """Wait until every rank is here: what rank 0 wrote before it, the others may read after it."""
        if self.size > 1:
            dist.barrier()

    def gather(self, value: T) -> list[T]:
        """value from every rank, in rank order (any picklable object)."""
        if self.size == 1:
            return [value]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out


ALONE = World()  # a process outside torchrun


def world() -> World:
    """The process group this process is in; a world of one outside torchrun."""
    if not dist.is_initialized():
        return ALONE
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def rank_device(device: str, local_rank: int) -> str:
    """The device a rank trains on: its own GPU (LOCAL_RANK) for cuda, or for auto where there is one; else CPU."""
    cuda = torch.cuda.is_available() if device == "auto" else torch.device(device).type == "cuda"
    return f"cuda:{local_rank}" if cuda else "cpu"


@contextlib.contextmanager
def launched(device: str) -> Iterator[str]:
    """Within: this process in torchrun's process group when torchrun started several (NCCL on GPUs, gloo on CPU),
    left after; yields the device this rank uses (`device` itself for one process). Within a group already set up
    it does nothing: a process that runs several commands (the pipeline) holds one group for all, as a group set up
    again after one was destroyed can read the first one's stale addresses from torchrun's store."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 or dist.is_initialized():
        yield device
        return
    local = int(os.environ["LOCAL_RANK"])
    mine = rank_device(device, local)
    if mine.startswith("cuda"):
        torch.cuda.set_device(local)  # NCCL and the collectives' tensors use the current device
    dist.init_process_group("nccl" if mine.startswith("cuda") else "gloo")
    try:
        yield mine
        # torchrun ends every process when one exits non-zero (130 after Ctrl-C): none leaves before rank 0 has
        # written the run folder
        dist.barrier()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def rank_session(device: str, console: Console | None) -> Iterator[tuple[World, str, Console]]:
    """A run's process, alone or one of torchrun's: (its world, its device, its console). Rank 0 prints and warns
    for all; the others are quiet, as they would say the same again."""
    with launched(device) as mine, warnings.catch_warnings():
        group = world()
        if not group.is_main:
            warnings.simplefilter("ignore")
            console = Console(stderr=True, quiet=True)
        yield group, mine, console or Console(stderr=True)


def data_parallel(model: torch.nn.Module, group: World) -> torch.nn.Module:
    """The model under DDP (gradients averaged over ranks in backward) when there are several ranks, else itself.

    Buffers are not broadcast: a model's buffers (rotary tables) are not trained, and DDP's broadcast would be a
    collective in every synchronised forward, which ties the ranks to equal counts of micro-batches."""
    if group.size == 1:
        return model
    device = next(model.parameters()).device
    # torch 2.14 renamed broadcast_buffers (and warns at the old name); older releases know only that one
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   **no_buffer_sync)


def idle_forward(model: torch.nn.Module, token_id: int) -> torch.Tensor:
    """A forward that adds nothing (one token's logits times 0): a rank short of data still joins the collectives
    of the others' forwards (FSDP gathers a layer's weights in each)."""
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([[token_id]], device=device), use_cache=False).logits
    return logits.float().sum() * 0.0


def zero_backward(policy: torch.nn.Module, token_id: int) -> None:
    """A synchronised forward and backward that adds nothing: a rank left without data in a step still joins DDP's
    gradient all-reduce (FSDP's gathers and reduce-scatter), which the others wait in."""
    idle_forward(policy, token_id).backward()


def grad_sync(policy: torch.nn.Module, enabled: bool):
    """A context whose forward and backward all-reduce gradients (enabled), or only accumulate them locally
    (DDP's no_sync: micro-batches before the last of an optimizer step). FSDP reduce-scatters in every backward
    alike: accumulating unsharded gradients (set_requires_gradient_sync(False)) would hold a whole fp32 gradient of
    the model on every rank, the memory that sharding saves."""
    if isinstance(policy, DistributedDataParallel) and not enabled:
        return policy.no_sync()
    return contextlib.nullcontext()


def fully_sharded(model: torch.nn.Module, group: World, device: str | torch.device) -> torch.nn.Module:
    """The model sharded over the ranks by FSDP2 (in place: each decoder layer, then the rest) and its shards moved to
    `device` when there are several ranks, else itself.

    Parameters become fp32 (master weights) a layer at a time as they are sharded, so a model loaded in bf16 is
    never whole in fp32 on the host; they are gathered in fp32, so the trainer's bf16 autocast computes as it does
    under DDP (no MixedPrecisionPolicy: bf16 gathers would halve traffic but round the weights the norms and the
    loss see)."""
    if group.size == 1:
        return model.float()
    mesh = init_device_mesh(torch.device(device).type, (group.size,))  # not the default: cuda wherever there is one
    for layer in model.model.layers:
        fully_shard(layer.float(), mesh=mesh)  # the layer's full fp32 tensors are freed once its shards are made
    for p in model.parameters():  # what no layer holds: embeddings, final norm, head (tied: one parameter)
        if not isinstance(p, DTensor):
            p.data = p.data.float()
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP shards the model's parameters over the ranks."""
    return isinstance(model, FSDPModule)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Scale gradients to a total norm of at most max_norm; their norm before, over the whole model (also when
    FSDP shards them: each rank's partial norms are combined)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.item()


def nonfinite_grads(model: torch.nn.Module) -> list[str]:
    """Names of the parameters whose gradient holds a NaN or an infinity; for an FSDP model, in any rank's shard
    (every rank must call it)."""
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    bad = [not torch.isfinite(g.to_local() if isinstance(g, DTensor) else g).all().item() for g in grads.values()]
    if is_sharded(model):
        bad = world().any(*bad)
    return [name for name, b in zip(grads, bad, strict=True) if b]


def unsharded_copy(model: torch.nn.Module, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of a model about to be sharded, in eval mode, on `device` with its parameters in `dtype` (its
    buffers, the rotary tables, as they are): what a rank generates with under FSDP, refreshed by gather_into."""
    # each tensor goes straight to its place: no second whole model on the CPU on the way
    memo = {id(p): torch.nn.Parameter(p.detach().to(device, dtype, copy=True), requires_grad=False)
            for p in model.parameters()}
    memo |= {id(b): b.to(device, copy=True) for b in model.buffers()}
    return copy.deepcopy(model, memo).eval()


@torch.no_grad()
def gather_into(model: torch.nn.Module, plain: torch.nn.Module) -> None:
    """Copy an FSDP model's whole weights into its unsharded_copy in place (an engine sharing the copy's storage
    sees them), one parameter at a time: the peak is one gathered parameter, not the model, each gathered in the
    copy's dtype (bf16: half the traffic). Every rank must call it."""
    targets = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        target = targets[name]
        shard = p.detach().to(target.dtype)  # rounding elementwise: before the gather as after it
        target.copy_(shard.full_tensor() if isinstance(shard, DTensor) else shard)


def full_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model to save: itself, or for an FSDP model a plain copy with its gathered weights on rank 0's CPU (None
    on the other ranks, which must all call it): save_pretrained then writes what an unsharded run writes."""
    if not is_sharded(model):
        return model
    weights = get_model_state_dict(model, options=GATHERED)
    if not world().is_main:
        return None
    unsharded = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):  # no memory: the gathered tensors become its parameters
        plain = unsharded(model.config)
    plain.load_state_dict(weights, assign=True)
    plain.tie_weights()  # the gathered state holds a tied weight twice
    plain.generation_config = model.generation_config
    return plain


def _optimizer_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters, in its order (their index in optimizer.state_dict())."""
    names = {p: name for name, p in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def _rekeyed(state: dict[str, Any], key: dict) -> dict[str, Any]:
    """An optimizer state dict with its parameters renamed through key (index to name, or back)."""
    return {"state": {key[k]: v for k, v in state["state"].items()},
            "param_groups": [{**group, "params": [key[k] for k in group["params"]]} for group in state["param_groups"]]}


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict(); for an FSDP model gathered whole on rank 0's CPU ({} on the other ranks, which must
    all call it), in the same form, so that a checkpoint resumes sharded or not."""
    if not is_sharded(model):
        return optimizer.state_dict()
    state = get_optimizer_state_dict(model, optimizer, options=GATHERED)  # keyed by parameter name
    if not state:
        return {}
    return _rekeyed(state, {name: i for i, name in enumerate(_optimizer_names(model, optimizer))})


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """optimizer.load_state_dict(state); for an FSDP model each rank keeps its shards of the whole state."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    names = dict(enumerate(_optimizer_names(model, optimizer)))
    set_optimizer_state_dict(model, optimizer, _rekeyed(state, names), options=StateDictOptions(full_state_dict=True))
