"""Length bucketing and packing of (kept) samples into training micro-batches: the bucket plan
is the optimum of its cost, no sample or target is lost, padding never grows, and the gradient of
a bucketed or packed step equals the one-sample-at-a-time reference."""

from __future__ import annotations

import random

import pytest
import torch

from q_tuning.passes.microbatch import (MICRO_BATCH_OVERHEAD_TOKENS, build_micro_batches,
                                          bucket_rows, plan_rows)
from tests.harness.launch import run_distributed
from tests.workers import packing as W

TIMEOUT = 240


def _cost(sorted_lengths, sizes, overhead):
    cost, start = 0, 0
    for k in sizes:
        cost += k * sorted_lengths[start] + overhead
        start += k
    return cost


def _all_splits(n, max_rows):
    """Every composition of n into parts of at most max_rows."""
    if n == 0:
        yield []
        return
    for k in range(1, min(n, max_rows) + 1):
        for rest in _all_splits(n - k, max_rows):
            yield [k] + rest


@pytest.mark.parametrize("seed", range(12))
def test_bucket_plan_is_the_optimum_of_its_cost(seed):
    rnd = random.Random(seed)
    n, max_rows, overhead = rnd.randint(1, 9), rnd.randint(1, 4), rnd.choice([0, 7, 64])
    lengths = sorted((rnd.randint(1, 300) for _ in range(n)), reverse=True)
    sizes = bucket_rows(lengths, max_rows, overhead)
    assert sum(sizes) == n and all(1 <= k <= max_rows for k in sizes)
    best = min(_cost(lengths, s, overhead) for s in _all_splits(n, max_rows))
    assert _cost(lengths, sizes, overhead) == best


def test_similar_lengths_stay_in_full_micro_batches():
    assert bucket_rows([30, 29, 28, 7, 6, 5], 2) == [2, 2, 2]
    assert bucket_rows([400, 390, 380, 120, 110, 100], 4) == [3, 3]


