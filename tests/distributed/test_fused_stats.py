"""The fused scoring path against the logits path it replaces.

Pure tensors: `fused_nll_entropy(hidden, weight, targets, bias)` must equal its one-line reference
`token_nll_entropy(hidden.to(weight.dtype) @ weight.T + bias, targets)` (and the float64
full-vocabulary statistics of those logits), on odd shapes and block shapes, per dtype, under
tensor parallelism, without allocating anything logits-sized.

Real megatron-core models (gloo processes, a hard timeout each): the scoring pass with
`method="fused"` equals `method="logits"` per token, and the pruner's decisions are identical, at
TP=1, TP=2, PP=2, CP=2 with tied and untied embeddings (plus sequence parallelism, interleaved
pipelines, bf16, an output bias), on samples with prompts of different lengths; the fallback case
scores through the logits path with one log line.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from q_tuning.fused_stats import fused_nll_entropy, fused_workspace_bytes
from q_tuning.passes import scoring
from q_tuning.token_stats import token_nll_entropy
from tests.workers import fused as W
from tests.harness.fixtures import global_batch
from tests.harness.launch import run_distributed

# Absolute tolerances on nll/entropy (values O(1..10)). float32: the 1e-5; the block-wise
# product and log-sum-exp merge only reorder float32 sums. Low precision: the product is rounded to
# the weight's dtype in both paths, but a different GEMM blocking can round a logit to the
# neighbouring value (one ulp: 2^-8 relative in bf16, 2^-11 in fp16), which moves nll/entropy by
# at most about two ulps of the largest logits (|z| < 8 here).
TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2 * 8 * 2 ** -8,
       torch.float16: 2 * 8 * 2 ** -11}


def make_case(n, hidden, vocab, dtype=torch.float32, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen)  # [n, h]
    w = (torch.randn(vocab, hidden, generator=gen) * 3 / math.sqrt(hidden)).to(dtype)  # [V, h]
    b = (torch.randn(vocab, generator=gen) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, vocab, (n,), generator=gen)
    return h, w, b, t


def projected_logits(h, w, b):
    """The reference projection, as megatron's output layer: in the weight's dtype, bias after."""
    z = h.to(w.dtype) @ w.T  # [n, V]
    return z if b is None else z + b


def float64_stats(z, t):
    logp = torch.log_softmax(z.double(), dim=-1)
    return -logp.gather(1, t[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def assert_close(got, want, tol):
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=0)


# --- pure tensors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n,hidden,vocab,chunks", [
    (1, 1, 1, (None, None)), (7, 5, 13, (1, 1)), (7, 5, 13, (2, 5)), (33, 16, 1000, (None, None)),
    (33, 16, 1000, (4, 7)), (33, 16, 1000, (5, 1000)), (130, 24, 4099, (None, None)),
    (130, 24, 4099, (64, 4096)), (130, 24, 4099, (17, 1000)),
])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_equals_reference(n, hidden, vocab, chunks, bias):
    h, w, b, t = make_case(n, hidden, vocab, bias=bias)
    h0, w0 = h.clone(), w.clone()
    nll, ent = fused_nll_entropy(h, w, t, b, chunk_tokens=chunks[0], chunk_vocab=chunks[1])
    z = projected_logits(h, w, b)
    ref_nll, ref_ent = token_nll_entropy(z, t)
    assert nll.dtype == ent.dtype == torch.float32 and nll.shape == ent.shape == (n,)
    assert_close(nll, ref_nll, TOL[torch.float32])
    assert_close(ent, ref_ent, TOL[torch.float32])
    f64_nll, f64_ent = float64_stats(z, t)
    assert_close(nll, f64_nll, TOL[torch.float32])
    assert_close(ent, f64_ent, TOL[torch.float32])
    assert torch.equal(h, h0) and torch.equal(w, w0), "inputs were modified"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
def test_other_dtypes_equal_reference(dtype, bias):
    h, w, b, t = make_case(57, 32, 3001, dtype=dtype, bias=bias, seed=1)
    nll, ent = fused_nll_entropy(h, w, t, b, chunk_tokens=8, chunk_vocab=512)
    ref_nll, ref_ent = token_nll_entropy(projected_logits(h, w, b), t)
    assert nll.dtype == torch.float32
    assert_close(nll, ref_nll, TOL[dtype])
    assert_close(ent, ref_ent, TOL[dtype])


def test_hidden_in_another_dtype_is_multiplied_in_the_weight_dtype():
    # Float16Module hands the last stage's output on in float32; the product stays in bf16.
    h, w, _, t = make_case(20, 16, 300, dtype=torch.bfloat16)
    h = h.to(torch.bfloat16).float()
    got = fused_nll_entropy(h, w, t, chunk_tokens=3, chunk_vocab=64)
    want = token_nll_entropy(projected_logits(h, w, None), t)
    for g, r in zip(got, want):
        assert_close(g, r, TOL[torch.bfloat16])


def test_extreme_logits_stay_finite_and_exact():
    # One block holds a huge logit, another the target: the merge must rescale, not overflow.
    h, w, _, t = make_case(6, 4, 50)
    w = w * 40.0  # logits of a few hundred
    nll, ent = fused_nll_entropy(h, w, t, chunk_tokens=2, chunk_vocab=7)
    ref_nll, ref_ent = float64_stats(projected_logits(h, w, None), t)
    assert torch.isfinite(nll).all() and torch.isfinite(ent).all()
    assert_close(nll, ref_nll, 1e-3)  # nll in the hundreds: float32 relative precision
    assert_close(ent, ref_ent, 1e-5)


def test_no_autograd_history_and_empty_input():
    h, w, _, t = make_case(5, 8, 40)
    w.requires_grad_(True)
    nll, ent = fused_nll_entropy(h, w, t)
    assert nll.grad_fn is None and ent.grad_fn is None
    nll, ent = fused_nll_entropy(h[:0], w, t[:0])
    assert nll.shape == ent.shape == (0,) and nll.dtype == torch.float32


def test_extra_memory_is_one_block_not_the_logits():
    """Every allocation the function makes, as torch's profiler sees it (CPU tensors are invisible
    to tracemalloc): the largest is one block's work buffers, the live peak stays within
    `fused_workspace_bytes`, both far below the `[n, V]` logits."""
    n, vocab, ct, cv = 48, 700, 8, 128
    h, w, b, t = make_case(n, 16, vocab, bias=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fused_nll_entropy(h, w, t, b, chunk_tokens=ct, chunk_vocab=cv)
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage),
                    key=lambda e: e.time_range.start)
    live = peak = largest = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
        largest = max(largest, e.self_cpu_memory_usage)
    logits_bytes = n * vocab * 4
    assert largest <= 2 * ct * cv * 4, largest
    assert peak <= fused_workspace_bytes(n, vocab, torch.float32, chunk_tokens=ct,
                                         chunk_vocab=cv) < logits_bytes / 3, peak


@pytest.mark.parametrize("call,message", [
    (lambda h, w, t: fused_nll_entropy(h[0], w, t), "hidden must be a floating [n, h]"),
    (lambda h, w, t: fused_nll_entropy(h, w[:, :3], t), "weight must be a floating [V/tp, h=8]"),
    (lambda h, w, t: fused_nll_entropy(h, w, t[:2]), "targets must have shape [n] = (5,)"),
    (lambda h, w, t: fused_nll_entropy(h, w, t.float()), "integer vocabulary ids"),
    (lambda h, w, t: fused_nll_entropy(h, w, t + 40), "outside the vocabulary [0, 40)"),
    (lambda h, w, t: fused_nll_entropy(h, w, t, torch.zeros(3)), "bias must be [V/tp] = (40,)"),
    (lambda h, w, t: fused_nll_entropy(h, w, t, chunk_tokens=0), "chunk_tokens must be"),
    (lambda h, w, t: fused_nll_entropy(h, w, t, chunk_vocab=1.5), "chunk_vocab must be"),
])
def test_bad_input_is_a_clear_error(call, message):
    h, w, _, t = make_case(5, 8, 40)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)").replace("]", r"\]").replace("+", r"\+")):
        call(h, w, t)


@pytest.mark.parametrize("world,dtype,bias,chunks", [(2, "float32", False, (None, None)),
                                                     (2, "float32", True, (3, 17)),
                                                     (2, "bfloat16", True, (4, 64)),
                                                     (4, "float32", True, (3, 17))])
def test_tensor_parallel_equals_unsharded(world, dtype, bias, chunks):
    seed, n, hidden, vocab = 4, 29, 12, 1000
    outs = run_distributed(W.sharded_fused, world, seed, n, hidden, vocab, dtype, bias, *chunks,
                           timeout=120)
    gen = torch.Generator().manual_seed(seed)  # the same draws as the workers
    h = torch.randn(n, hidden, generator=gen)
    w = (torch.randn(vocab, hidden, generator=gen) * 3 / hidden ** 0.5).to(getattr(torch, dtype))
    b = (torch.randn(vocab, generator=gen) * 0.5).to(w.dtype) if bias else None
    t = torch.randint(0, vocab, (n,), generator=gen)
    ref_nll, ref_ent = token_nll_entropy(projected_logits(h, w, b), t)
    for nll, ent in outs:
        assert torch.equal(nll, outs[0][0]) and torch.equal(ent, outs[0][1]), "ranks disagree"
        assert_close(nll, ref_nll, TOL[getattr(torch, dtype)])
        assert_close(ent, ref_ent, TOL[getattr(torch, dtype)])


# --- the scoring pass's pieces --------------------------------------------------------------------

class _FakeOutputLayer(torch.nn.Module):
    skip_bias_add, sequence_parallel, bias = False, False, None

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3, 2))

    def forward(self, input_, weight=None, runtime_gather_output=None):
        return input_ @ self.weight.T, None


def test_tap_returns_hidden_states_and_always_restores_the_layer():
    layer = _FakeOutputLayer()
    x = torch.randn(4, 1, 2)
    with scoring._HiddenStatesTap(layer) as tap:
        out, _ = layer(x)
    assert torch.equal(out, x) and tap.head.weight is layer.weight and tap.head.bias is None
    with pytest.raises(RuntimeError, match="boom"):
        with scoring._HiddenStatesTap(layer):
            raise RuntimeError("boom")
    assert "forward" not in vars(layer) and layer(x)[0].shape == (4, 1, 3)


class _Config:
    hidden_size, num_layers = 576, 30


@pytest.mark.parametrize("rows,train_mbs,pp,multiple,expected", [
    (64, 2, 1, 1, 16),  # SmolLM2-135M shape: 8x the training size (the cap), 4 micro-batches
    (12, 1, 1, 1, 6),   # 12 rows, at most 8 per micro-batch: 2 even micro-batches of 6
    (12, 1, 4, 1, 3),   # pipeline of 4: at least 4 micro-batches
    (12, 1, 4, 4, 3),
    (5, 1, 2, 4, 2),    # interleaved: 4 micro-batches (a multiple of 4), 2 rows each
    (0, 3, 1, 1, 24),
])
def test_default_scoring_micro_batch_size(rows, train_mbs, pp, multiple, expected):
    got = scoring.default_scoring_micro_batch_size(rows, train_mbs, _Config, 49152, pp_size=pp,
                                                   count_multiple=multiple)
    assert got == expected
    assert got >= min(train_mbs, max(rows, 1)) or pp > 1


def test_default_scoring_micro_batch_size_is_smaller_for_the_logits_path():
    # The logits path holds [rows, s, V/tp] logits per micro-batch, the fused path does not.
    fused = scoring.default_scoring_micro_batch_size(1000, 1, _Config, 151936, method="fused")
    logits = scoring.default_scoring_micro_batch_size(1000, 1, _Config, 151936, method="logits")
    assert fused == 8 and 1 <= logits < fused


# --- real megatron-core models --------------------------------------------------------------------

BATCH = global_batch(12)  # prompts of 1..14 tokens, responses with gaps
CONFIG = dict(sample_keep_ratio=0.5, token_keep_ratio=0.6, neighbor_lambda=0.5)
TIMEOUT = 300
SPLITS = {  # name: (world, tp, pp, cp, vpp)
    "tp1": (1, 1, 1, 1, None),
    "tp2": (2, 2, 1, 1, None),
    "pp2": (2, 1, 2, 1, None),
    "cp2": (2, 1, 1, 2, None),
    "pp2_vpp2": (2, 1, 2, 1, 2),
}


def _compare(split, tied, options=None):
    world, tp, pp, cp, vpp = SPLITS[split]
    return run_distributed(W.compare_worker, world, tp, pp, cp, vpp, tied, BATCH, CONFIG,
                           options or {}, timeout=TIMEOUT)


def _assert_fused_equals_logits(outs, tol, method="fused"):
    length = max(t.numel() for t in BATCH["tokens"])
    targets = scoring.target_masks(BATCH["loss_masks"], length)  # loss mask 1 at positions >= 1
    for o in outs:
        fused, logits = o["fused"], o["logits"]
        assert fused["method"] == method and logits["method"] == "logits"
        assert torch.equal(fused["target_mask"], logits["target_mask"])
        if fused["target_mask"].shape[0] == len(BATCH["tokens"]):  # no DP split
            assert torch.equal(fused["target_mask"], targets)
        mask = fused["target_mask"]
        assert_close(fused["nll"][mask], logits["nll"][mask], tol)
        assert_close(fused["entropy"][mask], logits["entropy"][mask], tol)
        # another micro-batch size (the default rule) scores the same, up to the rounding of
        # the model's products at another batch shape (seen: 1 ulp at values ~5 on this CPU)
        assert_close(o["fused_default_rows"]["nll"][mask], logits["nll"][mask], max(tol, 1e-5))
        assert o["output_layer_restored"]
        if "pruned" in o:
            assert o["pruned"]["fused"] == o["pruned"]["logits"]


def _assert_only_response_positions_projected(outs):
    """The fused path multiplies exactly the loss-mask positions (prompt positions never)."""
    total = sum(sum(o["projected_rows"]) for o in outs if o["is_last_stage"] and o["tp_rank"] == 0)
    assert total == sum(int(m[1:].sum()) for m in BATCH["loss_masks"])


@pytest.mark.parametrize("tied", [pytest.param(True, id="tied"),
                                  pytest.param(False, id="untied", marks=pytest.mark.next_stack)])
@pytest.mark.parametrize("split", ["tp1", "tp2", "pp2", "cp2"])
def test_fused_equals_logits_on_real_model(split, tied):
    outs = _compare(split, tied)
    _assert_fused_equals_logits(outs, TOL[torch.float32])
    _assert_only_response_positions_projected(outs)
    assert all(o["warnings"] == [] for o in outs)
    assert all(o["fused"]["peak"] > 0 for o in outs)


@pytest.mark.parametrize("split,options", [
    ("tp2", {"sequence_parallel": True}),
    ("pp2_vpp2", {}),
    ("tp2", {"bias": True}),
])
def test_fused_equals_logits_other_configurations(split, options):
    outs = _compare(split, tied=False, options=options)
    _assert_fused_equals_logits(outs, TOL[torch.float32])
    _assert_only_response_positions_projected(outs)


@pytest.mark.parametrize("split", ["tp1", "tp2"])
def test_fused_equals_logits_in_bf16(split):
    outs = _compare(split, tied=True, options={"dtype": "bfloat16", "prune": False})
    _assert_fused_equals_logits(outs, TOL[torch.bfloat16])


def test_unsupported_output_layer_falls_back_once_with_a_log_line():
    outs = _compare("tp1", tied=False, options={"wrap_output_layer": True})
    _assert_fused_equals_logits(outs, 0.0, method="logits")
    (o,) = outs
    assert o["projected_rows"] == []
    assert len(o["warnings"]) == 1, o["warnings"]
    assert "_WrappedOutputLayer" in o["warnings"][0] and "logits path" in o["warnings"][0]
