"""QTuningPruner: score, select on the global batch, prune Q2 tokens, rebalance over DP.

`prune(model, batch)` is called on every rank, inside an initialized megatron-core
`parallel_state`, with this DP rank's share of the step's samples (the same batch on every TP, PP
and CP rank of a DP replica). It returns this DP rank's share of the kept samples, with Q2 loss
masks pruned; dropped samples are gone from the returned batch, so the gradient step never sees
them (the compute saving). The decision is taken on the whole global batch and is bit-identical
on every rank:

- scoring: `parallel.scoring.score_samples` (TP/PP/CP inside, see its docstring);
- DP: per-sample sums (nll, entropy, tokens, length) are all-gathered in DP-rank order; every rank
  runs the strategy (`select_samples` for Q-Tuning, or a baseline of `q_tuning.strategies`) on the
  identical global tensor;
- tokens: each rank prunes its own Q2 samples with `token_keep_mask` (it holds their per-token
  statistics), before the samples move; baselines may prune tokens at random or weight losses;
- rebalance: kept samples are reassigned so every DP rank gets the same count (+-1) and near-equal
  tokens (`parallel.rebalance`).
Bad input is detected on every rank and agreed on before any collective, so it raises the same
error everywhere instead of hanging.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import torch

from q_tuning.config import STRATEGY_NAMES, QTuningConfig
from q_tuning.parallel import comm
from q_tuning.parallel.rebalance import assign_to_ranks, filler_sample, gather_kept
from q_tuning.parallel.scoring import ParallelGroups, TokenScores, score_samples, target_masks
from q_tuning.selection import SampleSelection, sample_ppl_entropy
from q_tuning.strategies import (StrategyDecision, StrategyInputs, TokenPruning, decide,
                                 needs_scores, random_token_keep_mask, resolve_strategy,
                                 seeded_generator)
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
    """Q-Tuning in front of a megatron-core gradient step. See the module docstring."""

    def __init__(self, config: QTuningConfig | Any, *, micro_batch_size: int | None = None,
                 seq_length: int | None = None, max_tokens_per_gpu: int | None = None,
                 log: bool = True, hooks: Sequence[Callable] = (), hook_args: Any = None,
                 total_steps: int | None = None) -> None:
        if isinstance(config, QTuningConfig):
            self.config = config
        else:  # a parsed Megatron-style args namespace
            self.config = QTuningConfig.from_args(config)
            micro_batch_size = micro_batch_size or getattr(config, "micro_batch_size", None)
            seq_length = seq_length or getattr(config, "seq_length", None)
            total_steps = total_steps or getattr(config, "train_iters", None)
            if getattr(config, "use_dynamic_batch_size", False):
                max_tokens_per_gpu = max_tokens_per_gpu or getattr(config, "max_tokens_per_gpu", None)
        self.training_micro_batch_size = micro_batch_size or 1
        self.seq_length = seq_length
        self.max_tokens_per_gpu = max_tokens_per_gpu
        self.log = log
        # slime's --rollout-data-postprocess-path contract: hook(args, rollout_id, rollout_data)
        self.hooks = list(hooks)
        self.hook_args = hook_args if hook_args is not None else config
        self.total_steps = total_steps  # InfoBatch anneals over the last steps of the run
        resolve_strategy(self.config.strategy)  # a bad --q-tuning-strategy fails here
        self.step = 0
        self.last_decision: StepDecision | None = None

    def prune(self, model: Sequence[torch.nn.Module] | torch.nn.Module, batch: dict[str, list],
              *, keep_count: int | None = None, rollout_id: int | None = None
              ) -> tuple[dict[str, list], dict]:
        """Return `(new_batch, report)`; `keep_count` overrides the keep ratio (refill policy).

        Hooks given to the constructor run between the decision and the rebalance, see
        `rollout_data`.
        """
        self.step += 1
        start = time.perf_counter()
        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        groups = ParallelGroups.from_parallel_state()
        prefix = f"Q-Tuning step {self.step}: "
        comm.agree_on_errors(self._validate(chunks, batch), prefix)

        scored = needs_scores(self.config.strategy)
        # entropy scope "sequence": every target position is scored (SPEC section 7)
        scored_masks = batch["loss_masks"] if self.config.entropy_scope == "response" \
            else [torch.ones_like(m) for m in batch["loss_masks"]]
        scores = score_samples(chunks, batch["tokens"], scored_masks,
                               rows_per_micro_batch=self.config.scoring_micro_batch_size,
                               training_micro_batch_size=self.training_micro_batch_size,
                               max_tokens_per_row=self.max_tokens_per_gpu,
                               method=self.config.scoring_method, groups=groups) \
            if scored else _unscored(batch["loss_masks"])
        scoring_seconds = time.perf_counter() - start
        sums = _sample_sums(scores, batch["tokens"], batch["loss_masks"])
        scores = _loss_targets_only(scores, batch["loss_masks"])
        global_sums, counts = comm.all_gather_rows(sums, groups.dp)
        if global_sums.shape[0] == 0:
            raise ValueError(f"{prefix}the global batch is empty")
        dp_rank = torch.distributed.get_rank(groups.dp) if counts[1:] else 0
        offset = sum(counts[:dp_rank])

        if scored:
            ppl, ent = sample_ppl_entropy(global_sums[:, 0], global_sums[:, 1], global_sums[:, 2],
                                          entropy_tokens=global_sums[:, 4])
        else:  # nothing to place: the unscored rule sees NaN statistics
            ppl, ent = (torch.full_like(global_sums[:, 0], float("nan")) for _ in range(2))
        placed = int((global_sums[:, 2] > 0).sum())
        ratio = self.config.sample_keep_ratio if keep_count is None \
            else min(1.0, keep_count / max(placed, 1))
        strategy = self._decide(ppl, ent, global_sums[:, 2], ratio, groups, prefix)
        selection = dataclasses.replace(
            strategy.selection or _unscored_selection(strategy.keep, global_sums[:, 2], ratio),
            keep=strategy.keep)
        self.last_decision = StepDecision(
            selection=selection, strategy=strategy, sample_ppl=ppl, sample_entropy=ent,
            local_offset=offset, local_scores=scores,
            local_loss_masks=self._pruned_masks(strategy, offset, scores, batch["loss_masks"],
                                                global_sums[:, 2], ratio, groups.dp))
        if self.hooks:
            self._run_hooks(batch, rollout_id if rollout_id is not None else self.step, prefix)

        local_kept = {offset + i: {**{f: v[i] for f, v in batch.items()},
                                   "loss_masks": self.last_decision.local_loss_masks[i]}
                      for i in range(len(batch["tokens"])) if bool(selection.keep[offset + i])}
        kept_index = selection.keep.nonzero().flatten().tolist()
        lengths = global_sums[kept_index, 3].long().tolist()
        shares = assign_to_ranks(lengths, len(counts))
        assignment = [[kept_index[j] for j in share] for share in shares]
        mine, kept_tokens, fillers = self._exchange(local_kept, assignment, dp_rank, groups.dp,
                                                    kept_index, lengths)
        new_batch = {f: [s[f] for s in mine] for f in batch}
        report = {
            "step": self.step,
            "strategy": self.config.strategy,
            "quadrant_counts": selection.quadrant_counts(),
            "kept_quadrant_counts": dataclasses.replace(
                selection, quadrant=torch.where(selection.keep, selection.quadrant, 0)
            ).quadrant_counts(),
            "kept_samples": len(kept_index),
            "total_samples": int(global_sums.shape[0]),
            "unplaceable_samples": int(selection.num_unplaceable),
            "kept_tokens": kept_tokens,
            "total_tokens": int(global_sums[:, 2].sum()),
            # the no-grad scoring forward's work: samples and all their tokens (0 when unscored)
            "scored_samples": int(global_sums.shape[0]) if scored else 0,
            "scored_tokens": int(global_sums[:, 3].sum()) if scored else 0,
            "level": float(selection.level),
            "thresholds": dict(zip(("ppl_low", "ppl_high", "ent_low", "ent_high"),
                                   (float(t) for t in selection.thresholds))),
            "filler_samples": fillers,
            "scoring_seconds": scoring_seconds,
            "scoring_peak_memory_bytes": comm.max_over_group(scores.peak_memory_bytes, groups.dp),
            "seconds": time.perf_counter() - start,
        }
        if self.log and _is_global_rank_zero():
            print(format_report(report), flush=True)
        return new_batch, report

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
                groups: ParallelGroups, prefix: str) -> StrategyDecision:
        """The strategy's decision; a user's rule that fails or differs between ranks stops every
        rank with the same error."""
        c = self.config
        inputs = StrategyInputs(
            ppl=ppl.cpu(), entropy=ent.cpu(), num_tokens=num_tokens.cpu(), keep_ratio=ratio,
            token_keep_ratio=c.token_keep_ratio, bisect_max_iter=c.bisect_max_iter, step=self.step,
            total_steps=self.total_steps, generator=seeded_generator(c.seed, self.step),
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
            comm.agree_on_errors(f"--q-tuning-strategy {c.strategy} gave different decisions on "
                                 "different ranks; draw random numbers from inputs.generator", prefix)
        return decision

    def _pruned_masks(self, strategy: StrategyDecision, offset: int, scores: TokenScores,
                      loss_masks: Sequence[torch.Tensor], loss_tokens: torch.Tensor,
                      ratio: float, dp_group) -> list[torch.Tensor]:
        """Loss masks of this rank's samples after the strategy's token pruning and loss weights.

        Q-Tuning: kept Q2 samples get their highest-scoring tokens cleared, every other sample
        keeps its mask untouched. `loss_tokens` [N_global] and `ratio` size the global budget."""
        masks = list(loss_masks)
        n = len(masks)
        rule = [int(strategy.token_pruning[offset + i]) if bool(strategy.keep[offset + i])
                else TokenPruning.NONE for i in range(n)]
        scored = [i for i in range(n) if rule[i] == TokenPruning.SCORED]
        if self.config.token_budget == "global":  # a collective: every rank, Q2 rows or not
            keep = self._global_budget_keep(strategy, offset, scores, scored, loss_tokens, ratio,
                                            dp_group)
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
        for i in range(n):
            weight = float(strategy.loss_weight[offset + i])
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
        start = sum(counts[:torch.distributed.get_rank(dp_group)]) if len(counts) > 1 else 0
        mine = kept[start:start + flat.numel()]
        return torch.zeros_like(target).masked_scatter_(target, mine)

    @staticmethod
    def _exchange(local_kept: dict[int, dict], assignment: list[list[int]], dp_rank: int,
                  dp_group, kept_index: list[int], lengths: list[int]
                  ) -> tuple[list[dict], int, int]:
        everything = gather_kept(local_kept, dp_group)
        kept_tokens = sum(int(s["loss_masks"][1:].count_nonzero()) for s in everything.values())
        mine = [everything[i] for i in assignment[dp_rank]]
        fillers = sum(1 for a in assignment if not a)
        if not mine:
            shortest = kept_index[min(range(len(lengths)), key=lambda j: (lengths[j], j))]
            mine = [filler_sample(everything[shortest])]
        return mine, kept_tokens, fillers

    def _validate(self, chunks: list[torch.nn.Module], batch: dict) -> str | None:
        """This rank's first problem with the batch, or None."""
        if not isinstance(batch, dict) or "tokens" not in batch or "loss_masks" not in batch:
            return "the batch must be a dict with per-sample lists 'tokens' and 'loss_masks'"
        n = len(batch["tokens"])
        for field, values in batch.items():
            if len(values) != n:
                return (f"field '{field}' has {len(values)} entries but 'tokens' has {n}; every "
                        "per-sample field needs one entry per sample")
        vocab = _vocab_size(chunks[0])
        limit = self.seq_length
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
            if self.max_tokens_per_gpu is not None and tok.numel() > self.max_tokens_per_gpu:
                return (f"{where} has {tok.numel()} tokens, more than --max-tokens-per-gpu "
                        f"{self.max_tokens_per_gpu}")
            if vocab is not None and (int(tok.min()) < 0 or int(tok.max()) >= vocab):
                return f"{where} has token ids outside [0, {vocab})"
        return None


