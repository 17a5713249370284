"""The few collectives the pruner needs, one function per parallel concern.

Every function here is called by all ranks of the named group in the same order; none of them
branches on data in a way that could make ranks diverge.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _device(group) -> torch.device:
    """NCCL moves only CUDA tensors; gloo only CPU ones."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_on_errors(local_error: str | None, prefix: str) -> None:
    """Raise the same ValueError on every rank if any rank found bad input (never a hang).

    Each rank reports its own problem; every rank raises with all of them, so no rank proceeds
    into a collective that another rank will never join.
    """
    if not _active(None):
        if local_error:
            raise ValueError(f"{prefix}{local_error}")
        return
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, local_error)
    found = [(r, e) for r, e in enumerate(errors) if e]
    if found:
        detail = "; ".join(f"rank {r}: {e}" for r, e in found[:4])
        more = f" (and {len(found) - 4} more ranks)" if len(found) > 4 else ""
        raise ValueError(f"{prefix}{detail}{more}")


def all_gather_rows(local: torch.Tensor, group) -> tuple[torch.Tensor, list[int]]:
    """Concatenate `[n_r, ...]` tensors of every rank of `group` in rank order (n_r may differ);
    also returns the list of n_r."""
    if not _active(group):
        return local, [local.shape[0]]
    world, device = dist.get_world_size(group), _device(group)
    count = torch.tensor([local.shape[0]], dtype=torch.long, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts_list = [int(c) for c in counts]
    longest = max(counts_list)
    padded = local.new_zeros((longest, *local.shape[1:]), device=device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, counts_list)]).to(local.device), counts_list


def broadcast_from_last_stage(tensor: torch.Tensor, pp_group) -> torch.Tensor:
    """Give every pipeline stage the tensor computed on the last stage (in place)."""
    if _active(pp_group):
        src = dist.get_global_rank(pp_group, dist.get_world_size(pp_group) - 1)
        moved = tensor.to(_device(pp_group))
        dist.broadcast(moved, src=src, group=pp_group)
        tensor.copy_(moved)
    return tensor


def sum_over_context_parallel(tensor: torch.Tensor, cp_group) -> torch.Tensor:
    """Each CP rank filled only the positions it holds (zeros elsewhere): summing gathers them."""
    if _active(cp_group):
        moved = tensor.to(_device(cp_group))
        dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=cp_group)
        tensor.copy_(moved)
    return tensor


def all_gather_objects(obj, group) -> list:
    """Python objects of every rank of `group`, in rank order."""
    if not _active(group):
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def max_over_group(value: int, group) -> int:
    if not _active(group):
        return value
    t = torch.tensor([value], dtype=torch.long, device=_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t)


def world_disagrees(values: torch.Tensor) -> bool:
    """True on every rank when `values` (float64) differ anywhere in the default group."""
    if not _active(None):
        return False
    device = _device(None)
    both = torch.cat([values, -values]).to(device, torch.float64)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    n = values.numel()
    return not torch.equal(both[:n], -both[n:])
