"""QTuningPruner: score, gather over DP, decide, prune tokens, run hooks, rebalance, report.

`prune(model, batch)` is called on every rank, inside an initialized megatron-core
`parallel_state`, with this DP rank's share of the step's samples (the same batch on every TP, PP
and CP rank of a DP replica). It returns this DP rank's share of the kept samples, with Q2 loss
masks pruned; dropped samples are gone from the returned batch, so the gradient step never sees
them (the compute saving). The decision is taken on the whole global batch and is bit-identical
on every rank:

1. score (`_score`): `passes.scoring.score_samples`, TP/PP/CP inside (see its docstring);
2. gather (`_gather`): per-sample sums (NLL, entropy, loss tokens, length) all-gathered over DP in
   DP-rank order;
3. decide (`_select`): every rank runs the strategy (`select_samples` for Q-Tuning, or a baseline
   of `q_tuning.strategies`) on the identical global tensor;
4. token masks (`_pruned_masks`): each rank prunes its own Q2 samples (it holds their per-token
   statistics), before the samples move; under the global token budget the Q2 token scores are
   all-gathered over DP first; baselines may prune tokens at random or weight losses;
5. hooks (`_run_hooks`): slime-style postprocess hooks see this rank's scored samples;
6. rebalance (`_rebalance`): kept samples are reassigned so every DP rank gets the same count
   (+-1) and near-equal tokens (`parallel.rebalance`);
7. report: a `StepReport`, logged on global rank 0.
Bad input is detected on every rank and agreed on before any collective, so it raises the same
error everywhere instead of hanging.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import torch

from q_tuning.config import STRATEGY_NAMES, QTuningConfig, RunShape
from q_tuning.parallel import comm
from q_tuning.parallel.rebalance import assign_to_ranks, filler_sample, gather_kept
from q_tuning.global_batch import (ENTROPY, ENTROPY_TOKENS, LENGTH, NLL, GlobalBatch,
                                   loss_targets_only, sample_sums, unscored_scores,
                                   unscored_selection, vocab_size_of)
from q_tuning.passes.scoring import ParallelGroups, TokenScores, score_samples
from q_tuning.report import StageSeconds, StepReport, Thresholds, format_report
from q_tuning.selection import SampleSelection, sample_ppl_entropy
from q_tuning.strategies import (StrategyDecision, StrategyInputs, TokenPruning, decide,
                                 needs_scores, random_token_keep_mask, seeded_generator)
from q_tuning.token_pruning import budget_keep, global_token_budget, token_keep_mask, token_scores

@dataclasses.dataclass
class StepDecision:
    """Everything decided in one step, for hooks, plots and tests."""

    selection: SampleSelection  # global, DP-rank-major sample order; `keep` is the strategy's
    strategy: StrategyDecision
    sample_ppl: torch.Tensor  # [N_global] float64
    sample_entropy: torch.Tensor  # [N_global] float64
    local_offset: int  # global index of this DP rank's first sample
    local_scores: TokenScores  # per-token statistics of this rank's samples
    local_loss_masks: list[torch.Tensor]  # this rank's masks after token pruning (all samples)


class QTuningPruner:
    """Q-Tuning in front of a megatron-core gradient step. See the module docstring.

    `config` holds the `--q-tuning-*` settings, `run` the run's shape (micro-batch size, sequence
    length, packed-row budget, planned steps); `QTuningPruner.from_args(args)` builds both from
    Megatron-style flags. `hooks` follow slime's `--rollout-data-postprocess-path` contract,
    `hook(hook_args, rollout_id, rollout_data)`.
    """

    def __init__(self, config: QTuningConfig, run: RunShape = RunShape(), *, log: bool = True,
                 hooks: Sequence[Callable] = (), hook_args: Any = None) -> None:
        if not isinstance(config, QTuningConfig):
            raise TypeError(f"QTuningPruner takes a QTuningConfig, got {type(config).__name__}; "
                            "use QTuningPruner.from_args(args) for a parsed flag namespace")
        self.config, self.run, self.log = config, run, log
        self.hooks = list(hooks)
        self.hook_args = hook_args if hook_args is not None else config
        self.step = 0
        self.last_decision: StepDecision | None = None
        self.last_stage_seconds = StageSeconds()  # of the latest `prune` call, on this rank

    @classmethod
    def from_args(cls, args: Any, **kwargs: Any) -> "QTuningPruner":
        """From Megatron/slime-style parsed flags (`QTuningConfig.from_args`, `RunShape.from_args`);
        `kwargs` go to the constructor. The flags are read here, once."""
        kwargs.setdefault("hook_args", args)
        return cls(QTuningConfig.from_args(args), RunShape.from_args(args), **kwargs)

    def prune(self, model: Sequence[torch.nn.Module] | torch.nn.Module, batch: dict[str, list],
              *, keep_count: int | None = None, rollout_id: int | None = None,
              step: int | None = None) -> tuple[dict[str, list], StepReport]:
        """Return `(new_batch, report)`: this DP rank's share of the kept samples, and the step's
        report. `keep_count` overrides the keep ratio (refill policy).

        `step` (1-based) is the training iteration this batch belongs to, when the caller counts
        them (a resumed or re-run step then decides exactly as before: the random strategies draw
        from it, InfoBatch anneals by it); default: one more than the previous call. Hooks given
        to the constructor run between the decision and the rebalance, see `rollout_data`.
        """
        self.step = self.step + 1 if step is None else int(step)
        clock = self.last_stage_seconds = StageSeconds()
        start = time.perf_counter()
        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        groups = ParallelGroups.from_parallel_state()
        prefix = f"Q-Tuning step {self.step}: "
        comm.agree_on_errors(self._validate(chunks, batch), prefix)
        clock.lap("validate")
        scores, sums = self._score(chunks, batch, groups)
        scoring_seconds = time.perf_counter() - start
        clock.lap("score")
        global_batch = self._gather(sums, groups, prefix)
        clock.lap("gather")
        ratio, selection, strategy, ppl, ent = self._select(global_batch, keep_count, prefix)
        clock.lap("select")
        masks = self._pruned_masks(strategy, global_batch, scores, batch["loss_masks"], ratio,
                                   groups.dp)
        self.last_decision = StepDecision(
            selection=selection, strategy=strategy, sample_ppl=ppl, sample_entropy=ent,
            local_offset=global_batch.offset, local_scores=scores, local_loss_masks=masks)
        clock.lap("masks")
        if self.hooks:
            self._run_hooks(batch, rollout_id if rollout_id is not None else self.step, prefix)
        clock.lap("hooks")
        new_batch, kept_tokens, fillers = self._rebalance(batch, global_batch, selection.keep,
                                                          groups.dp)
        clock.lap("rebalance")
        report = self._report(selection, global_batch, scores, kept_tokens, fillers, keep_count,
                              scoring_seconds, time.perf_counter() - start, groups.dp)
        if self.log and comm.is_global_rank_zero():
            print(format_report(report), flush=True)
        clock.lap("report")
        return new_batch, report

    # --- the stages ------------------------------------------------------------------------------

    def _report(self, selection: SampleSelection, gb: GlobalBatch, scores: TokenScores,
                kept_tokens: int, fillers: int, wanted: int | None, scoring_seconds: float,
                seconds: float, dp_group) -> StepReport:
        scored = scores.method != "none"  # the no-grad forward's work (none for `random`)
        kept_labels = torch.where(selection.keep, selection.quadrant, 0)
        return StepReport(
            step=self.step, strategy=self.config.strategy,
            quadrant_counts=selection.quadrant_counts(),
            kept_quadrant_counts=dataclasses.replace(selection,
                                                     quadrant=kept_labels).quadrant_counts(),
            kept_samples=int(selection.keep.sum()), total_samples=len(gb.sums),
            unplaceable_samples=int(selection.num_unplaceable), kept_tokens=kept_tokens,
            total_tokens=int(gb.loss_tokens.sum()),
            scored_samples=len(gb.sums) if scored else 0,
            scored_tokens=int(gb.sums[:, LENGTH].sum()) if scored else 0,
            level=float(selection.level),
            thresholds=Thresholds.from_quantiles(selection.thresholds),
            filler_samples=fillers, wanted_samples=wanted, scoring_seconds=scoring_seconds,
            scoring_peak_memory_bytes=comm.max_over_group(scores.peak_memory_bytes, dp_group),
            seconds=seconds)


    def _score(self, chunks: list[torch.nn.Module], batch: dict[str, list],
               groups: ParallelGroups) -> tuple[TokenScores, torch.Tensor]:
        """(per-token statistics of this DP replica's samples over their loss targets, their
        per-sample sums `[n, 5]`). Under --q-tuning-entropy-scope sequence every target position
        is scored, and the entropy sums keep them all."""
        if not needs_scores(self.config.strategy):
            scores = unscored_scores(batch["loss_masks"])
            return scores, sample_sums(scores, batch["loss_masks"], batch["tokens"])
        c = self.config
        scored_masks = batch["loss_masks"] if c.entropy_scope == "response" \
            else [torch.ones_like(m) for m in batch["loss_masks"]]
        scores = score_samples(
            chunks, batch["tokens"], scored_masks, rows_per_micro_batch=c.scoring_micro_batch_size,
            training_micro_batch_size=self.run.micro_batch_size,
            max_tokens_per_row=self.run.max_tokens_per_row, method=c.scoring_method,
            groups=groups, tokens_checked=True)  # `_validate` checked every token id
        return (loss_targets_only(scores, batch["loss_masks"]),
                sample_sums(scores, batch["loss_masks"], batch["tokens"]))

    @staticmethod
    def _gather(sums: torch.Tensor, groups: ParallelGroups, prefix: str) -> GlobalBatch:
        """All-gather the per-sample sums over DP, in DP-rank order."""
        global_sums, counts = comm.all_gather_rows(sums, groups.dp)
        if global_sums.shape[0] == 0:
            raise ValueError(f"{prefix}the global batch is empty")
        return GlobalBatch(sums=global_sums, counts=counts,
                           dp_rank=comm.rank_in(groups.dp) if counts[1:] else 0)

    def _select(self, gb: GlobalBatch, keep_count: int | None, prefix: str
                ) -> tuple[float, SampleSelection, StrategyDecision, torch.Tensor, torch.Tensor]:
        """(keep ratio, selection, strategy decision, PPL, entropy) of the global batch."""
        if needs_scores(self.config.strategy):
            ppl, ent = sample_ppl_entropy(gb.sums[:, NLL], gb.sums[:, ENTROPY], gb.loss_tokens,
                                          entropy_tokens=gb.sums[:, ENTROPY_TOKENS])
        else:  # nothing to place: the unscored rule sees NaN statistics
            ppl, ent = (torch.full_like(gb.sums[:, NLL], float("nan")) for _ in range(2))
        placed = int((gb.loss_tokens > 0).sum())
        ratio = self.config.sample_keep_ratio if keep_count is None \
            else min(1.0, keep_count / max(placed, 1))
        strategy = self._decide(ppl, ent, gb.loss_tokens, ratio, prefix)
        selection = dataclasses.replace(
            strategy.selection or unscored_selection(strategy.keep, gb.loss_tokens, ratio),
            keep=strategy.keep)
        return ratio, selection, strategy, ppl, ent

    def _rebalance(self, batch: dict[str, list], gb: GlobalBatch, keep: torch.Tensor,
                   dp_group) -> tuple[dict[str, list], int, int]:
        """(this rank's share of the kept samples, kept loss tokens, filler samples): kept samples
        move so every DP rank gets the same count (+-1) and near-equal tokens."""
        masks = self.last_decision.local_loss_masks
        keep_list = keep.tolist()  # one host read, not one per sample
        local_kept = {gb.offset + i: {**{f: v[i] for f, v in batch.items()},
                                      "loss_masks": masks[i]}
                      for i in range(len(batch["tokens"])) if keep_list[gb.offset + i]}
        kept_index = [i for i, k in enumerate(keep_list) if k]
        lengths = gb.sums[kept_index, LENGTH].long().tolist()
        assignment = [[kept_index[j] for j in share]
                      for share in assign_to_ranks(lengths, len(gb.counts))]
        everything = gather_kept(local_kept, dp_group)
        kept_tokens = sum(s["loss_masks"][1:].count_nonzero() for s in everything.values())
        mine = [everything[i] for i in assignment[gb.dp_rank]]
        fillers = sum(1 for a in assignment if not a)
        if not mine:
            shortest = kept_index[min(range(len(lengths)), key=lambda j: (lengths[j], j))]
            mine = [filler_sample(everything[shortest])]
        return {f: [s[f] for s in mine] for f in batch}, int(kept_tokens), fillers

    def rollout_data(self, batch: dict[str, list]) -> dict[str, list]:
        """slime-style per-sample lists of this DP rank's scored samples, for postprocess hooks.

        The batch's own fields (with `loss_masks` already token-pruned for kept Q2 samples), plus
        `total_lengths`, `response_lengths` (from the first loss token to the end),
        `sample_ppls`, `sample_entropies`, `quadrants` (1-4, 0 = unplaceable), `kept`, and
        `token_nlls` / `token_entropies` (per sample, one value per token: that token's
        statistic given the tokens before it; 0 where it is not a target).
        """
        d = self.last_decision
        n = len(batch["tokens"])
        local = slice(d.local_offset, d.local_offset + n)
        lengths = [t.numel() for t in batch["tokens"]]
        data = {f: list(v) for f, v in batch.items()}
        data["loss_masks"] = list(d.local_loss_masks)
        data["total_lengths"] = lengths
        data["response_lengths"] = [
            (n_tok - int(m.nonzero()[0])) if bool(m.any()) else 0
            for n_tok, m in zip(lengths, batch["loss_masks"])]
        data["sample_ppls"] = d.sample_ppl[local].tolist()
        data["sample_entropies"] = d.sample_entropy[local].tolist()
        data["quadrants"] = d.selection.quadrant[local].tolist()
        data["kept"] = d.selection.keep[local].tolist()
        data["token_nlls"] = [d.local_scores.nll[i, :lengths[i]] for i in range(n)]
        data["token_entropies"] = [d.local_scores.entropy[i, :lengths[i]] for i in range(n)]
        return data

    def _run_hooks(self, batch: dict[str, list], rollout_id: int, prefix: str) -> None:
        """Call every hook on this rank; a failure anywhere stops every rank with its name."""
        data = self.rollout_data(batch)
        error = None
        for hook in self.hooks:
            try:
                hook(self.hook_args, rollout_id, data)
            except Exception as e:  # reported on every rank by agree_on_errors
                name = getattr(hook, "__qualname__", repr(hook))
                error = f"postprocess hook {getattr(hook, '__module__', '?')}.{name} raised " \
                        f"{type(e).__name__}: {e}"
                break
        masks = data["loss_masks"]
        if error is None and (len(masks) != len(batch["tokens"]) or any(
                m.shape != t.shape for m, t in zip(masks, batch["tokens"]))):
            error = "a postprocess hook changed the number or length of 'loss_masks'"
        comm.agree_on_errors(error, prefix)  # every rank, whatever happened here
        self.last_decision.local_loss_masks = list(masks)

    def _decide(self, ppl: torch.Tensor, ent: torch.Tensor, num_tokens: torch.Tensor, ratio: float,
                prefix: str) -> StrategyDecision:
        """The strategy's decision; a user's rule that fails or differs between ranks stops every
        rank with the same error."""
        c = self.config
        inputs = StrategyInputs(
            ppl=ppl.cpu(), entropy=ent.cpu(), num_tokens=num_tokens.cpu(), keep_ratio=ratio,
            token_keep_ratio=c.token_keep_ratio, bisect_max_iter=c.bisect_max_iter, step=self.step,
            total_steps=self.run.total_steps, generator=seeded_generator(c.seed, self.step),
            options={"infobatch_prune_ratio": c.infobatch_prune_ratio,
                     "infobatch_anneal": c.infobatch_anneal}, selection_rule=c.selection)
        if c.strategy in STRATEGY_NAMES:  # built-ins are deterministic in their inputs
            return decide(c.strategy, inputs)
        decision, error = None, None
        try:
            decision = decide(c.strategy, inputs)
        except Exception as e:  # reported on every rank by agree_on_errors
            error = f"--q-tuning-strategy {c.strategy} raised {type(e).__name__}: {e}"
        comm.agree_on_errors(error, prefix)
        digest = torch.stack([decision.keep.double().sum(), (decision.keep.double() * torch.arange(
            1, ppl.numel() + 1, dtype=torch.float64)).sum(), decision.loss_weight.sum(),
            decision.token_pruning.double().sum()])
        if comm.world_disagrees(digest):
            comm.agree_on_errors(f"--q-tuning-strategy {c.strategy} gave different decisions "
                                 "on different ranks; draw random numbers from inputs.generator",
                                 prefix)
        return decision

    def _pruned_masks(self, strategy: StrategyDecision, gb: GlobalBatch, scores: TokenScores,
                      loss_masks: Sequence[torch.Tensor], ratio: float,
                      dp_group) -> list[torch.Tensor]:
        """Loss masks of this rank's samples after the strategy's token pruning and loss weights.

        Q-Tuning: kept Q2 samples get their highest-scoring tokens cleared, every other sample
        keeps its mask untouched. `ratio` sizes the global budget."""
        offset = gb.offset
        masks = list(loss_masks)
        n = len(masks)
        local = slice(offset, offset + n)  # one host read per decision tensor, not per sample
        weights = strategy.loss_weight[local].tolist()
        rule = [r if k else TokenPruning.NONE for r, k in
                zip(strategy.token_pruning[local].tolist(), strategy.keep[local].tolist())]
        scored = [i for i in range(n) if rule[i] == TokenPruning.SCORED]
        if self.config.token_budget == "global":  # a collective: every rank, Q2 rows or not
            keep = self._global_budget_keep(strategy, offset, scores, scored, gb.loss_tokens,
                                            ratio, dp_group)
        elif scored:
            keep = token_keep_mask(scores.nll[scored], scores.target_mask[scored],
                                   self.config.token_keep_ratio, self.config.neighbor_lambda)
        if scored:
            for row, i in enumerate(scored):
                masks[i] = keep[row, :masks[i].numel()].to(masks[i].dtype)
        for i in (i for i in range(n) if rule[i] == TokenPruning.RANDOM):
            generator = seeded_generator(self.config.seed, self.step, offset + i)
            keep = random_token_keep_mask(scores.target_mask[i, :masks[i].numel()].cpu(),
                                          self.config.token_keep_ratio, generator)
            masks[i] = keep.to(masks[i].device, masks[i].dtype)
        for i, weight in enumerate(weights):
            if weight != 1.0:
                masks[i] = masks[i].to(torch.float32) * weight
        return masks

    def _global_budget_keep(self, strategy: StrategyDecision, offset: int, scores: TokenScores,
                            scored: list[int], loss_tokens: torch.Tensor, ratio: float,
                            dp_group) -> torch.Tensor:
        """Bool [len(scored), L]: SPEC section 7's global budget over the Q2 samples of every DP
        rank. Each rank contributes its Q2 tokens' scores; all decide on the same gathered list."""
        c = self.config
        q2 = strategy.keep & (strategy.token_pruning == int(TokenPruning.SCORED))
        budget = global_token_budget(
            ratio, c.token_keep_ratio, int(loss_tokens.sum()),
            int(loss_tokens[strategy.keep & ~q2].sum()), int(q2.sum()), int(loss_tokens[q2].sum()))
        target = scores.target_mask[scored]  # [n2_local, L]
        flat = token_scores(scores.nll[scored], target, c.neighbor_lambda)
        sample = torch.repeat_interleave(torch.tensor(scored, dtype=torch.float64) + offset,
                                         target.sum(1))
        everything, counts = comm.all_gather_rows(torch.stack([sample, flat], 1), dp_group)
        kept = budget_keep(everything[:, 1], everything[:, 0].long(), budget)
        start = sum(counts[:comm.rank_in(dp_group)]) if len(counts) > 1 else 0
        mine = kept[start:start + flat.numel()]
        return torch.zeros_like(target).masked_scatter_(target, mine)

    def _validate(self, chunks: list[torch.nn.Module], batch: dict) -> str | None:
        """This rank's first problem with the batch, or None."""
        if not isinstance(batch, dict) or "tokens" not in batch or "loss_masks" not in batch:
            return "the batch must be a dict with per-sample lists 'tokens' and 'loss_masks'"
        n = len(batch["tokens"])
        for field, values in batch.items():
            if len(values) != n:
                return (f"field '{field}' has {len(values)} entries but 'tokens' has {n}; every "
                        "per-sample field needs one entry per sample")
        vocab = vocab_size_of(chunks[0])
        limit = self.run.seq_length
        for i, (tok, mask) in enumerate(zip(batch["tokens"], batch["loss_masks"])):
            where = f"sample {i} of this data-parallel rank"
            if not torch.is_tensor(tok) or tok.dim() != 1 or tok.is_floating_point():
                return f"{where}: 'tokens' must be a 1-D integer tensor"
            if not torch.is_tensor(mask) or mask.shape != tok.shape:
                shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
                return (f"{where}: 'loss_masks' entry has shape {shape}, tokens have "
                        f"{tuple(tok.shape)}; they must be the same length")
            if tok.numel() == 0:
                return f"{where} has no tokens"
            if limit is not None and tok.numel() > limit:
                return f"{where} has {tok.numel()} tokens, more than --seq-length {limit}"
            row = self.run.max_tokens_per_row
            if row is not None and tok.numel() > row:
                return f"{where} has {tok.numel()} tokens, more than --max-tokens-per-gpu {row}"
        return None if vocab is None else _first_out_of_vocab(batch["tokens"], vocab)


def _first_out_of_vocab(tokens: Sequence[torch.Tensor], vocab: int) -> str | None:
    """The first sample with a token id outside [0, vocab), or None: two host reads for the
    whole batch (min and max of all ids) instead of two per sample."""
    if not tokens:
        return None
    every = torch.cat(list(tokens))
    if int(every.min()) >= 0 and int(every.max()) < vocab:
        return None
    bad = next(i for i, t in enumerate(tokens) if int(t.min()) < 0 or int(t.max()) >= vocab)
    return f"sample {bad} of this data-parallel rank has token ids outside [0, {vocab})"