@pytest.mark.parametrize("seed", range(6))
def test_bucketed_layout_keeps_every_target_and_never_pads_more(seed):
    rnd = random.Random(seed)
    lengths = [rnd.randint(2, 400) for _ in range(rnd.randint(1, 20))]
    g = torch.Generator().manual_seed(seed)
    toks = [torch.randint(1, 50, (n,), generator=g) for n in lengths]
    masks = [(torch.rand(n, generator=g) > 0.3).long() for n in lengths]
    layout = plan_rows(lengths, rows_per_micro_batch=4, length_multiple=2, uniform_length=False)
    mbs = build_micro_batches(toks, masks, layout, num_micro_batches=layout.num_micro_batches + 1)
    seen = set()
    for mb in mbs:
        assert mb["tokens"].shape[0] <= 4 and mb["tokens"].shape[1] % 2 == 0
        sel = mb["sample_index"] >= 0
        for i, j, lab in zip(mb["sample_index"][sel].tolist(), mb["target_index"][sel].tolist(),
                             mb["labels"][sel].tolist()):
            assert (i, j) not in seen and lab == int(toks[i][j])
            seen.add((i, j))
    assert seen == {(i, j) for i, n in enumerate(lengths) for j in range(1, n)}
    assert float(mbs[-1]["loss_mask"].sum()) == 0
    positions = sum(mb["tokens"].numel() for mb in mbs[:-1])
    assert positions == layout.padded_tokens(lengths)
    # never more padding (plus the overhead it trades) than fixed groups of 4 sorted rows
    fixed = sorted(lengths, reverse=True)
    fixed_cost = sum(4 * ((g[0] + 1) // 2 * 2) + MICRO_BATCH_OVERHEAD_TOKENS
                     for g in (fixed[k:k + 4] for k in range(0, len(fixed), 4)))
    assert positions + MICRO_BATCH_OVERHEAD_TOKENS * layout.num_micro_batches <= fixed_cost


def _batch(lengths, seed=4):
    g = torch.Generator().manual_seed(seed)
    tokens, masks = [], []
    for n in lengths:
        tokens.append(torch.randint(0, 96, (n,), generator=g))
        mask = (torch.rand(n, generator=g) > 0.3).long()
        mask[: n // 3] = 0  # a prompt
        masks.append(mask)
    return {"tokens": tokens, "loss_masks": masks}


# Three long and four short samples: fixed groups of 4 would pad a short row to ~200 tokens.
LENGTHS = [200, 30, 190, 25, 180, 20, 15]


@pytest.mark.next_stack
@pytest.mark.parametrize("max_tokens", [None, 240])
def test_bucketed_and_packed_gradients_equal_the_reference(max_tokens):
    batch = _batch(LENGTHS)
    (out,) = run_distributed(W.layout_grads_worker, 1, batch, 4, max_tokens, timeout=TIMEOUT)
    (ref,) = run_distributed(W.one_sample_reference_worker, 1, batch, timeout=TIMEOUT)
    if max_tokens is None:  # the long samples and the short ones in separate buckets
        assert [s[0] for s in out["shapes"]] == [3, 4]
    assert set(out["grads"]) == set(ref)
    for name, g in ref.items():
        torch.testing.assert_close(out["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_all_padding_filler_micro_batches_are_one_row():
    lengths = [300, 10]
    toks = [torch.arange(n) for n in lengths]
    masks = [torch.ones(n, dtype=torch.long) for n in lengths]
    layout = plan_rows(lengths, rows_per_micro_batch=2, uniform_length=False)
    assert layout.bucket_sizes == (1, 1)
    mbs = build_micro_batches(toks, masks, layout, num_micro_batches=3)
    assert [tuple(mb["tokens"].shape) for mb in mbs] == [(1, 300), (1, 10), (1, 1)]
    assert layout.padded_tokens(lengths, 3) == 311


def _padded(sorted_lengths, sizes, multiple):
    total, start = 0, 0
    for k in sizes:
        total += k * (-(-sorted_lengths[start] // multiple) * multiple)
        start += k
    return total


@pytest.mark.parametrize("seed", range(10))
def test_padding_bound_holds_or_the_least_padding_is_taken(seed):
    rnd = random.Random(100 + seed)
    n, max_rows, multiple = rnd.randint(1, 9), rnd.randint(2, 4), rnd.choice([1, 4])
    lengths = [rnd.randint(1, 300) for _ in range(n)]
    bound = rnd.choice([0.0, 0.01, 0.05, 0.2])
    layout = plan_rows(lengths, rows_per_micro_batch=max_rows, length_multiple=multiple,
                       uniform_length=False, max_padding=bound)
    ordered = sorted(lengths, reverse=True)
    least = min(_padded(ordered, s, multiple) for s in _all_splits(n, max_rows))
    got = layout.padded_tokens(lengths)
    assert got == _padded(ordered, list(layout.bucket_sizes), multiple)
    assert layout.padding(lengths) <= bound + 1e-12 or got == least
    unbounded = plan_rows(lengths, rows_per_micro_batch=max_rows, length_multiple=multiple,
                          uniform_length=False)
    assert unbounded.bucket_sizes == tuple(bucket_rows(ordered, max_rows))
    assert got <= unbounded.padded_tokens(lengths)


def test_a_pruned_batch_is_padded_no_more_than_the_drawn_one():
    drawn = [100, 100, 100, 100, 85, 85, 85, 85]  # two full buckets, no padding
    kept = [100, 98, 90, 85]  # the overhead trade alone keeps these in one padded bucket
    reference = plan_rows(drawn, rows_per_micro_batch=4, uniform_length=False)
    assert reference.padding(drawn) == 0
    plain = plan_rows(kept, rows_per_micro_batch=4, uniform_length=False)
    assert plain.bucket_sizes == (4,) and plain.padding(kept) > 0.05
    bounded = plan_rows(kept, rows_per_micro_batch=4, uniform_length=False,
                        max_padding=reference.padding(drawn))
    assert bounded.padding(kept) == 0


def test_a_padding_bounded_step_has_the_reference_gradient():
    batch = _batch([100, 98, 90, 85])
    drawn = [100, 100, 100, 100, 85, 85, 85, 85]
    (out,) = run_distributed(W.layout_grads_worker, 1, batch, 4, None, drawn, timeout=TIMEOUT)
    (ref,) = run_distributed(W.one_sample_reference_worker, 1, batch, timeout=TIMEOUT)
    assert out["shapes"] == [(1, 100), (1, 98), (1, 90), (1, 85)]  # no padding, as drawn
    for name, g in ref.items():
        torch.testing.assert_close(out["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)
