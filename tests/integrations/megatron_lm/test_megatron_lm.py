"""The Megatron-LM adapter (`q_tuning.megatron_lm`).

Three layers of tests:
- micro-batch <-> sample conversion (pure tensors), for mock/pretraining rows and `--sft` packed
  rows with `cu_seqlens`;
- one adapter step driven like Megatron-LM's `train_step`, on real megatron-core models at
  1 process, DP=2, TP=2, PP=2 and PP=2 x VPP=2 (gloo): the gradient equals the gradient of the
  mean loss over exactly the kept tokens, the iterator gives up exactly the step's micro-batches,
  and evaluation (`forward_only=True`) passes through untouched; the step number is Megatron's
  iteration; learned absolute positions of `--seq-length` rows score every trained target exactly;
  what cannot be pruned is an error, never an unpruned step;
- Megatron-LM's own unmodified `pretrain_gpt.py` under torchrun, with and without Q-Tuning. These
  need a Megatron-LM checkout (not on PyPI) and skip without one; `bash scripts/test_megatron_lm.sh
  /path/to/Megatron-LM` runs them.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from q_tuning.megatron_lm.batches import (UnsupportedBatch, micro_batches_to_samples, plan_rows,
                                          row_format, samples_to_rows)
from q_tuning.megatron_lm.step import unsupported_reason
from q_tuning.selection import keep_count
from tests.workers import pruner as W
from tests.harness import megatron_lm as H
from tests.harness.launch import run_distributed

TIMEOUT = 300


# --- conversion ----------------------------------------------------------------------------------

def _plain_micro_batches(num_rows=6, mbs=2):
    return H.rows_to_micro_batches(H.step_rows(num_rows), mbs)


def _equal_micro_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert list(x) == list(y)
        for k in x:
            assert x[k].dtype == y[k].dtype, k
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, msg=k)


@pytest.mark.next_stack
def test_plain_rows_round_trip():
    mbs = _plain_micro_batches()
    fmt = row_format(mbs)
    assert (fmt.micro_batch_size, fmt.seq_length, fmt.packed) == (2, H.STEP_SEQ, False)
    samples = micro_batches_to_samples(mbs)
    assert len(samples["tokens"]) == 6
    for tok, mask, mb_row in zip(samples["tokens"], samples["loss_masks"], H.step_rows(6)):
        # The row's text: its inputs, then its last label where that is a target.
        assert torch.equal(tok[:-1], mb_row["text"][:-1])
        assert mask[-1] == 0 or tok[-1] == mb_row["text"][-1]
        assert mask[0] == 0 and torch.equal(mask[1:], mb_row["loss_mask"])
    rows = plan_rows([t.numel() - 1 for t in samples["tokens"]], seq_length=H.STEP_SEQ,
                     packed=False)
    _equal_micro_batches(samples_to_rows(samples, rows, fmt, len(mbs)), mbs)


def test_plain_rows_pruned_and_padded():
    mbs = _plain_micro_batches(6, 2)
    fmt = row_format(mbs)
    samples = micro_batches_to_samples(mbs)
    kept = {k: [v[i] for i in (4, 1, 3)] for k, v in samples.items()}
    kept["loss_masks"][1] = torch.zeros_like(kept["loss_masks"][1])  # e.g. all tokens pruned
    rows = plan_rows([t.numel() - 1 for t in kept["tokens"]], seq_length=H.STEP_SEQ, packed=False)
    out = samples_to_rows(kept, rows, fmt, count=3)
    assert len(out) == 3 and all(mb["tokens"].shape == (2, H.STEP_SEQ) for mb in out)
    flat = {k: torch.cat([mb[k] for mb in out]) for k in out[0]}
    originals = {k: torch.cat([mb[k] for mb in mbs]) for k in mbs[0]}
    for row, src in enumerate((4, 1, 3)):
        for k in ("tokens", "labels", "position_ids", "attention_mask"):
            assert torch.equal(flat[k][row], originals[k][src]), k
    assert torch.equal(flat["loss_mask"][0], originals["loss_mask"][4])
    assert flat["loss_mask"][1].sum() == 0
    assert flat["loss_mask"][3:].sum() == 0  # filler rows and the filler micro-batch


PAD, IGNORE = 95, -100


def _sft_row(conversations, seq, seed):
    """A packed row as megatron/training/datasets/sft_dataset.py builds it: each conversation is
    (prompt, response) token counts; prompt targets are IGNORE; the padding extends the last
    segment; labels are the targets shifted by one."""
    g = torch.Generator().manual_seed(seed)
    tokens, targets, positions, cu = [], [], [], [0]
    for prompt, response in conversations:
        t = torch.randint(0, PAD, (prompt + response,), generator=g).tolist()
        tokens += t
        targets += [IGNORE] * prompt + t[prompt:]
        positions += list(range(len(t)))
        cu.append(len(tokens))
    pad = seq + 1 - len(tokens)
    tokens += [PAD] * pad
    targets += [PAD] * pad
    positions += list(range(positions[-1] + 1, positions[-1] + 1 + pad))
    cu[-1] = seq
    labels = torch.tensor(targets[1:])
    loss_mask = ((labels != PAD) & (labels != IGNORE)).float()
    cu_t = torch.tensor(cu, dtype=torch.int32)
    return {"tokens": torch.tensor(tokens[:-1])[None], "labels": labels[None],
            "loss_mask": loss_mask[None], "position_ids": torch.tensor(positions[:-1])[None],
            "cu_seqlens": cu_t[None], "max_seqlen": (cu_t[1:] - cu_t[:-1]).max()[None]}


SFT_ROWS = [[(3, 5), (2, 6), (4, 3)], [(5, 9), (1, 4)], [(2, 2), (3, 3), (1, 7), (2, 2)]]
SFT_SEQ = 24


def test_packed_rows_round_trip():
    mbs = [_sft_row(conv, SFT_SEQ, i) for i, conv in enumerate(SFT_ROWS)]
    fmt = row_format(mbs)
    assert fmt.packed and fmt.micro_batch_size == 1
    samples = micro_batches_to_samples(mbs)
    assert len(samples["tokens"]) == sum(len(c) for c in SFT_ROWS)  # one sample per segment
    first = SFT_ROWS[0][0]
    mask = samples["loss_masks"][0]
    # The first conversation: no target before its response, every response token a target.
    assert mask[:first[0]].sum() == 0 and mask[first[0]:sum(first)].sum() == first[1]
    rows = plan_rows([t.numel() - 1 for t in samples["tokens"]], seq_length=SFT_SEQ, packed=True)
    _equal_micro_batches(samples_to_rows(samples, rows, fmt, len(mbs)), mbs)


@pytest.mark.next_stack
def test_packed_rows_repacked_after_pruning():
    mbs = [_sft_row(conv, SFT_SEQ, i) for i, conv in enumerate(SFT_ROWS)]
    fmt = row_format(mbs)
    samples = micro_batches_to_samples(mbs)
    pick = [1, 4, 6, 8]  # segments from all three rows
    kept = {k: [v[i] for i in pick] for k, v in samples.items()}
    lengths = [t.numel() - 1 for t in kept["tokens"]]
    rows = plan_rows(lengths, seq_length=SFT_SEQ, packed=True)
    out = samples_to_rows(kept, rows, fmt, count=len(rows) + 1)
    segments = []
    for mb in out:
        cu = mb["cu_seqlens"][0].tolist()
        assert cu[0] == 0 and cu[-1] == SFT_SEQ and mb["cu_seqlens"].dtype == torch.int32
        assert int(mb["max_seqlen"][0]) == max(b - a for a, b in zip(cu, cu[1:]))
        for a, b in zip(cu, cu[1:]):
            if mb["loss_mask"][0, a:b].sum() > 0:
                segments.append({k: mb[k][0, a:b] for k in ("tokens", "labels", "loss_mask",
                                                             "position_ids")})
    assert len(segments) == len(pick)
    for seg, i in zip(segments, pick):
        assert torch.equal(seg["tokens"], samples["tokens"][i][:-1])
        assert torch.equal(seg["labels"], samples["labels"][i])
        assert torch.equal(seg["loss_mask"], samples["loss_masks"][i][1:])
        assert torch.equal(seg["position_ids"], samples["position_ids"][i])
    assert out[-1]["loss_mask"].sum() == 0


def test_packing_is_first_fit_in_order():
    assert plan_rows([5, 9, 4, 3, 6], seq_length=12, packed=True) == [[0, 2, 3], [1], [4]]
    assert plan_rows([5, 9], seq_length=12, packed=False) == [[0], [1]]
    with pytest.raises(UnsupportedBatch, match="does not fit"):
        plan_rows([13], seq_length=12, packed=True)


def test_unreadable_micro_batches_are_refused():
    mbs = _plain_micro_batches(2, 2)
    bad = [dict(mbs[0], labels=mbs[0]["labels"].roll(1, dims=1))]
    with pytest.raises(UnsupportedBatch, match="not the next input token"):
        micro_batches_to_samples(bad)
    with pytest.raises(UnsupportedBatch, match="keys"):
        row_format([dict(mbs[0], extra=mbs[0]["tokens"])])
    other_mask = dict(mbs[0], attention_mask=~mbs[0]["attention_mask"])
    with pytest.raises(UnsupportedBatch, match="attention masks"):
        row_format([mbs[0], other_mask])


def _args(**overrides):
    import types

    base = dict(q_tuning_batch_policy="shrink", mtp_num_layers=None, sft=False,
                reset_position_ids=False, reset_attention_mask=False, cuda_graph_impl="none",
                position_embedding_type="rope", max_position_embeddings=64, seq_length=32,
                hybrid_context_parallel=False, ddp_average_in_collective=False,
                calculate_per_token_loss=True)
    return types.SimpleNamespace(**{**base, **overrides})


@pytest.mark.parametrize("overrides, words", [
    ({}, None),
    ({"q_tuning_batch_policy": "refill"}, "use --q-tuning-batch-policy shrink"),
    ({"mtp_num_layers": 1}, "drop --mtp-num-layers"),
    ({"hybrid_context_parallel": True}, "--hybrid-context-parallel: drop it"),
    ({"reset_attention_mask": True}, "--reset-attention-mask without --sft"),
    ({"reset_attention_mask": True, "sft": True}, None),
    ({"cuda_graph_impl": "local"}, "use --cuda-graph-impl none"),
    ({"ddp_average_in_collective": True}, "drop --ddp-average-in-collective"),
    # Megatron-LM's default GPT positions: supported (the scoring pass needs no extra position).
    ({"position_embedding_type": "learned_absolute", "max_position_embeddings": 32}, None),
])
def test_unsupported_configurations_name_the_setting_and_the_fix(overrides, words):
    reason = unsupported_reason(_args(**overrides))
    assert (reason is None) if words is None else (words in reason)


@pytest.mark.next_stack
def test_off_returns_megatrons_own_function_and_what_cannot_run_raises():
    from q_tuning.megatron_lm.step import QTuningStep, UnsupportedConfiguration

    def forward_backward(**kwargs):
        return "native"

    assert QTuningStep().wrap(forward_backward, _args(enable_q_tuning=False)) is forward_backward
    with pytest.raises(UnsupportedConfiguration, match="--mtp-num-layers"):
        QTuningStep().wrap(forward_backward, _args(enable_q_tuning=True, mtp_num_layers=2))
    with pytest.raises(UnsupportedConfiguration, match="--calculate-per-token-loss"):
        QTuningStep().wrap(forward_backward, _args(enable_q_tuning=True,
                                                   calculate_per_token_loss=False))
    wrapped = QTuningStep().wrap(forward_backward, _args(enable_q_tuning=True))
    assert wrapped is not forward_backward and wrapped.__wrapped__ is forward_backward
    assert wrapped(forward_only=True, data_iterator=None) == "native"
    # Positional arguments used to run an unpruned step; now they are an error, evaluation too.
    with pytest.raises(TypeError, match="2 positional argument.*keyword arguments only"):
        wrapped(print, None, forward_only=False)
    with pytest.raises(TypeError, match="positional"):
        wrapped(print, forward_only=True)


# --- install() against a stand-in megatron.training (CI) ----------------------------------------

def _fake_megatron_training(monkeypatch, argv: list[str], *, drop: str | None = None,
                            extra_flags: list[str] = (), layout: str = "core_v0.16.1"):
    """Modules shaped like Megatron-LM's megatron.training (the symbols install() patches); its
    parser knows --calculate-per-token-loss and the `extra_flags` (all store_true). `layout`
    "core_v0.16.1": initialize.py holds parse_args by name; "core_v0.19.0": it does not (the
    script calls arguments.parse_and_validate_args, which calls parse_args by global name)."""
    import argparse
    import types

    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        parser = argparse.ArgumentParser()
        for flag in ("--calculate-per-token-loss", *extra_flags):
            parser.add_argument(flag, action="store_true")
        if extra_args_provider is not None:
            parser = extra_args_provider(parser)
        args = parser.parse_args(argv)
        package.get_args = lambda: args
        return args

    def native_forward_backward(**kwargs):
        return "native"

    package = types.ModuleType("megatron.training")
    modules = {"megatron.training": package}
    for name in ("arguments", "initialize", "training"):
        module = types.ModuleType(f"megatron.training.{name}")
        modules[module.__name__] = module
        setattr(package, name, module)
    arguments = modules["megatron.training.arguments"]
    arguments.parse_args = parse_args
    arguments.parse_and_validate_args = lambda: arguments.parse_args()
    if layout == "core_v0.16.1":
        modules["megatron.training.initialize"].parse_args = parse_args
    modules["megatron.training.training"].get_forward_backward_func = \
        lambda: native_forward_backward
    if drop:
        module, symbol = drop.rsplit(".", 1)
        delattr(modules[module], symbol)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules, native_forward_backward


@pytest.mark.next_stack
def test_install_is_idempotent_marked_and_composes_with_the_scripts_flags(monkeypatch, capsys):
    import q_tuning.megatron_lm as adapter
    from q_tuning import add_q_tuning_args

    modules, native = _fake_megatron_training(monkeypatch, ["--enable-q-tuning"])
    initialize = modules["megatron.training.initialize"]
    training = modules["megatron.training.training"]
    original_parse = initialize.parse_args
    assert not adapter.installed()
    adapter.install()
    patched = (initialize.parse_args, training.get_forward_backward_func)
    adapter.install()  # again: nothing changes, nothing logged
    assert adapter.installed()
    assert (initialize.parse_args, training.get_forward_backward_func) == patched
    assert modules["megatron.training.arguments"].parse_args is initialize.parse_args
    assert initialize.parse_args.__wrapped__ is original_parse
    out = capsys.readouterr().out
    assert out.count("[Q-Tuning] patched megatron.training.arguments.parse_args and "
                     "megatron.training.initialize.parse_args") == 1
    assert out.count("[Q-Tuning] patched megatron.training.training.get_forward_backward_func") == 1
    # The user may pass our flags as extra_args_provider too: they are added once.
    args = initialize.parse_args(extra_args_provider=add_q_tuning_args)
    assert args.enable_q_tuning and args.calculate_per_token_loss
    assert training.get_forward_backward_func() is not native


@pytest.mark.next_stack
def test_install_on_the_core_v0_19_layout_patches_what_the_script_calls(monkeypatch, capsys):
    """core_v0.19.0: no parse_args in initialize.py; pretrain_gpt.py calls
    arguments.parse_and_validate_args, whose parse_args is the patched one."""
    import q_tuning.megatron_lm as adapter

    modules, native = _fake_megatron_training(monkeypatch, ["--enable-q-tuning"],
                                              layout="core_v0.19.0")
    adapter.install()
    assert not hasattr(modules["megatron.training.initialize"], "parse_args")
    out = capsys.readouterr().out
    assert "[Q-Tuning] patched megatron.training.arguments.parse_args: adds" in out
    args = modules["megatron.training.arguments"].parse_and_validate_args()
    assert args.enable_q_tuning and args.calculate_per_token_loss
    assert modules["megatron.training.training"].get_forward_backward_func() is not native


def test_without_the_flag_megatrons_objects_come_back(monkeypatch):
    import q_tuning.megatron_lm as adapter

    modules, native = _fake_megatron_training(monkeypatch, [])
    adapter.install()
    args = modules["megatron.training.initialize"].parse_args()
    assert not args.enable_q_tuning and not args.calculate_per_token_loss
    assert modules["megatron.training.training"].get_forward_backward_func() is native


@pytest.mark.parametrize("argv, words", [
    (["--q-tuning-batch-policy", "refill"], "use --q-tuning-batch-policy shrink"),
    (["--ddp-average-in-collective"], "drop --ddp-average-in-collective"),
])
def test_unsupported_configuration_is_a_start_up_error(monkeypatch, argv, words):
    """With --enable-q-tuning, a setting the adapter cannot honour stops parse_args (every rank
    parses) instead of warning and training without Q-Tuning; without the flag it is fine."""
    import q_tuning.megatron_lm as adapter
    from q_tuning.megatron_lm import UnsupportedConfiguration

    modules, _ = _fake_megatron_training(monkeypatch, ["--enable-q-tuning", *argv],
                                         extra_flags=["--ddp-average-in-collective"])
    adapter.install()
    parse_args = modules["megatron.training.initialize"].parse_args
    with pytest.raises(UnsupportedConfiguration,
                       match=f"--enable-q-tuning does not work .*{words}"):
        parse_args()
    modules, _ = _fake_megatron_training(monkeypatch, argv,
                                         extra_flags=["--ddp-average-in-collective"])
    adapter.install()
    assert not modules["megatron.training.initialize"].parse_args().enable_q_tuning


@pytest.mark.next_stack
@pytest.mark.parametrize("layout", ["core_v0.16.1", "core_v0.19.0"])
@pytest.mark.parametrize("symbol", ["megatron.training.training.get_forward_backward_func",
                                    "megatron.training.arguments.parse_args"])
def test_install_names_the_missing_symbol_and_versions(monkeypatch, layout, symbol):
    """A Megatron-LM without a hook point stops at install(), before anything is patched."""
    import q_tuning.megatron_lm as adapter

    modules, native = _fake_megatron_training(monkeypatch, [], drop=symbol, layout=layout)
    with pytest.raises(RuntimeError, match=re.escape(symbol) + r"; not found with megatron-core "
                       r"\S+ \(tested: Megatron-LM core_v0\.16\.1 .*core_v0\.19\.0"):
        adapter.install()
    assert not adapter.installed()
    if layout == "core_v0.16.1" and symbol.endswith("get_forward_backward_func"):
        assert not hasattr(modules["megatron.training.initialize"].parse_args, "__wrapped__")
    monkeypatch.setitem(sys.modules, "megatron.training", None)
    with pytest.raises(ImportError, match="not on PyPI"):
        adapter.install()


# --- one adapter step on megatron-core (CI) ------------------------------------------------------

# name: (world, tp, pp, vpp)
SPLITS = {"single": (1, 1, 1, None), "dp2": (2, 1, 1, None), "tp2": (2, 2, 1, None),
          "pp2": (2, 1, 2, None), "pp2_vpp2": (2, 1, 2, 2)}
MBS, NUM_MB = 2, 3


def _kept_masks(results: list[dict]) -> dict[int, list]:
    kept = {}
    for r in results:
        for i, mask in enumerate(r["masks"]):
            if r["keep"][r["offset"] + i]:
                kept[r["offset"] + i] = mask
    return kept


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("keep_ratio", [0.5, pytest.param(0.2, marks=pytest.mark.next_stack)])
def test_step_gradient_is_the_kept_token_mean(split, keep_ratio):
    world, tp, pp, vpp = SPLITS[split]
    results = run_distributed(H.step_worker, world, tp, pp, vpp, keep_ratio, MBS, NUM_MB,
                              timeout=TIMEOUT)
    dp = world // (tp * pp)
    total = dp * MBS * NUM_MB
    kept = _kept_masks(results)
    assert len(kept) == keep_count(keep_ratio, total)
    expected = math.ceil(max(1, math.ceil(len(kept) / dp)) / MBS)
    if vpp:
        expected = math.ceil(expected / pp) * pp
    for r in results:
        assert all(r["left"]), "the step must take exactly its own micro-batches"
        assert r["calls"] == [expected], "the schedule is told the true micro-batch count"
    texts = [row["text"] for row in H.step_rows(total)]
    (reference,) = run_distributed(W.reference_grads_worker, 1, {"tokens": texts}, kept,
                                   timeout=TIMEOUT)
    grads = results[0]["grads"]
    assert set(grads) == set(reference)
    for name, ref in reference.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6, msg=name)
    trained = sum(d["lm loss"][1] for r in results if r["tp_rank"] == 0 for d in r["losses"])
    assert trained == sum(sum(m[1:]) for m in kept.values())


def test_evaluation_passes_through_untouched():
    (r,) = run_distributed(H.step_worker, 1, 1, 1, None, 0.5, MBS, NUM_MB, True, timeout=TIMEOUT)
    assert r["calls"] == [NUM_MB] and all(r["left"])
    assert len(r["losses"]) == NUM_MB


def test_step_number_is_megatrons_iteration():
    """The pruner's step is Megatron's `curr_iteration + 1`, not a count of calls: a re-run of an
    iteration (the rerun state machine calls the function again) draws exactly as its first run,
    and a resumed run (a fresh process after --load) continues the numbering and the draws of an
    uninterrupted run. The random strategy draws from the step, so its keep masks show it."""
    runs = {"uninterrupted": [0, 1, 2, 2, 3], "resumed": [2, 3]}
    (r,) = run_distributed(H.iterations_worker, 1, runs,
                           {"q_tuning_strategy": "random", "q_tuning_sample_keep_ratio": 0.5},
                           timeout=TIMEOUT)
    steps = {name: [step for step, _ in calls] for name, calls in r.items()}
    assert steps == {"uninterrupted": [1, 2, 3, 3, 4], "resumed": [3, 4]}
    keeps = [keep for _, keep in r["uninterrupted"]]
    assert keeps[2] == keeps[3], "a re-run iteration must take the same decision"
    assert [keep for _, keep in r["resumed"]] == [keeps[2], keeps[4]]
    assert len({tuple(k) for k in keeps}) > 1, "the random draws do depend on the step"


@pytest.mark.parametrize("pp", [1, 2], ids=["single", "pp2"])
def test_learned_positions_of_seq_length_score_every_trained_target(pp):
    """Megatron-LM's default GPT positions (learned absolute, --max-position-embeddings =
    --seq-length) are pruned: the adapter's statistics are Megatron's own forward over its rows,
    the last target of each row (labels[s-1]) included, and its decision equals the plain
    QTuningPruner's on the same samples with a position table one row longer; the scoring
    pass's clamp is gone before the training forward."""
    results = run_distributed(H.learned_positions_worker, pp, pp, 0.5, timeout=TIMEOUT)
    r = results[0]
    adapter, plain = r["adapter"], r["plain"]
    assert adapter["step"] == 1 and all(x["hooks_left"] == 0 for x in results)
    assert adapter["keep"] == plain["keep"] and adapter["masks"] == plain["masks"]
    assert adapter["target_mask"] == plain["target_mask"]
    for key in ("nll", "entropy"):
        torch.testing.assert_close(torch.tensor(adapter[key]), torch.tensor(plain[key]),
                                   rtol=1e-6, atol=1e-6)
    targets = torch.tensor(adapter["target_mask"])
    masks = torch.tensor(r["loss_masks"])
    assert torch.equal(targets, masks > 0), "every trained target is scored"
    assert targets[:, H.STEP_SEQ].any(), "the rows' last targets are among them"
    if r["reference_nll"] is not None:
        reference = torch.tensor(r["reference_nll"], dtype=torch.float32)  # [rows, s] at t
        nll = torch.tensor(adapter["nll"])[:, 1:]  # target j = t + 1
        torch.testing.assert_close(nll[targets[:, 1:]], reference[targets[:, 1:]],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case, words", [
    ("labels", "ValueError: Q-Tuning step 1: cannot read this step's micro-batches "
               "(a training target is not the next input token"),
    ("no_iteration", "RuntimeError: [Q-Tuning] takes the step number from Megatron-LM's "
                     "args.curr_iteration"),
])
def test_a_step_that_cannot_be_pruned_is_an_error(case, words):
    """Unreadable micro-batches used to run the step unpruned with a warning."""
    (r,) = run_distributed(H.bad_call_worker, 1, case, timeout=TIMEOUT)
    assert r["error"] is not None and r["error"].startswith(words), r["error"]


