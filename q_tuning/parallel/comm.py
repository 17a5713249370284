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


def is_global_rank_zero() -> bool:
    """True on global rank 0, and in a process without a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def is_megatron_metrics_rank() -> bool:
    """Data-parallel rank 0 (with context parallelism), tensor rank 0, last pipeline stage: the
    rank that logs `train/` metrics in Megatron-based trainers (slime). Global rank 0 when
    megatron's parallel state is not initialised."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return is_global_rank_zero()
    return (ps.get_data_parallel_rank(with_context_parallel=True) == 0
            and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_pipeline_model_parallel_rank()
            == ps.get_pipeline_model_parallel_world_size() - 1)


def rank_in(group) -> int:
    """This process's rank in `group` (0 without a process group)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the default group (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank of the default group (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def size_and_rank(group) -> tuple[int, int]:
    """(world size, rank) of `group`; (1, 0) for None or without a process group."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def data_parallel_group():
    """The group whose ranks hold different samples: megatron's DP group when it is initialised
    (TP/PP/CP ranks of a replica share their samples), else the world (None when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            return ps.get_data_parallel_group()
    except ImportError:
        pass
    return dist.group.WORLD


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


def _all_reduce_(tensor: torch.Tensor, op, group) -> torch.Tensor:
    """In place over `group`, on the device its backend moves (a no-op without one)."""
    if group is not None and _active(group):
        moved = tensor.to(_device(group))
        dist.all_reduce(moved, op=op, group=group)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor


def all_reduce_max_(tensor: torch.Tensor, group) -> torch.Tensor:
    """In-place elementwise max over `group` (a no-op without one); for TP vocabulary shards."""
    return _all_reduce_(tensor, dist.ReduceOp.MAX, group)


def all_reduce_sum_(tensor: torch.Tensor, group) -> torch.Tensor:
    """In-place elementwise sum over `group` (a no-op without one); host tensors work under
    NCCL too (the trainer's step counts)."""
    return _all_reduce_(tensor, dist.ReduceOp.SUM, group)


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
    return _all_reduce_(tensor, dist.ReduceOp.SUM, cp_group)


def all_gather_objects(obj, group) -> list:
    """Python objects of every rank of `group`, in rank order."""
    if not _active(group):
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def all_gather_tensors(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    """Equal-shaped tensors of every rank of `group`, in rank order, on the tensor's device (for
    TP shards); `[tensor]` without a group."""
    if group is None or not _active(group):
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def gather_objects_to_first(obj, group) -> list | None:
    """Python objects of every rank of `group`, in rank order, on the group's first rank; None on
    the others. `[obj]` without a group."""
    if group is None or not _active(group):
        return [obj]
    first = dist.get_process_group_ranks(group)[0]
    parts = [None] * dist.get_world_size(group) if dist.get_rank() == first else None
    dist.gather_object(obj, parts, dst=first, group=group)
    return parts


def share_first_held(payload, group):
    """Every rank of `group` gets the payload of the first rank (in group order) holding one (not
    None); None when no rank holds one."""
    if not _active(group):
        return payload
    holders = all_gather_objects(payload is not None, group)
    if not any(holders):
        return None
    box = [payload]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, holders.index(True)),
                               group=group)
    return box[0]


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


def errors_on_ranks(local_error: str | None) -> str | None:
    """Collective over the default group: every rank's error (None: no error) agreed on; returns
    the same text on every rank ("all 2 ranks: ...", "rank 1: ...", a rank list per distinct
    message), or None when no rank has one. For failures that every rank must act on together
    (a failed checkpoint write, data that did not load) instead of one rank leaving the others
    blocked in the next collective."""
    if not _active(None):
        return local_error or None
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, local_error or None)
    by_message: dict[str, list[int]] = {}
    for rank, error in enumerate(errors):
        if error:
            by_message.setdefault(error, []).append(rank)
    if not by_message:
        return None
    parts = []
    for error, ranks in list(by_message.items())[:4]:
        who = (f"all {len(errors)} ranks" if len(ranks) == len(errors) else
               ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks[:8]))
               + (", ..." if len(ranks) > 8 else ""))
        parts.append(f"{who}: {error}")
    more = f" (and {len(by_message) - 4} more distinct errors)" if len(by_message) > 4 else ""
    return "; ".join(parts) + more


def any_rank(flags) -> list[bool]:
    """Collective over the default group: the elementwise OR of `flags` (a sequence of bools)
    over every rank, the same list everywhere; for decisions all ranks take together (stop after
    this iteration, skip this optimizer step). One small all-reduce."""
    values = [bool(f) for f in flags]
    if not _active(None):
        return values
    t = torch.tensor([int(v) for v in values], dtype=torch.int32, device=_device(None))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def is_node_leader() -> bool:
    """Collective over the default group: True on the lowest global rank of each host (by host
    name), for work done once per machine (tokenizing into a shared cache); True without a
    process group."""
    import socket

    hosts = all_gather_objects(socket.gethostname(), None)
    if len(hosts) == 1:
        return True
    me = dist.get_rank()
    return hosts.index(hosts[me]) == me