def _unscored(loss_masks: Sequence[torch.Tensor]) -> TokenScores:
    """TokenScores for a strategy that needs no scoring forward: the target mask only."""
    length = max((m.numel() for m in loss_masks), default=0)
    target = torch.zeros(len(loss_masks), length, dtype=torch.bool)
    for i, m in enumerate(loss_masks):
        target[i, 1:m.numel()] = m[1:].cpu() != 0
    zeros = torch.zeros(target.shape, dtype=torch.float32)
    return TokenScores(nll=zeros, entropy=zeros.clone(), target_mask=target, method="none")


def _unscored_selection(keep: torch.Tensor, num_tokens: torch.Tensor, ratio: float
                        ) -> SampleSelection:
    """A SampleSelection without EU-plane labels (quadrant 0, NaN level and thresholds)."""
    placed = num_tokens.cpu() > 0
    nan = float("nan")
    return SampleSelection(
        keep=keep, quadrant=torch.zeros(keep.shape, dtype=torch.int64), placed=placed,
        entry_level=torch.full(keep.shape, nan, dtype=torch.float64), level=nan,
        thresholds=(nan, nan, nan, nan), target_count=int(keep.sum()),
        num_placed=int(placed.sum()), num_unplaceable=int((~placed).sum()),
        num_empty=int((~placed).sum()), keep_ratio=ratio)


