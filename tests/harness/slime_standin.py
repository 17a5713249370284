"""An in-project stand-in for the parts of THUDM/slime (at 624b824) that q_tuning.slime relies on,
reimplemented from their documented behaviour (no slime code): CI cannot install slime.

- `parse_args(add_custom_arguments=None, argv=None)`: slime's parser contract: custom arguments
  added first, unknown flags ignored silently, `--custom-config-path` YAML keys set on args;
- `build_dp_schedule(...)`: pack first (first-fit under max_tokens_per_gpu x cp, or
  micro-batch-size chunks), pad the micro-batch count to a multiple of dp by splitting bins,
  distribute round-robin: equal counts per DP rank;
- `split_rollout(...)`: the per-DP-rank `rollout_data` the actor receives (per-sample lists of its
  partition, `total_lengths` localised, tokens int64 / loss masks int32 over the response,
  `rollout_mask_sums` a float tensor, the schedule lists);
- `DataIterator`: reads `rollout_data[key]` and its `micro_batch_indices` list BY REFERENCE;
- `StandinActor.train_actor(rollout_id, rollout_data)`: calls the postprocess hook as slime does
  (`self.rollout_data_postprocess(self.args, rollout_id, rollout_data)` from a method whose
  `self.model` is the DDP-wrapped chunk list), then one megatron-core forward-backward per step
  with slime's sft loss (per-token, or per-sample mean over `rollout_mask_sums` and
  `global_batch_sizes`), scaled for megatron as slime scales it, each micro-batch packed in one
  row: at CP 1 with a block-causal mask (the CPU equivalent of slime's THD); under CP in slime's
  THD layout (every CP rank holds the whole samples; each sample sliced zigzag, chunks r and
  2cp-1-r, as `cp_utils.slice_with_cp`; global `cu_seqlens`), for a model whose attention takes
  THD under CP (`tests.harness.megatron.use_thd_cp_attention`).
"""

from __future__ import annotations

import argparse
import importlib
from functools import partial

import torch

from q_tuning.passes.microbatch import first_fit

# --- parse_args ----------------------------------------------------------------------------------