# --- Megatron-LM's own pretrain_gpt.py (needs a checkout) ----------------------------------------

def _megatron_lm_checkout() -> Path | None:
    try:
        spec = importlib.util.find_spec("megatron.training")
    except ImportError:
        return None
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).resolve().parents[2]  # <checkout>/megatron/training/__init__.py
    return root if (root / "pretrain_gpt.py").is_file() else None


CHECKOUT = _megatron_lm_checkout()
needs_megatron_lm = pytest.mark.skipif(
    CHECKOUT is None,
    reason="Megatron-LM's megatron.training is not importable (Megatron-LM is not on PyPI); run "
           "`bash scripts/test_megatron_lm.sh /path/to/Megatron-LM` (tags core_v0.16.1, "
           "core_v0.19.0 or slime's pin)")

Q_TUNING = ["--enable-q-tuning", "--q-tuning-sample-keep-ratio", "0.5",
            "--q-tuning-token-keep-ratio", "0.7"]
RANDOM = Q_TUNING + ["--q-tuning-strategy", "random"]
IDENTITY = ["--enable-q-tuning", "--q-tuning-sample-keep-ratio", "1.0",
            "--q-tuning-token-keep-ratio", "1.0"]
TP2 = ["--tensor-model-parallel-size", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]
ITERS = 3


