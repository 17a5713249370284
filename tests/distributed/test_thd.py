"""Packed rows in the THD format (what transformer-engine's attention takes on GPU), checked on
CPU with a test attention that takes megatron's PackedSeqParams: same statistics, loss and
gradients as the block-diagonal-mask path and as unpacked rows; CP + THD is refused alike on
every rank."""

from __future__ import annotations

import pytest
import torch

from q_tuning.passes.microbatch import (build_micro_batches, model_inputs, plan_rows,
                                          row_cu_seqlens)
from tests.workers import thd as W
from tests.harness.launch import run_distributed

TIMEOUT = 240


def test_cu_seqlens_of_a_packed_row():
    assert row_cu_seqlens([3, 4], 10).tolist() == [0, 3, 7, 10]  # padding: its own segment
    assert row_cu_seqlens([3, 4], 7).tolist() == [0, 3, 7]
    assert row_cu_seqlens([], 4).tolist() == [0, 4]  # an all-padding micro-batch
    assert row_cu_seqlens([3], 3).dtype == torch.int32


def test_model_inputs_choose_the_path():
    tokens = [torch.arange(1, 4), torch.arange(1, 6), torch.arange(1, 3)]
    masks = [torch.ones_like(t) for t in tokens]
    layout = plan_rows([3, 5, 2], max_tokens_per_row=8)
    assert layout.rows[0] == [0, 1]
    (mb, *_) = build_micro_batches(tokens, masks, layout)  # the mask path
    assert "cu_seqlens" not in mb and mb["attention_mask"] is not None
    args, kwargs = model_inputs(mb)
    assert args[2] is mb["attention_mask"] and not kwargs
    (mb, *_) = build_micro_batches(tokens, masks, layout, thd=True)
    assert mb["cu_seqlens"].tolist() == [0, 3, 8] and mb["attention_mask"] is None
    args, kwargs = model_inputs(mb)
    params = kwargs["packed_seq_params"]
    assert args[2] is None and params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 3, 8] and params.max_seqlen_q == 5
    unpacked = build_micro_batches(tokens, masks, plan_rows([3, 5, 2]), thd=True)[0]
    assert "cu_seqlens" not in unpacked and model_inputs(unpacked)[1] == {}


@pytest.mark.parametrize("tp", [1, 2])
def test_thd_equals_the_mask_path_and_unpacked_rows(tp):
    outs = run_distributed(W.compare_worker, tp, tp, timeout=TIMEOUT)
    for out in outs:
        mask, thd, unpacked = out["mask"], out["thd"], out["unpacked"]
        assert thd["thd_calls"] and all(thd["thd_calls"])  # every attention call was THD
        assert not any(mask["thd_calls"])
        for key in ("nll", "entropy"):
            torch.testing.assert_close(thd[key], mask[key], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(thd[key], unpacked[key], atol=1e-5, rtol=1e-5)
        assert len(thd["loss"]) == len(mask["loss"])
        for a, b in zip(thd["loss"], mask["loss"]):
            assert a[1] == b[1] and a[0] == pytest.approx(b[0], rel=1e-5)
        for name, g in mask["grads"].items():
            torch.testing.assert_close(thd["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_context_parallel_with_thd_packing_is_refused_on_every_rank():
    outs = run_distributed(W.cp_refusal_worker, 2, timeout=TIMEOUT)
    assert all(o is not None and "--context-parallel-size > 1" in o for o in outs)