def _slime_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--loss-type", default="policy_loss")
    p.add_argument("--calculate-per-token-loss", action="store_true")
    p.add_argument("--rollout-data-postprocess-path", default=None)
    p.add_argument("--custom-config-path", default=None)
    p.add_argument("--global-batch-size", type=int, default=None)
    p.add_argument("--rollout-batch-size", type=int, default=None)
    p.add_argument("--n-samples-per-prompt", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--use-dynamic-batch-size", action="store_true")
    p.add_argument("--max-tokens-per-gpu", type=int, default=None)
    p.add_argument("--use-routing-replay", action="store_true")
    p.add_argument("--use-rollout-routing-replay", action="store_true")
    p.add_argument("--seq-length", type=int, default=4096)
    return p


def parse_args(add_custom_arguments=None, argv=None) -> argparse.Namespace:
    import sys

    parser = argparse.ArgumentParser(allow_abbrev=False)
    if add_custom_arguments is not None:  # slime adds them in front
        parser = add_custom_arguments(parser) or parser
    for action in _slime_parser()._actions[1:]:
        parser._add_action(action)
    args, _unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.use_rollout_routing_replay:
        args.use_routing_replay = True
    if args.custom_config_path:
        import yaml

        with open(args.custom_config_path) as f:
            for k, v in (yaml.safe_load(f) or {}).items():
                setattr(args, k, v)
    return args


# --- the rollout side ----------------------------------------------------------------------------


def _split_largest(bins, target, lengths):
    while len(bins) < target:
        cands = [(sum(lengths[i] for i in b), j) for j, b in enumerate(bins) if len(b) > 1]
        if not cands:
            return
        _, j = max(cands)
        halves, sums = [[], []], [0, 0]
        for i in sorted(bins[j], key=lambda i: -lengths[i]):
            k = 0 if sums[0] <= sums[1] else 1
            halves[k].append(i)
            sums[k] += lengths[i]
        bins[j] = halves[0]
        bins.append(halves[1])


def build_dp_schedule(args, parallel: dict, total_lengths, *, global_batch_size: int,
                      rollout_indices):
    """(partitions, micro_batch_indices per rank, num_microbatches, global_batch_sizes)."""
    dp, cp = parallel["dp_size"], parallel.get("cp_size", 1)
    groups: dict = {}
    for pos, rid in enumerate(rollout_indices):
        groups.setdefault(rid, []).append(pos)
    rids = list(groups)
    steps = len(rids) // global_batch_size
    assert steps >= 1
    partitions = [[] for _ in range(dp)]
    mbi = [[] for _ in range(dp)]
    num_mbs, gbs = [], []
    for s in range(steps):
        idx = [p for rid in rids[s * global_batch_size:(s + 1) * global_batch_size]
               for p in groups[rid]]
        lengths = [total_lengths[i] for i in idx]
        if args.use_dynamic_batch_size:
            bins = first_fit(lengths, args.max_tokens_per_gpu * cp)  # slime's first-fit is the same
        else:
            m = args.micro_batch_size
            bins = [list(range(i, min(i + m, len(idx)))) for i in range(0, len(idx), m)]
        target = max(-(-len(bins) // dp) * dp, dp)
        if args.use_dynamic_batch_size:
            _split_largest(bins, target, lengths)
        assert len(bins) == target, "micro-batch count not a multiple of dp"
        num_mbs.append(target // dp)
        gbs.append(global_batch_size)
        for r in range(dp):
            for k in range(r, target, dp):
                start = len(partitions[r])
                partitions[r].extend(idx[i] for i in bins[k])
                mbi[r].append(list(range(start, start + len(bins[k]))))
    return partitions, mbi, num_mbs, gbs


def split_rollout(data: dict, args, dp_size: int, dp_rank: int, cp_size: int = 1) -> dict:
    """This DP rank's rollout_data as the actor sees it before `train_actor`'s hook.
    `data`: per-sample lists `tokens`, `response_lengths`, `loss_masks` (response only), and
    optionally `rollout_ids`, `sample_indices`."""
    n = len(data["tokens"])
    rollout_ids = data.get("rollout_ids", list(range(n)))
    total = [len(t) for t in data["tokens"]]
    masks = [list(m) for m in data["loss_masks"]]
    sums: dict = {}
    for rid, m in zip(rollout_ids, masks):
        sums[rid] = sums.get(rid, 0) + sum(m)
    parts, mbi, num_mbs, gbs = build_dp_schedule(
        args, {"dp_size": dp_size, "cp_size": cp_size}, total,
        global_batch_size=args.global_batch_size, rollout_indices=rollout_ids)
    part = parts[dp_rank]
    out = {"partition": part,
           "tokens": [torch.as_tensor(data["tokens"][j], dtype=torch.long) for j in part],
           "response_lengths": [int(data["response_lengths"][j]) for j in part],
           "loss_masks": [torch.as_tensor(masks[j], dtype=torch.int) for j in part],
           "rewards": [0.0 for _ in part], "truncated": [0 for _ in part],
           "sample_indices": [data.get("sample_indices", list(range(n)))[j] for j in part],
           "rollout_ids": [rollout_ids[j] for j in part],
           "rollout_mask_sums": torch.tensor([float(sums[rollout_ids[j]]) for j in part]),
           "raw_reward": [0.0] * n,
           "total_lengths": [total[j] for j in part],
           "global_batch_sizes": gbs, "num_microbatches": num_mbs,
           "micro_batch_indices": mbi[dp_rank]}
    return out


# --- the actor side ------------------------------------------------------------------------------


class DataIterator:
    def __init__(self, rollout_data: dict, micro_batch_indices: list) -> None:
        self.rollout_data = rollout_data
        self.micro_batch_indices = micro_batch_indices
        self.offset = 0

    def get_next(self, keys):
        indices = self.micro_batch_indices[self.offset]
        self.offset += 1
        return {k: (None if self.rollout_data.get(k) is None
                    else [self.rollout_data[k][i] for i in indices]) for k in keys}

    def reset(self):
        self.offset = 0
        return self


def _load(path):
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


class StandinActor:
    """`model`: this rank's DDP-wrapped chunks (calculate_per_token_loss set on their config to
    `args.calculate_per_token_loss`)."""

    def __init__(self, args, model: list, row_length: int) -> None:
        self.args, self.model, self.row_length = args, model, row_length
        self.rollout_data_postprocess = (_load(args.rollout_data_postprocess_path)
                                         if args.rollout_data_postprocess_path else None)
        self.seen: list[dict] = []  # per forwarded micro-batch: sample_indices, tokens

    def train_actor(self, rollout_id: int, rollout_data: dict) -> None:
        data_iterator = [DataIterator(rollout_data, rollout_data["micro_batch_indices"])]
        num_microbatches = rollout_data["num_microbatches"]
        global_batch_sizes = rollout_data["global_batch_sizes"]
        if self.rollout_data_postprocess is not None:
            self.rollout_data_postprocess(self.args, rollout_id, rollout_data)
        self.train(data_iterator, num_microbatches, global_batch_sizes)

    def train(self, data_iterator, num_microbatches, global_batch_sizes) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        for it in data_iterator:
            it.reset()
        for c in self.model:
            c.zero_grad_buffer()
        for step, count in enumerate(num_microbatches):  # tests run one step per rollout
            get_forward_backward_func()(
                forward_step_func=partial(self._forward_step, count, global_batch_sizes[step]),
                data_iterator=data_iterator[0], model=self.model[0], num_microbatches=count,
                seq_length=self.row_length, micro_batch_size=1, forward_only=False)

    def _forward_step(self, num_microbatches, step_gbs, data_iterator, model):
        """slime's `get_batch`: per sample its stream targets and loss mask (position p predicts
        token p + 1), each sample sliced zigzag per CP rank (`slice_with_cp`), concatenated into
        one row padded to `row_length / cp`. CP 1: a block-causal mask; CP > 1: the THD format
        (global `cu_seqlens`), as slime feeds transformer-engine."""
        from megatron.core import parallel_state as ps

        from tests.harness.megatron import packed_causal_attention_mask

        keys = ["tokens", "total_lengths", "response_lengths", "loss_masks", "rollout_mask_sums",
                "sample_indices"]
        batch = data_iterator.get_next(keys)
        used = sum(t.numel() for t in batch["tokens"])
        self.seen.append({"sample_indices": list(batch["sample_indices"]), "tokens": used})
        cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        streams = [slime_stream(t, int(r), m) for t, r, m in zip(
            batch["tokens"], batch["response_lengths"], batch["loss_masks"])]
        local = [[slice_with_cp(x, cp, cp_rank) for x in stream] for stream in streams]
        lengths = [piece[0].numel() for piece in local]
        pad = self.row_length // cp - sum(lengths)
        assert pad >= 0, f"micro-batch of {sum(lengths)} tokens per CP rank > row {self.row_length}"

        def row(field: int, dtype) -> torch.Tensor:  # [1, row_length / cp]
            return torch.cat([piece[field] for piece in local]
                             + [torch.zeros(pad, dtype=dtype)])[None]

        tokens, targets, masks = row(0, torch.long), row(1, torch.long), row(2, torch.float)
        if cp > 1:
            out = model(tokens, None, None, packed_seq_params=thd_params(lengths + [pad], cp))
        else:
            segment = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]
                                + [torch.full((pad,), len(lengths))])[None]
            positions = torch.cat([torch.arange(n) for n in lengths + [pad]])[None]
            out = model(tokens, positions, packed_causal_attention_mask(segment))
        return out, partial(self._loss, batch, lengths, targets, masks, num_microbatches,
                            step_gbs)

    def _loss(self, batch, lengths, targets, masks, num_microbatches, step_gbs, logits):
        """slime's sft loss: the masked NLL sum per sample (per-token), or each sample's over its
        `rollout_mask_sums` (per-sample mean); scaled as slime's `loss_function` scales it."""
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        nll = vocab_parallel_cross_entropy(logits.transpose(0, 1).float().contiguous(),
                                           targets.transpose(0, 1).contiguous())[:, 0]
        per_sample = (nll * masks[0])[:sum(lengths)].split(lengths)
        per_token = self.args.calculate_per_token_loss
        loss = 0.0
        for i, part in enumerate(per_sample):
            value = part.sum()
            if not per_token:
                value = value / torch.clamp_min(batch["rollout_mask_sums"][i], 1)
            loss = loss + value
        num_tokens = sum(torch.clamp_min(m.sum(), 1) for m in batch["loss_masks"])
        if not per_token:
            loss = (loss * num_microbatches / step_gbs
                    * ps.get_data_parallel_world_size(with_context_parallel=True))
            return loss, torch.tensor(1), {"loss": loss.detach()}
        # every CP rank counts the micro-batch's tokens: x cp cancels megatron's sum over DP x CP
        loss = loss * ps.get_context_parallel_world_size()
        return loss, num_tokens.to(torch.int), {"loss": loss.detach()}


def slime_stream(tokens, response_length: int, loss_mask):
    """(tokens, targets, loss mask) of one sample in slime's token-stream positions: position p
    predicts token p + 1; the response mask sits at positions prompt-1 .. total-2 (slime's
    `F.pad(loss_mask, (prompt_length - 1, 1))`)."""
    prompt = tokens.numel() - response_length
    targets = torch.cat([tokens[1:], tokens.new_zeros(1)])
    mask = torch.nn.functional.pad(loss_mask.float(), (prompt - 1, 1))
    return tokens, targets, mask


def slice_with_cp(x, cp_size: int, cp_rank: int):
    """slime's `slice_with_cp`: pad to 2cp equal chunks (zeros), keep chunks r and 2cp-1-r."""
    if cp_size == 1:
        return x
    chunk = -(-x.numel() // (2 * cp_size))
    x = torch.nn.functional.pad(x, (0, 2 * cp_size * chunk - x.numel()))
    first, second = cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([x[first:first + chunk], x[second:second + chunk]])


def thd_params(local_lengths: list, cp_size: int):
    """slime's PackedSeqParams: THD, `cu_seqlens` of the local pieces x cp (global lengths)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    bounds = [0]
    for n in local_lengths:
        if n:
            bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int) * cp_size
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def record_tracking() -> list:
    """slime's tracking, recorded: stand-in modules `slime.observability.logging_utils` whose
    `log(args, metrics, step_key)` (slime's signature) appends `(metrics, step_key)` to the list
    returned. For a spawned test process only (it puts a `slime` package in sys.modules)."""
    import sys
    import types

    calls: list = []
    names = ("slime", "slime.observability", "slime.observability.logging_utils")
    for name in names:
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules[names[-1]].log = lambda args, metrics, step_key: calls.append(
        (dict(metrics), step_key))
    return calls