@pytest.fixture(scope="module")
def runs():
    """Each (nproc, flags, through q_tuning.megatron_lm, base flags, iterations) configuration is
    run once; `base` None: the tiny GPT with rope positions (H.TINY_GPT_FLAGS)."""
    H.build_dataset_helper(CHECKOUT)
    cache: dict = {}

    def run(nproc: int, flags: list[str], q_tuning: bool, base: list[str] | None = None,
            iters: int = ITERS) -> str:
        key = (nproc, tuple(flags), q_tuning, tuple(base or ()), iters)
        if key not in cache:
            out = H.run_pretrain_gpt(CHECKOUT, nproc, flags, q_tuning=q_tuning, train_iters=iters,
                                     base_flags=base or H.TINY_GPT_FLAGS)
            assert out.returncode == 0, out.stdout[-6000:]
            cache[key] = out.stdout
        return cache[key]

    return run


def _assert_same_losses(a: str, b: str, rtol: float = 0.0) -> None:
    la, lb = H.iteration_losses(a), H.iteration_losses(b)
    assert sorted(la) == list(range(1, ITERS + 1)) and la.keys() == lb.keys()
    for it in la:
        assert math.isclose(la[it], lb[it], rel_tol=rtol, abs_tol=0.0), (it, la[it], lb[it])


