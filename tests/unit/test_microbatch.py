"""Micro-batch layout and DP rebalancing, against direct per-sample references."""

import random

import pytest
import torch

from q_tuning.passes.microbatch import block_causal_mask, build_micro_batches, plan_rows
from q_tuning.parallel.rebalance import assign_to_ranks

pytestmark = pytest.mark.next_stack  # also in .ci/run's .venv-next


def samples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = [torch.randint(1, 50, (n,), generator=g) for n in lengths]
    masks = [(torch.rand(n, generator=g) > 0.4).long() for n in lengths]
    return toks, masks


@pytest.mark.parametrize("packed", [False, True])
def test_every_target_appears_once_with_its_label(packed):
    lengths = [5, 1, 9, 3, 7, 2]
    toks, masks = samples(lengths)
    layout = plan_rows(lengths, rows_per_micro_batch=2,
                       max_tokens_per_row=12 if packed else None, length_multiple=4)
    assert layout.seq_length % 4 == 0
    mbs = build_micro_batches(toks, masks, layout, num_micro_batches=layout.num_micro_batches + 1)
    seen = {}
    for mb in mbs:
        sel = mb["sample_index"] >= 0
        for i, j, lab, m in zip(mb["sample_index"][sel], mb["target_index"][sel],
                                mb["labels"][sel], mb["loss_mask"][sel]):
            i, j = int(i), int(j)
            assert (i, j) not in seen
            seen[(i, j)] = True
            assert int(lab) == int(toks[i][j]) and float(m) == float(masks[i][j])
    expected = {(i, j) for i, n in enumerate(lengths) for j in range(1, n)}
    assert set(seen) == expected
    assert float(mbs[-1]["loss_mask"].sum()) == 0  # the extra micro-batch is padding only
    if packed:
        assert layout.packed and all(mb["attention_mask"] is not None for mb in mbs)
        assert all(sum(lengths[i] for i in row) <= 12 for row in layout.rows)


def test_position_ids_restart_per_sample_in_packed_rows():
    toks, masks = samples([3, 4])
    layout = plan_rows([3, 4], max_tokens_per_row=8)
    (mb,) = build_micro_batches(toks, masks, layout)
    assert mb["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3]


@pytest.mark.parametrize("row", [[0, 0, 1, 1, 1, -1], [0, 1, 1, -1, -1, -1], [-1, -1, 2, 2]])
def test_block_causal_mask_matches_definition(row):
    """Regression: with several padding positions, padding also saw earlier padding."""
    seg = torch.tensor([row])
    mask = block_causal_mask(seg)[0, 0]
    n = len(row)
    for q in range(n):
        for k in range(n):
            allowed = (k <= q and seg[0, q] == seg[0, k] and seg[0, q] >= 0) or q == k
            assert bool(mask[q, k]) == (not allowed)


def test_sample_too_long_for_token_budget_names_it():
    with pytest.raises(ValueError, match="sample 1 has 9 tokens, more than --max-tokens-per-gpu 8"):
        plan_rows([3, 9], max_tokens_per_row=8)


@pytest.mark.parametrize("seed", range(20))
def test_assignment_is_balanced_and_complete(seed):
    rnd = random.Random(seed)
    n, ranks = rnd.randint(0, 40), rnd.randint(1, 4)
    lengths = [rnd.randint(1, 100) for _ in range(n)]
    parts = assign_to_ranks(lengths, ranks)
    assert sorted(i for p in parts for i in p) == list(range(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert parts == assign_to_ranks(lengths, ranks)  # deterministic
    if n >= ranks * 3:
        loads = [sum(lengths[i] for i in p) for p in parts]
        # longest-first greedy: no rank carries more than the mean plus one longest sample
        assert max(loads) <= sum(lengths) / ranks + max(lengths)


def test_grouped_lengths_pad_each_micro_batch_to_its_own_longest_row():
    lengths = [5, 30, 7, 28, 6, 29]
    toks, masks = samples(lengths)
    layout = plan_rows(lengths, rows_per_micro_batch=2, length_multiple=4, uniform_length=False)
    assert layout.rows == [[1], [5], [3], [2], [4], [0]]
    mbs = build_micro_batches(toks, masks, layout)
    assert [mb["tokens"].shape[1] for mb in mbs] == [32, 28, 8]
    targets = sum(int(mb["loss_mask"].sum()) for mb in mbs)
    assert targets == sum(int(m[1:].sum()) for m in masks)
