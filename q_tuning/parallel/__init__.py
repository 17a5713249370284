"""Everything in q_tuning that talks across ranks: collectives, rank queries, process groups.
Modules outside this package call it; none calls `torch.distributed` itself. The passes that run
megatron-core's schedules (`q_tuning.passes`) sit above the statistics kernels and use it too.

Axis by axis, what happens in a Q-Tuning step and which module does it:

- TP (tensor parallel): the vocabulary is sharded; per-token statistics merge the shards with a
  max and a sum all-reduce of `[tokens]`-sized tensors (`comm.all_reduce_max_`,
  `comm.all_reduce_sum_`, called by `q_tuning.lse_stats.merge_shards`). Every TP rank of a replica
  holds the same statistics afterwards.
- PP (pipeline parallel): scoring and training run through megatron-core's own schedules
  (`passes.scoring.score_samples`, `passes.training.forward_backward`); statistics exist on the
  last stage and are broadcast to the others (`comm.broadcast_from_last_stage`), so every stage
  takes the same decision. Micro-batch counts are rounded for interleaved schedules
  (`passes.microbatch.round_up`).
- CP (context parallel): sequences are split into megatron-core's zigzag chunks
  (`passes.microbatch.slice_for_context_parallel`); each CP rank scores its positions and the
  per-token statistics are summed over CP into the unsplit sequence
  (`comm.sum_over_context_parallel`), so token pruning sees whole samples.
- DP (data parallel): per-sample sums are all-gathered in DP-rank order (`comm.all_gather_rows`)
  and every rank decides on the identical global batch; kept samples are rebalanced over DP
  (`rebalance`), and the gradient step's micro-batch counts are agreed (max) over DP
  (`passes.training`).
- Errors: bad input found on any rank is agreed on before any collective
  (`comm.agree_on_errors`), so every rank raises the same error instead of hanging.
- Process groups: `process_group.join_process_group` (torchrun, Ray, or one process),
  `process_group.leave_process_group`, `process_group.free_port`, `process_group.is_backend_error`;
  rank queries `comm.is_global_rank_zero`, `comm.rank_in`, `comm.size_and_rank`,
  `comm.world_size`; the command-line tools' own exchanges (`comm.barrier`,
  `comm.all_gather_tensors`, `comm.all_gather_objects`, `comm.gather_objects_to_first`, and
  `comm.all_reduce_sum_` of the trainer's step counts, host tensors included).
- LoRA (`q_tuning.sft.lora`): the adapters' rank-r intermediate crosses the TP group through
  megatron-core's autograd-aware mappings (`low_rank.column_parallel_intermediate`,
  `low_rank.row_parallel_intermediate`).
"""