def _assert_pruned_run(out: str, total_samples: int, kept_samples: int) -> None:
    reports = H.q_tuning_reports(out)
    assert len(reports) == ITERS, "one quadrant report per training step"
    for quadrants, (kept, total) in reports:
        assert (kept, total) == (kept_samples, total_samples)
        assert sum(quadrants.values()) == total
    steps = H.q_tuning_steps(out)
    assert [n for n, _ in steps] == list(range(1, ITERS + 1)), "Megatron's iterations, 1-based"
    assert all(len(kept) == kept_samples for _, kept in steps)
    assert H.trained_tokens(out) == H.kept_tokens(out), "the step trains on the kept tokens only"
    losses = H.iteration_losses(out)
    assert len(losses) == ITERS and all(math.isfinite(v) for v in losses.values())


@needs_megatron_lm
@pytest.mark.slow
@pytest.mark.parametrize("nproc, flags", [(1, []), (2, TP2)], ids=["1proc", "tp2"])
def test_without_the_flag_the_run_is_plain_megatron_lm(runs, nproc, flags):
    plain = runs(nproc, flags, False)
    ours = runs(nproc, flags, True)
    assert "[Q-Tuning] Quadrant" not in ours and "patched megatron.training" in ours
    _assert_same_losses(plain, ours)


