"""token_nll_entropy against the float64 full-vocabulary reference it must equal (SPEC 1)."""

from __future__ import annotations

import pytest
import torch

from q_tuning.token_stats import token_nll_entropy, token_stats_workspace_bytes
from tests.workers import token_stats as dist_fns
from tests.harness.launch import run_distributed

# Inputs are upcast exactly, so every dtype is compared against the reference on the same upcast
# values and only the float32 arithmetic differs; bf16/fp16 logits are coarser numbers, not noisier
# math. Entropy and nll here are O(1..10), so an absolute tolerance is the meaningful one.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-6}


def reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Obviously correct and slow: float64 log-softmax over the whole vocabulary."""
    logp = torch.log_softmax(logits.double(), dim=-1)  # [..., V]
    nll = -logp.gather(-1, targets[..., None])[..., 0]
    entropy = -(logp.exp() * logp).sum(-1)
    return nll, entropy


def random_case(shape, vocab, dtype=torch.float32, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen) * scale).to(dtype)  # [*shape, V]
    targets = torch.randint(0, vocab, tuple(shape), generator=gen)
    return logits, targets


def assert_matches_reference(logits, targets, tol, **kwargs):
    before = logits.clone()
    nll, ent = token_nll_entropy(logits, targets, **kwargs)
    ref_nll, ref_ent = reference(logits, targets)
    assert nll.dtype == ent.dtype == torch.float32
    assert nll.shape == ent.shape == targets.shape
    torch.testing.assert_close(nll.double(), ref_nll, atol=tol, rtol=tol)
    torch.testing.assert_close(ent.double(), ref_ent, atol=tol, rtol=tol)
    assert torch.equal(logits, before), "the caller's logits were modified"


@pytest.mark.parametrize("shape,vocab", [((1, 1), 7), ((3, 5), 17), ((2, 33), 1000), ((11,), 257),
                                         ((2, 3, 4), 31), ((), 9)])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 7, 4096])
def test_fp32_matches_reference(shape, vocab, chunk_size):
    logits, targets = random_case(shape, vocab)
    assert_matches_reference(logits, targets, TOL[torch.float32], chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_low_and_high_precision_inputs(dtype, chunk_size):
    logits, targets = random_case((3, 13), 1000, dtype=dtype)
    assert_matches_reference(logits, targets, TOL[dtype], chunk_size=chunk_size)


def test_non_contiguous_logits():
    # Megatron's [s, b, V] seen as [b, s, V]: leading dims that cannot be flattened without a copy.
    logits, targets = random_case((6, 4), 50)
    assert_matches_reference(logits.transpose(0, 1), targets.t(), TOL[torch.float32], chunk_size=3)
    # Vocabulary not the fastest dim.
    assert_matches_reference(logits.view(24, 50).t().contiguous().t(), targets.view(24),
                             TOL[torch.float32])


@pytest.mark.parametrize("scale", [1e2, 1e4])
def test_extreme_logits_stay_finite_and_correct(scale):
    logits, targets = random_case((4, 9), 300, scale=scale)  # |z| up to ~4 * scale
    logits[0, :, 7] = 5 * scale  # one-hot-ish rows: p ~ 1 on id 7, the rest underflows
    targets[0, :3] = 7
    logits[1] += 1e4  # a large common offset: differences matter, absolute values must not
    nll, ent = token_nll_entropy(logits, targets, chunk_size=4)
    assert torch.isfinite(nll).all() and torch.isfinite(ent).all()
    ref_nll, ref_ent = reference(logits, targets)
    # nll reaches ~1e5 here; fp32 keeps ~7 significant digits of it.
    torch.testing.assert_close(nll.double(), ref_nll, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=1e-5)
    assert (ent[0] < 1e-6).all() and (nll[0, :3] < 1e-6).all()


def test_uniform_logits_have_log_vocab_entropy():
    vocab = 1000
    logits = torch.full((2, 3, vocab), 0.25)
    nll, ent = token_nll_entropy(logits, torch.zeros(2, 3, dtype=torch.long))
    expected = torch.full((2, 3), float(torch.log(torch.tensor(vocab, dtype=torch.float64))))
    torch.testing.assert_close(ent, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(nll, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(0, 50), (2, 0, 50), (0, 0)])
def test_zero_tokens_give_empty_results(shape):
    logits = torch.randn(shape)
    targets = torch.zeros(shape[:-1], dtype=torch.long)
    nll, ent = token_nll_entropy(logits, targets, chunk_size=3)
    assert nll.shape == ent.shape == targets.shape and nll.dtype == torch.float32


@pytest.mark.parametrize("bad", [-1, 17, 10**6])
def test_out_of_range_target_names_value_and_vocab(bad):
    logits, targets = random_case((2, 3), 17)
    targets[1, 2] = bad
    with pytest.raises(ValueError, match=rf"target id {bad} .*\[0, 17\)"):
        token_nll_entropy(logits, targets)


@pytest.mark.parametrize("logits,targets,match", [
    (torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long), "shape"),
    (torch.randn(2, 5), torch.zeros(2), "integer"),
    (torch.ones(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long), "floating"),
])
def test_bad_inputs_raise(logits, targets, match):
    with pytest.raises(ValueError, match=match):
        token_nll_entropy(logits, targets)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5])
def test_bad_chunk_size_raises(chunk_size):
    logits, targets = random_case((2,), 5)
    with pytest.raises(ValueError, match="chunk_size"):
        token_nll_entropy(logits, targets, chunk_size=chunk_size)


def test_autograd_enabled_disabled_and_inference_mode():
    logits, targets = random_case((2, 3), 40)
    expected = token_nll_entropy(logits, targets)
    leaf = logits.clone().requires_grad_()
    nll, ent = token_nll_entropy(leaf, targets, chunk_size=2)  # no history, leaf untouched
    assert not nll.requires_grad and not ent.requires_grad and leaf.grad is None
    with torch.no_grad():
        got_no_grad = token_nll_entropy(logits, targets)
    with torch.inference_mode():
        got_inference = token_nll_entropy(logits, targets)
    for got in [(nll, ent), got_no_grad, got_inference]:
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_chunking_does_not_change_results():
    logits, targets = random_case((37,), 300)
    whole = token_nll_entropy(logits, targets, chunk_size=37)
    for chunk_size in (1, 5, 36, 100):
        torch.testing.assert_close(token_nll_entropy(logits, targets, chunk_size=chunk_size),
                                   whole, atol=0, rtol=0)


def test_workspace_bytes_counts_two_chunk_buffers_and_stats():
    cpu = torch.device("cpu")
    assert token_stats_workspace_bytes(100, 1000, cpu, chunk_size=8) == 4 * (2 * 8 * 1000 + 4 * 100)
    assert token_stats_workspace_bytes(5, 1000, cpu, chunk_size=8) == 4 * (2 * 5 * 1000 + 4 * 5)
    assert token_stats_workspace_bytes(5, 10, cpu, dtype=torch.float64, chunk_size=2) == \
        8 * (2 * 2 * 10 + 4 * 5)
    assert token_stats_workspace_bytes(0, 1000, cpu) == 0
    # The default never exceeds 2 x 2^24 logits (the multi-threaded CPU chunk) plus statistics.
    assert token_stats_workspace_bytes(10**6, 49152, cpu) <= 4 * (2 * 2**24 + 4 * 10**6)


# --- tensor parallelism: spawned gloo ranks, each slicing its shard of the same seeded logits ---

# (seed, shape, vocab, dtype, scale, chunk_size); vocab divisible by 4. Scale 1e4 makes shards'
# maxima differ by thousands, so a shard's rescaling factor underflows to 0.
TP_CASES = [
    (1, (3, 7), 1000, "float32", 3.0, 5),
    (2, (2, 5), 256, "bfloat16", 3.0, None),
    (3, (9,), 64, "float32", 1e4, 4),
]


def _unsharded(case):
    seed, shape, vocab, dtype, scale, _ = case
    logits, targets = dist_fns.make_case(seed, shape, vocab, dtype, scale)
    return token_nll_entropy(logits, targets), reference(logits, targets)


# TP groups {0, 1} and {2, 3} inside a world of 4, each pair on its own seed (seed + rank // 2).
SUBGROUP_CASE = (10, (4, 3), 96, "float32", 3.0, 2)


@pytest.mark.parametrize("world_size", [2, 4])
def test_tensor_parallel_equals_unsharded(world_size):
    subgroup_case = SUBGROUP_CASE if world_size == 4 else None
    per_rank = run_distributed(dist_fns.sharded_stats, world_size, TP_CASES, subgroup_case,
                               timeout=120)
    for i, case in enumerate(TP_CASES):
        (nll, ent), (ref_nll, ref_ent) = _unsharded(case)
        for rank in range(world_size):
            got_nll, got_ent, unchanged = per_rank[rank][0][i]
            assert unchanged, f"rank {rank} modified its logits shard (case {case})"
            torch.testing.assert_close(got_nll, nll, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_ent, ent, atol=1e-5, rtol=1e-5)
            tol = 1e-5 if case[4] < 100 else 1e-2  # fp32 spacing at 1e4..1e5 logits is ~1e-3
            torch.testing.assert_close(got_nll.double(), ref_nll, atol=tol, rtol=1e-6)
            torch.testing.assert_close(got_ent.double(), ref_ent, atol=1e-5, rtol=1e-5)
    if subgroup_case is not None:  # the shard index is the rank in the TP group, not the global one
        seed, shape, vocab, dtype, scale, _ = subgroup_case
        for rank in range(world_size):
            logits, targets = dist_fns.make_case(seed + rank // 2, shape, vocab, dtype, scale)
            torch.testing.assert_close(per_rank[rank][1], token_nll_entropy(logits, targets),
                                       atol=1e-5, rtol=1e-5)
