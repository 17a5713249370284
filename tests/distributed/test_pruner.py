"""QTuningPruner on real megatron-core models: equivalence across TP/PP/VPP/CP/DP splits,
gradients of a pruned step, compute saving, bad input. Each case runs gloo processes with a
timeout, so a distributed hang fails the test instead of blocking the suite."""

from __future__ import annotations

import math

import pytest
import torch

from q_tuning import QTuningConfig, select_samples, token_keep_mask
from q_tuning.token_pruning import budget_token_keep_mask, global_token_budget
from tests.workers import pruner as W
from tests.harness.launch import run_distributed

CONFIG = dict(sample_keep_ratio=0.5, token_keep_ratio=0.6, neighbor_lambda=0.5)
BATCH = W.global_batch(12)
TIMEOUT = 240

# name: (world, tp, pp, cp, vpp)
SPLITS = {
    "tp2": (2, 2, 1, 1, None),
    "pp2": (2, 1, 2, 1, None),
    "pp2_vpp2": (2, 1, 2, 1, 2),
    "cp2": (2, 1, 1, 2, None),
    "dp2": (2, 1, 1, 1, None),
    "tp2_pp2": (4, 2, 2, 1, None),
    "tp2_dp2": (4, 2, 1, 1, None),
}


@pytest.fixture(scope="module")
def per_sample():
    """Per-token (nll, entropy) of every sample from a plain float64 forward."""
    (out,) = run_distributed(W.reference_worker, 1, BATCH, timeout=TIMEOUT)
    return out


def reference_decision(per_sample, config: dict) -> dict:
    """The algorithm core applied directly to the plain forward's statistics, for `config`'s
    selection rule, entropy scope and token budget (SPEC sections 2-4 and 7)."""
    c = QTuningConfig(**config)
    ppl, ent, masks = [], [], {}
    targets = [torch.cat([torch.zeros(1, dtype=torch.bool), m[1:].bool()]) for m in BATCH["loss_masks"]]
    for (nll, e), t in zip(per_sample, targets):
        ppl.append(math.exp(float(nll[t].mean())))
        ent.append(float((e[t] if c.entropy_scope == "response" else e[1:]).mean()))
    sel = select_samples(torch.tensor(ppl, dtype=torch.float64),
                         torch.tensor(ent, dtype=torch.float64), c.sample_keep_ratio,
                         rule=c.selection)
    kept = sel.keep.nonzero().flatten().tolist()
    q2 = [i for i in kept if int(sel.quadrant[i]) == 2]
    nll_rows = torch.nn.utils.rnn.pad_sequence([per_sample[i][0].float() for i in q2], True)
    target_rows = torch.nn.utils.rnn.pad_sequence([targets[i] for i in q2], True)
    if c.token_budget == "global":
        count = [int(t.sum()) for t in targets]
        budget = global_token_budget(c.sample_keep_ratio, c.token_keep_ratio, sum(count),
                                     sum(count[i] for i in kept if i not in q2), len(q2),
                                     sum(count[i] for i in q2))
        keep = budget_token_keep_mask(nll_rows, target_rows, budget, c.neighbor_lambda)
    elif q2:
        keep = token_keep_mask(nll_rows, target_rows, c.token_keep_ratio, c.neighbor_lambda)
    for i in kept:
        mask = BATCH["loss_masks"][i].clone()
        if i in q2:
            mask = keep[q2.index(i), :mask.numel()].long()
        masks[i] = mask.tolist()
    return {"ppl": ppl, "ent": ent, "keep": sel.keep.tolist(), "quadrant": sel.quadrant.tolist(),
            "masks": masks}


@pytest.fixture(scope="module")
def reference(per_sample):
    return reference_decision(per_sample, CONFIG)


@pytest.fixture(scope="module")
def single(reference):
    (out,) = run_distributed(W.prune_worker, 1, 1, 1, 1, None, CONFIG, BATCH, timeout=TIMEOUT)
    return out