@needs_megatron_lm
@pytest.mark.slow
@pytest.mark.parametrize("nproc, flags", [(1, []), (2, []), (2, TP2), (2, PP2)],
                         ids=["1proc", "dp2", "tp2", "pp2"])
def test_q_tuning_prunes_every_step(runs, nproc, flags):
    out = runs(nproc, flags + Q_TUNING, True)
    _assert_pruned_run(out, total_samples=8, kept_samples=4)
    assert "turns on --calculate-per-token-loss" in out


@needs_megatron_lm
@pytest.mark.slow
def test_default_learned_positions_prune_every_step(runs):
    """Megatron-LM's default GPT positions (learned absolute, no --position-embedding-type flag)
    with --max-position-embeddings = --seq-length = 32, on 2 processes (DP=2): every step is
    pruned (it used to train without Q-Tuning after a warning)."""
    out = runs(2, Q_TUNING, True, base=H.LEARNED_POSITIONS_GPT_FLAGS)
    assert "--position-embedding-type" not in H.LEARNED_POSITIONS_GPT_FLAGS
    _assert_pruned_run(out, total_samples=8, kept_samples=4)
    assert "not supported" not in out and "WITHOUT Q-Tuning" not in out


@needs_megatron_lm
@pytest.mark.slow
def test_data_parallel_run_takes_the_same_decisions(runs):
    """The selection is global: DP=2 keeps the same samples, so the losses match 1 process."""
    single, dp2 = runs(1, Q_TUNING, True), runs(2, Q_TUNING, True)
    assert H.q_tuning_reports(single) == H.q_tuning_reports(dp2)
    _assert_same_losses(single, dp2, rtol=1e-5)