def _sample_sums(scores: TokenScores, tokens: Sequence[torch.Tensor],
                 loss_masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """`[n, 5]` float64 per sample: nll sum and loss-target count over the loss targets, entropy
    sum over the scored targets (the loss targets, or all under --q-tuning-entropy-scope
    sequence), length, scored-target count."""
    loss = target_masks(loss_masks, scores.target_mask.shape[1])
    scored = scores.target_mask
    return torch.stack([(scores.nll.double() * loss).sum(1),
                        (scores.entropy.double() * scored).sum(1),
                        loss.sum(1).double(),
                        torch.tensor([t.numel() for t in tokens], dtype=torch.float64),
                        scored.sum(1).double()], dim=1)


def _loss_targets_only(scores: TokenScores, loss_masks: Sequence[torch.Tensor]) -> TokenScores:
    """`scores` restricted to the loss targets (a no-op unless more positions were scored)."""
    loss = target_masks(loss_masks, scores.target_mask.shape[1])
    if torch.equal(loss, scores.target_mask):
        return scores
    return dataclasses.replace(scores, nll=scores.nll * loss, entropy=scores.entropy * loss,
                               target_mask=loss)


def _vocab_size(chunk: torch.nn.Module) -> int | None:
    while hasattr(chunk, "module") and not hasattr(chunk, "vocab_size"):
        chunk = chunk.module
    return getattr(chunk, "vocab_size", None)


def _is_global_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def format_report(report: dict) -> str:
    """The seed's two log lines, then thresholds and timing."""
    kept, total = report["kept_samples"], report["total_samples"]
    t = report["thresholds"]
    lines = [
        f"[Q-Tuning] Quadrant distribution: {report['quadrant_counts']}",
        f"[Q-Tuning] Kept {kept}/{total} samples ({100.0 * kept / max(total, 1):.1f}%), "
        f"{report['kept_tokens']}/{report['total_tokens']} tokens "
        f"({100.0 * report['kept_tokens'] / max(report['total_tokens'], 1):.1f}%)"
        + (f", {report['unplaceable_samples']} unplaceable" if report["unplaceable_samples"] else ""),
        (f"[Q-Tuning] strategy={report['strategy']} "
         if report.get("strategy", "eu_plane") != "eu_plane" else "[Q-Tuning] ")
        + f"level={report['level']:.4f} ppl=[{t['ppl_low']:.3g}, {t['ppl_high']:.3g}] "
        f"ent=[{t['ent_low']:.3g}, {t['ent_high']:.3g}] scoring={report['scoring_seconds']:.2f}s"
        + (f" peak={report['scoring_peak_memory_bytes'] / 2**20:.0f}MiB"
           if report.get("scoring_peak_memory_bytes") else ""),
    ]
    return "\n".join(lines)