def _union_of_new_batches(outs):
    new = {}
    for o in outs:
        for uid, mask in o["new"].items():
            assert new.setdefault(uid, mask) == mask, "replicas of a DP rank disagree"
    return new


def _assert_same_decision(out, ref, rel=1e-5):
    assert out["keep"] == ref["keep"]
    assert out["quadrant"] == ref["quadrant"]
    for a, b in zip(out["ppl"], ref["ppl"]):
        assert a == pytest.approx(b, rel=rel)
    for a, b in zip(out["ent"], ref["ent"]):
        assert a == pytest.approx(b, rel=rel)


@pytest.mark.next_stack
def test_single_process_equals_reference(single, reference):
    _assert_same_decision(single, reference)
    assert single["new"] == reference["masks"]
    r = single["report"]
    assert r["kept_samples"] == 6 and r["total_samples"] == 12
    assert sum(r["quadrant_counts"].values()) == 12
    assert r["kept_tokens"] == sum(sum(m[1:]) for m in reference["masks"].values())
    assert r["total_tokens"] == sum(int(m[1:].sum()) for m in BATCH["loss_masks"])


@pytest.mark.next_stack
@pytest.mark.parametrize("split", list(SPLITS))
def test_split_equals_single_process(split, single):
    world, tp, pp, cp, vpp = SPLITS[split]
    outs = run_distributed(W.prune_worker, world, tp, pp, cp, vpp, CONFIG, BATCH, timeout=TIMEOUT)
    for out in outs:  # bit-identical decision on every rank
        assert out["keep"] == outs[0]["keep"] and out["ppl"] == outs[0]["ppl"]
        _assert_same_decision(out, single)
        assert out["report"]["quadrant_counts"] == single["report"]["quadrant_counts"]
        assert out["report"]["kept_tokens"] == single["report"]["kept_tokens"]
    assert _union_of_new_batches(outs) == single["new"]
    sizes = {o["dp_rank"]: len(o["new"]) for o in outs}
    assert max(sizes.values()) - min(sizes.values()) <= 1


def test_packed_rows_equal_padded_rows(single):
    (out,) = run_distributed(W.prune_worker, 1, 1, 1, 1, None, CONFIG, BATCH,
                             {"max_tokens_per_row": 64}, timeout=TIMEOUT)
    _assert_same_decision(out, single)
    assert out["new"] == single["new"]


def test_packed_rows_under_context_parallel(single):
    outs = run_distributed(W.prune_worker, 2, 1, 1, 2, None, CONFIG, BATCH,
                           {"max_tokens_per_row": 64}, timeout=TIMEOUT)
    for out in outs:
        _assert_same_decision(out, single)
    assert _union_of_new_batches(outs) == single["new"]


# SPEC section 7: every option of the official code, and the global budget alone
PAPER_CONFIGS = {
    "global_budget": {**CONFIG, "token_budget": "global"},
    "official": {**CONFIG, "token_budget": "global", "entropy_scope": "sequence",
                 "selection": "paper"},
    "exact_sequence": {**CONFIG, "selection": "exact", "entropy_scope": "sequence"},
}


@pytest.mark.parametrize("name", list(PAPER_CONFIGS))
@pytest.mark.parametrize("split", ["single", "tp2", "pp2", "dp2", "packed"])
def test_paper_options_equal_reference_under_every_split(name, split, per_sample):
    config = PAPER_CONFIGS[name]
    ref = reference_decision(per_sample, config)
    if split in ("single", "packed"):
        extra = ({"max_tokens_per_row": 64},) if split == "packed" else ()
        outs = run_distributed(W.prune_worker, 1, 1, 1, 1, None, config, BATCH, *extra,
                               timeout=TIMEOUT)
    else:
        outs = run_distributed(W.prune_worker, *SPLITS[split], config, BATCH, timeout=TIMEOUT)
    for out in outs:
        _assert_same_decision(out, ref)
    assert _union_of_new_batches(outs) == ref["masks"]
    kept_tokens = sum(sum(m[1:]) for m in ref["masks"].values())
    assert all(o["report"]["kept_tokens"] == kept_tokens for o in outs)
    if config.get("token_budget") == "global":  # B, or Q4 + one per Q2 sample when above it
        count = [int(m[1:].sum()) for m in BATCH["loss_masks"]]
        budget = math.floor(config["sample_keep_ratio"] * config["token_keep_ratio"]
                            * sum(count) + 0.5)
        kept = [i for i, k in enumerate(ref["keep"]) if k]
        floor_tokens = sum(count[i] if ref["quadrant"][i] == 4 else 1 for i in kept)
        assert kept_tokens == max(budget, floor_tokens)