@needs_megatron_lm
@pytest.mark.slow
def test_keeping_everything_is_plain_per_token_loss_training(runs):
    """Keep ratios 1: the rebuilt batch is the original one, so the run is Megatron-LM's with
    --calculate-per-token-loss (which --enable-q-tuning turns on)."""
    ours = runs(1, IDENTITY, True)
    _assert_pruned_run(ours, total_samples=8, kept_samples=8)
    _assert_same_losses(runs(1, ["--calculate-per-token-loss"], False), ours, rtol=1e-6)


@needs_megatron_lm
@pytest.mark.slow
def test_unsupported_configuration_stops_the_run_at_start_up():
    """It used to be said once and the run trained WITHOUT Q-Tuning. Every rank parses the flags
    and raises (one rank's message may be cut short when torchrun stops the others)."""
    H.build_dataset_helper(CHECKOUT)
    out = H.run_pretrain_gpt(CHECKOUT, 2, Q_TUNING + ["--q-tuning-batch-policy", "refill"],
                             q_tuning=True)
    assert out.returncode != 0
    assert ("UnsupportedConfiguration: [Q-Tuning] --enable-q-tuning does not work with "
            "--q-tuning-batch-policy refill") in out.stdout
    assert "use --q-tuning-batch-policy shrink" in out.stdout
    assert not H.iteration_losses(out.stdout) and "[Q-Tuning] Quadrant" not in out.stdout