@pytest.mark.next_stack
@pytest.mark.parametrize("split", ["single", "dp2", "tp2_pp2", "cp2"])
def test_pruned_step_gradients_equal_kept_token_mean(split):
    world, tp, pp, cp, vpp = (1, 1, 1, 1, None) if split == "single" else SPLITS[split]
    outs = run_distributed(W.train_step_worker, world, tp, pp, cp, vpp, CONFIG, BATCH, 2,
                           timeout=TIMEOUT)
    kept = _union_of_new_batches(outs)
    (ref,) = run_distributed(W.reference_grads_worker, 1, BATCH, kept, timeout=TIMEOUT)
    for out in outs:
        assert set(out["grads"]) == set(ref)
        for name, g in ref.items():
            torch.testing.assert_close(out["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_dropped_samples_never_enter_the_training_forward():
    outs = run_distributed(W.train_step_worker, 2, 1, 1, 1, None, CONFIG, BATCH, 2,
                           timeout=TIMEOUT)
    kept = _union_of_new_batches(outs)
    rows = [row for o in outs for row in o["seen_rows"]]
    def forwarded(uid):
        tok = BATCH["tokens"][uid].tolist()
        return any(row[:len(tok)] == tok for row in rows)
    assert len(kept) == 6
    for uid in range(len(BATCH["tokens"])):
        assert forwarded(uid) == (uid in kept), uid
    # nothing but the kept samples (and padding) was forwarded
    assert sum(1 for row in rows if any(row)) == len(kept)


@pytest.mark.parametrize("case,expected", [
    ("empty", "the global batch is empty"),
    ("no_loss_tokens", "no sample of the batch can be placed"),
    ("too_long", "rank 1: sample 0 of this data-parallel rank has 50 tokens, more than --seq-length 40"),
    ("mismatched", "rank 0: sample 1 of this data-parallel rank: 'loss_masks' entry has shape"),
])
def test_bad_input_fails_on_every_rank_without_hanging(case, expected):
    outs = run_distributed(W.bad_input_worker, 2, case, {"seq_length": 40}, timeout=120)
    errors = [o.get("error") for o in outs]
    assert all(e is not None and expected in e for e in errors), errors
    assert errors[0] == errors[1]
    assert "Q-Tuning step 1" in errors[0]


def test_unplaceable_samples_are_counted_not_fatal():
    outs = run_distributed(W.bad_input_worker, 2, "some_unplaceable", timeout=120)
    for o in outs:
        r = o["report"]
        assert r["unplaceable_samples"] == 2  # sample 0 of each DP rank
        assert sum(r["quadrant_counts"].values()) == r["total_samples"] - 2
        assert r["kept_samples"] == 3  # floor(0.5 * 6 + 0.5)


def test_refill_keeps_exactly_the_requested_count():
    """The refill policy scores ceil(G / r) samples and trains on exactly G of them."""
    outs = run_distributed(W.prune_worker, 2, 1, 1, 1, None, CONFIG, BATCH, None,
                           {"keep_count": 5}, timeout=TIMEOUT)
    for out in outs:
        assert out["report"]["kept_samples"] == 5 and sum(out["keep"]) == 5
    assert sorted(len(o["new"]) for o in outs) == [2, 3]


def test_refill_short_of_placeable_samples_says_so():
    """Regression: with unplaceable samples refill trained fewer than wanted and said nothing."""
    from q_tuning.report import StepReport, Thresholds, format_report

    batch = {**BATCH, "loss_masks": [torch.zeros_like(m) if i < 4 else m
                                     for i, m in enumerate(BATCH["loss_masks"])]}
    (out,) = run_distributed(W.prune_worker, 1, 1, 1, 1, None, CONFIG, batch, None,
                             {"keep_count": 10}, timeout=TIMEOUT)
    report = out["report"]
    assert report["kept_samples"] == 8 and report["wanted_samples"] == 10
    report["thresholds"] = Thresholds(**report["thresholds"])
    assert "refill short: 2 fewer than the 10 wanted" in format_report(StepReport(**report))


def test_postprocess_hook_sees_the_documented_fields_and_its_mask_edits_are_trained():
    outs = run_distributed(W.hook_worker, 2, "hook_clearing_last_token", timeout=TIMEOUT)
    fields = {"tokens", "loss_masks", "uid", "total_lengths", "response_lengths", "sample_ppls",
              "sample_entropies", "quadrants", "kept", "token_nlls", "token_entropies"}
    for o in outs:
        assert set(o["seen"]) == fields
        assert set(o["seen"].values()) == {o["n_local"]}
        assert o["new_last_bits"] and not any(o["new_last_bits"])


def test_failing_hook_stops_every_rank_naming_hook_and_step():
    outs = run_distributed(W.hook_worker, 2, "hook_failing_on_rank_one", timeout=TIMEOUT)
    for o in outs:
        assert "Q-Tuning step 1: rank 1: postprocess hook" in o["error"]
        assert "hook_failing_on_rank_one raised RuntimeError: bad data at step 7" in o["error"]


def test_random_strategy_skips_scoring_and_is_layout_independent():
    config = {**CONFIG, "strategy": "random", "seed": 7}
    (one,) = run_distributed(W.strategy_worker, 1, config, BATCH, timeout=TIMEOUT)
    two = run_distributed(W.strategy_worker, 2, config, BATCH, timeout=TIMEOUT)
    assert one["forwards"] == 0 and all(o["forwards"] == 0 for o in two)
    assert one["report"]["kept_samples"] == 6 and one["report"]["strategy"] == "random"
    merged = {u: m for o in two for u, m in o["new"].items()}
    assert merged == one["new"]
    for uid, mask in one["new"].items():
        targets = int(BATCH["loss_masks"][uid][1:].sum())
        assert sum(mask[1:]) == max(1, math.floor(0.6 * targets + 0.5))
        assert all(not m or t for m, t in zip(mask, BATCH["loss_masks"][uid].tolist()))


def test_infobatch_gradients_equal_the_weighted_reference():
    config = {**CONFIG, "strategy": "infobatch", "infobatch_prune_ratio": 0.5, "seed": 3}
    outs = run_distributed(W.train_step_worker, 2, 1, 1, 1, None, config, BATCH, 2,
                           timeout=TIMEOUT)
    kept = _union_of_new_batches(outs)
    assert any(v == 2.0 for mask in kept.values() for v in mask)  # rescaled 1 / (1 - 0.5)
    assert len(kept) < len(BATCH["tokens"])
    (ref,) = run_distributed(W.reference_grads_worker, 1, BATCH, kept, timeout=TIMEOUT)
    for out in outs:
        for name, g in ref.items():
            torch.testing.assert_close(out["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_a_user_strategy_that_differs_between_ranks_fails_on_every_rank():
    config = {**CONFIG, "strategy": "tests.workers.pruner.rank_dependent_strategy"}
    outs = run_distributed(W.strategy_worker, 2, config, BATCH, timeout=TIMEOUT)
    assert all("gave different decisions on different ranks" in o["error"] for o in outs)