@needs_megatron_lm
@pytest.mark.slow
def test_a_rerun_step_replays_and_decides_the_same(runs):
    """Megatron's rerun state machine re-runs a step whose result fails validation (here an
    injected, non-fatal 'spiky loss'): it rewinds the RerunDataIterator, the adapter drains the
    same micro-batches again and, as its step is Megatron's iteration, takes the same decision
    (the random strategy draws from the step), and training continues as without the rerun."""
    rerun = runs(1, RANDOM + ["--no-check-for-nan-in-loss-and-grad", "--check-for-spiky-loss",
                              "--error-injection-rate", "1", "--error-injection-type",
                              "transient_error"], True)
    assert rerun.count("Need to rerun step to check reproducibility") == ITERS - 1
    # Iteration 1 is never validated; iterations 2 and 3 run twice each.
    steps = H.q_tuning_steps(rerun)
    assert [n for n, _ in steps] == [1, 2, 2, 3, 3]
    assert steps[1] == steps[2] and steps[3] == steps[4]
    assert H.trained_tokens(rerun) == H.kept_tokens(rerun)
    plain = runs(1, RANDOM, True)
    assert H.q_tuning_steps(plain) == [steps[0], steps[1], steps[3]]
    _assert_same_losses(plain, rerun)


@needs_megatron_lm
@pytest.mark.slow
def test_a_resumed_run_continues_megatrons_step_numbers(runs, tmp_path):
    """Save at iteration 2 of 4, then --load: the resumed run's steps are 3 and 4 (not 1 and 2),
    and its random draws, hence its iteration-3 loss, equal an uninterrupted run's. (Iteration 4's
    loss differs after a resume in plain Megatron-LM too, on this CPU setup.)"""
    save = ["--save", str(tmp_path), "--save-interval", "2", "--exit-interval", "2"]
    first = runs(1, RANDOM + save, True, iters=4)
    resumed = runs(1, RANDOM + ["--load", str(tmp_path)], True, iters=4)
    whole = runs(1, RANDOM, True, iters=4)
    steps = H.q_tuning_steps(whole)
    assert [n for n, _ in steps] == [1, 2, 3, 4]
    assert H.q_tuning_steps(first) == steps[:2]
    assert H.q_tuning_steps(resumed) == steps[2:]
    assert len({tuple(kept) for _, kept in steps}) > 1, "the draws depend on the step"
    resumed_loss, whole_loss = H.iteration_losses(resumed), H.iteration_losses(whole)
    assert sorted(resumed_loss) == [3, 4]
    assert math.isclose(resumed_loss[3], whole_loss[3], rel_tol=1e-6)
