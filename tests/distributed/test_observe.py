"""q_tuning.observe (hook loading, built-in hooks, TensorBoard) and q-tuning-analyze.

The built-in hooks run inside real pruning steps at DP=2 and must record exactly the pruner's
global decision; the analysis CLI runs on a tiny random HF Llama (SmolLM2's tokenizer) and its
JSONL must agree with `select_samples` on its own statistics, and its statistics with a plain
transformers forward of the same model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np
import pytest
import torch

from q_tuning import QTuningConfig, select_samples
from q_tuning.observe import eu_plane_figure, load_hooks
from q_tuning.report import Thresholds
from q_tuning.observe.hooks import EUPlanePlot
from q_tuning.observe.plot import figure_to_rgb, save_png
from q_tuning.selection import keep_count
from tests.workers import observe as W
from tests.harness.launch import run_distributed

PIL = pytest.importorskip("PIL.Image")
TIMEOUT = 240
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROW_FIELDS = {"id", "source", "index", "ppl", "entropy", "quadrant", "quadrant_name", "kept",
              "selection_batch", "entry_level", "num_tokens", "response_tokens", "kept_tokens"}


def _valid_png(path) -> tuple[int, int]:
    with PIL.open(path) as image:
        image.verify()
    with PIL.open(path) as image:
        assert image.format == "PNG"
        return image.size


# --- load_hooks -----------------------------------------------------------------------------------

def test_load_hooks_resolves_functions_objects_and_classes(tmp_path, monkeypatch):
    (tmp_path / "my_hooks.py").write_text(
        "def fn(args, rollout_id, rollout_data):\n    pass\n"
        "class Hook:\n    def __call__(self, args, rollout_id, rollout_data):\n        pass\n"
        "instance = Hook()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn, colon, cls, inst, builtin = load_hooks(
        ["my_hooks.fn", "my_hooks:fn", "my_hooks.Hook", "my_hooks.instance",
         "q_tuning.observe.hooks.eu_plane_png"])
    assert fn is colon and fn.__name__ == "fn"
    assert type(cls).__name__ == "Hook" and cls.__qualname__ == "Hook"
    assert inst.__module__ == "my_hooks" and inst.__qualname__ == "instance"
    assert isinstance(builtin, EUPlanePlot) and builtin.__qualname__ == "eu_plane_png"
    assert load_hooks(None) == [] and load_hooks([]) == []


@pytest.mark.parametrize("path, message", [
    ("nosuchpkg.mod.fn", "'nosuchpkg.mod.fn': expected 'package.module.function'; no module "
                         "'nosuchpkg.mod' can be imported"),
    ("fn_only", "no module 'fn_only' can be imported"),
    ("bad_hooks.fnn", "'bad_hooks' has no attribute 'fnn'; did you mean 'fn'?"),
    ("bad_hooks.VALUE", "bad_hooks.VALUE is a int, not a callable"),
    ("bad_hooks.two_args", "called as hook(args, rollout_id, rollout_data), but its signature "
                           "is (a, b)"),
    ("broken_hooks.fn", "importing module 'broken_hooks' failed: ZeroDivisionError"),
    ("bad_hooks:", "an empty name part"),
])
def test_load_hooks_errors_name_the_path(tmp_path, monkeypatch, path, message):
    (tmp_path / "bad_hooks.py").write_text(
        "VALUE = 3\ndef fn(args, rollout_id, rollout_data):\n    pass\n"
        "def two_args(a, b):\n    pass\n")
    (tmp_path / "broken_hooks.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError) as err:
        load_hooks([path])
    assert str(err.value).startswith(f"--rollout-data-postprocess-path {path!r}: ")
    assert message in str(err.value)


def test_example_hooks_edit_masks_in_place_and_print(monkeypatch, capsys):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))
    cap, lengths = load_hooks(["custom_hook.cap_token_nll", "custom_hook.log_quadrant_lengths"])
    masks = [torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 1, 1])]
    data = {"tokens": [torch.arange(4)] * 3, "loss_masks": masks,
            "token_nlls": [torch.tensor([0.0, 1.0, 20.0, 2.0]), torch.tensor([0.0, 30.0, 1.0, 0.0]),
                           torch.tensor([0.0, 0.0, 25.0, 40.0])],
            "kept": [True, True, False], "quadrants": [2, 4, 1], "response_lengths": [3, 3, 2]}
    for hook in (cap, lengths):
        hook(None, 5, data)
    assert data["loss_masks"] is masks  # the same tensors, edited in place
    assert masks[0].tolist() == [0, 1, 0, 1] and masks[1].tolist() == [0, 0, 1, 0]
    assert masks[2].tolist() == [0, 0, 1, 1]  # dropped sample: untouched
    assert "[step 5] mean response length per quadrant: {'Q1': 2.0, 'Q2': 3.0, 'Q4': 3.0}" in \
        capsys.readouterr().out


# --- the figure -----------------------------------------------------------------------------------

def test_eu_plane_figure_is_a_valid_png_with_unplaceable_samples(tmp_path):
    g = torch.Generator().manual_seed(0)
    ppl = torch.exp(torch.randn(40, generator=g, dtype=torch.float64) + 2)
    ent = torch.rand(40, generator=g, dtype=torch.float64) * 3
    ppl[3] = float("nan")
    sel = select_samples(ppl, ent, 0.3)
    figure = eu_plane_figure(ppl, ent, sel.quadrant, sel.keep, thresholds=sel.thresholds,
                             level=sel.level, step=7, keep_ratio=0.3)
    assert "step 7" in figure.axes[0].get_title() and "keep ratio 0.3" in \
        figure.axes[0].get_title()
    width, height = _valid_png(save_png(figure, tmp_path / "sub" / "plane.png"))
    assert width > 400 and height > 300
    rgb = figure_to_rgb(figure)
    assert rgb.dtype == np.uint8 and rgb.shape[2] == 3 and rgb.std() > 0
    with pytest.raises(ValueError, match="equal length"):
        eu_plane_figure(ppl, ent[:5], sel.quadrant, sel.keep)


# --- one 2-process world: built-in hooks and TensorBoard in real pruning steps, q-tuning-analyze

def _random_tiny_llama(vocab: int):
    """Random weights scaled so that predictions are far from uniform (spread-out statistics)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.copy_(torch.randn_like(param) * 2.0 / math.sqrt(param.shape[1]))
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random HF Llama with SmolLM2's tokenizer, and 50 prompt/response records."""
    from q_tuning.sft.hf.assets import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = load_tokenizer()
    model = _random_tiny_llama(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rng = np.random.default_rng(0)
    words = ("the a cat dog sat on mat ran fast slow big small red blue one two three four five "
             "six seven + = 12 7 answer is").split()
    data = folder / "data.jsonl"
    with open(data, "w") as f:
        for i in range(50):
            prompt = " ".join(rng.choice(words, rng.integers(3, 12)))
            response = " ".join(rng.choice(words, rng.integers(2, 30)))
            record = {"prompt": prompt, "response": response}
            if i != 7:  # one record without an id: identified by file:line
                record["id"] = f"s{i}"
            f.write(json.dumps(record) + "\n")
    return folder, data, model, tokenizer


@pytest.fixture(scope="module")
def dist_run(tiny, tmp_path_factory):
    """One 2-process world: three pruning steps at DP=2 with the built-in hooks (plot every 2
    steps) and TensorBoard (image every 2 steps); then q-tuning-analyze at TP=2 (one selection
    batch), and at DP=2 with selection batches of 20."""
    folder, data, _, _ = tiny
    root = tmp_path_factory.mktemp("observe")
    common = ["--hf-checkpoint", str(folder), "--data-path", str(data), "--batch-size", "16",
              "--q-tuning-sample-keep-ratio", "0.4", "--q-tuning-token-keep-ratio", "0.6",
              "--device", "cpu"]
    argvs = [common + ["--output-dir", str(root / "tp2"), "--tensor-model-parallel-size", "2",
                       "--html-examples", "3"],
             common + ["--output-dir", str(root / "dp2"), "--selection-batch-size", "20",
                       "--html-examples", "1"]]
    ranks = run_distributed(W.observe_worker, 2, str(root / "observe"), str(root / "tb"), 2, 2,
                            argvs, timeout=TIMEOUT)
    return root, ranks


@pytest.fixture(scope="module")
def hook_run(dist_run):
    root, ranks = dist_run
    return root / "observe", root / "tb", [r["steps"] for r in ranks]


@pytest.fixture(scope="module")
def analysis(dist_run):
    root, ranks = dist_run
    assert ranks[0]["summaries"] == ranks[1]["summaries"]
    return root / "tp2", _rows(root / "tp2"), ranks[0]["summaries"][0]


def _rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def test_builtin_hooks_write_the_global_decision(hook_run):
    out, _, ranks = hook_run
    steps = ranks[0]
    timing = ("scoring_seconds", "seconds")
    for r in ranks:
        for s in r:
            s["report"] = {k: v for k, v in s["report"].items() if k not in timing}
    assert ranks[1] == steps  # one decision everywhere
    # every 2 steps and at the first call: steps 1 and 2, not 3
    assert sorted(p.name for p in out.glob("*.png")) == ["eu_plane_step_0000001.png",
                                                         "eu_plane_step_0000002.png"]
    for png in out.glob("*.png"):
        _valid_png(png)
    rows = [json.loads(line) for line in (out / "rollout_stats.jsonl").read_text().splitlines()]
    assert len(rows) == W.STEPS * W.BATCH  # one row per sample of the global batch, every step
    for step, s in enumerate(steps, start=1):
        mine = [r for r in rows if r["step"] == step]
        assert [r["index"] for r in mine] == list(range(W.BATCH))
        assert [r["uid"] for r in mine] == list(range(W.BATCH))
        assert [r["dp_rank"] for r in mine] == [0] * (W.BATCH // 2) + [1] * (W.BATCH // 2)
        assert [r["ppl"] for r in mine] == s["ppl"] and [r["entropy"] for r in mine] == s["ent"]
        assert [r["quadrant"] for r in mine] == s["quadrant"]
        assert [r["kept"] for r in mine] == s["keep"]
        assert sum(r["loss_tokens"] for r in mine if r["kept"]) == s["report"]["kept_tokens"]
        assert all(r["total_length"] >= r["response_length"] > 0 for r in mine)
        # the hooks' recomputed level and thresholds are the pruner's
        assert s["recomputed"] == (s["level"], s["thresholds"], s["keep"])


def test_tensorboard_scalars_and_images(hook_run):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    _, tb, ranks = hook_run
    acc = event_accumulator.EventAccumulator(str(tb), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    expected = {f"q_tuning/fraction/Q{q}" for q in range(1, 5)} | {
        "q_tuning/kept_samples", "q_tuning/kept_tokens", "q_tuning/level",
        "q_tuning/threshold/q4_ppl_ceiling", "q_tuning/threshold/q4_entropy_floor", "q_tuning/scoring_seconds"}
    assert expected <= set(tags["scalars"])
    kept = acc.Scalars("q_tuning/kept_samples")
    assert [e.step for e in kept] == [1, 2, 3]
    assert [e.value for e in kept] == [s["report"]["kept_samples"] for s in ranks[0]]
    level = acc.Scalars("q_tuning/level")
    assert [e.value for e in level] == pytest.approx([s["level"] for s in ranks[0]])
    fractions = [acc.Scalars(f"q_tuning/fraction/Q{q}")[0].value for q in range(1, 5)]
    assert sum(fractions) == pytest.approx(1.0)
    assert [e.step for e in acc.Images("q_tuning/eu_plane")] == [1, 2]  # image_every=2



def test_analyze_writes_four_outputs_agreeing_with_select_samples(analysis, tiny):
    out, rows, result = analysis
    assert result["scoring"]["tensor_model_parallel_size"] == 2
    assert len(rows) == 50 and all(set(r) == ROW_FIELDS for r in rows)
    assert rows[0]["id"] == "s0" and rows[7]["id"] == f"{tiny[1]}:8"
    ppl = torch.tensor([r["ppl"] for r in rows], dtype=torch.float64)
    ent = torch.tensor([r["entropy"] for r in rows], dtype=torch.float64)
    sel = select_samples(ppl, ent, 0.4, 10, rule=QTuningConfig().selection)
    assert [r["kept"] for r in rows] == sel.keep.tolist()
    assert [r["quadrant"] for r in rows] == sel.quadrant.tolist()
    assert sum(r["kept"] for r in rows) == 20
    for r in rows:
        expected = (keep_count(0.6, r["response_tokens"]) if r["quadrant"] == 2 else
                    r["response_tokens"]) if r["kept"] else 0
        assert r["kept_tokens"] == expected

    summary = json.loads((out / "summary.json").read_text())
    assert summary["quadrant_counts"] == sel.quadrant_counts()
    assert summary["level"] == sel.level
    assert summary["thresholds"] == dataclasses.asdict(Thresholds.from_quantiles(sel.thresholds))
    assert summary["kept_samples"] == 20 and summary["num_samples"] == 50
    assert summary["kept_tokens"] == sum(r["kept_tokens"] for r in rows)
    _valid_png(out / "eu_plane.png")

    page = (out / "report.html").read_text()
    cards = re.findall(r'<div class="card">.*?</div></div>', page, flags=re.S)
    q2 = [c for c in cards if ">Q2</span>" in c]
    assert len(q2) == 3 and len(cards) == 3 * 4
    for card in q2:  # every struck-through token is one the decision prunes
        index = int(re.search(r"sample (\d+) ·", card).group(1))
        pruned = rows[index]["response_tokens"] - rows[index]["kept_tokens"]
        assert f"({pruned} pruned)" in card and card.count('<del class="pruned"') == pruned
    assert '<img src="eu_plane.png"' in page


def test_analyze_statistics_match_a_transformers_forward(analysis, tiny):
    """PPL / entropy of each sample from HF's own forward of the same weights (fp32)."""
    from q_tuning.sft.data.dataset import load_sft_samples

    _, rows, _ = analysis
    _, data, model, tokenizer = tiny  # the CLI scored at TP=2; the reference is unsplit
    samples, _ = load_sft_samples([data], tokenizer, 2048)
    for sample, row in zip(samples[:12], rows[:12]):
        with torch.no_grad():
            logits = model(sample.tokens[None]).logits[0, :-1].double()  # [T-1, V]
        logp = torch.log_softmax(logits, dim=-1)
        targets = sample.loss_mask[1:].bool()
        nll = -logp.gather(1, sample.tokens[1:, None])[:, 0]
        ent = -(logp.exp() * logp).sum(-1)
        assert row["ppl"] == pytest.approx(math.exp(float(nll[targets].mean())), rel=1e-4)
        assert row["entropy"] == pytest.approx(float(ent[targets].mean()), rel=1e-4)


def test_analyze_at_dp2_in_selection_batches(analysis, dist_run):
    """DP=2 gives the TP=2 statistics; selection batches of 20 are `select_samples` on each
    consecutive slice of the JSONL's own statistics."""
    root, _ = dist_run
    _, tp2, _ = analysis
    rows = _rows(root / "dp2")
    assert [r["id"] for r in rows] == [r["id"] for r in tp2]
    np.testing.assert_allclose([r["ppl"] for r in rows], [r["ppl"] for r in tp2], rtol=1e-5)
    np.testing.assert_allclose([r["entropy"] for r in rows], [r["entropy"] for r in tp2],
                               rtol=1e-5)
    summary = json.loads((root / "dp2" / "summary.json").read_text())
    assert summary["scoring"]["data_parallel_size"] == 2
    assert [b["size"] for b in summary["batches"]] == [20, 20, 10] and "thresholds" not in summary
    ppl = torch.tensor([r["ppl"] for r in rows], dtype=torch.float64)
    ent = torch.tensor([r["entropy"] for r in rows], dtype=torch.float64)
    for b, start in enumerate((0, 20, 40)):
        part = slice(start, start + summary["batches"][b]["size"])
        sel = select_samples(ppl[part], ent[part], 0.4, 10, rule=QTuningConfig().selection)
        assert [r["kept"] for r in rows[part]] == sel.keep.tolist()
        assert [r["quadrant"] for r in rows[part]] == sel.quadrant.tolist()
        assert {r["selection_batch"] for r in rows[part]} == {b}
        assert summary["batches"][b]["thresholds"]["q2_ppl_floor"] == sel.thresholds[1]
    for name in ("eu_plane.png", "report.html"):
        assert (root / "dp2" / name).is_file()


def test_select_in_batches_drops_unplaceable_samples_and_batches():
    from q_tuning.sft.analyze.statistics import select_in_batches

    ppl = torch.exp(torch.linspace(0, 3, 12, dtype=torch.float64))
    ent = torch.linspace(2, 0, 12, dtype=torch.float64).roll(5)
    ppl[1] = float("nan")
    ppl[8:] = float("nan")  # the last batch of 4 has nothing to place
    decision, batches = select_in_batches(ppl, ent, QTuningConfig(sample_keep_ratio=0.5), 4)
    assert int(decision["quadrant"][1]) == 0 and not bool(decision["keep"][1])
    assert batches[0]["unplaceable_samples"] == 1 and batches[0]["kept_samples"] == 2
    assert "no sample of the batch can be placed" in batches[2]["error"]
    assert not bool(decision["keep"][8:].any()) and batches[2]["kept_samples"] == 0


def test_analyze_needs_a_model_source():
    from q_tuning.sft.analyze.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--data-path", "x.jsonl"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--data-path", "x.jsonl", "--hf-checkpoint", "a",
                                   "--load", "b"])


def test_loss_tokens_count_weighted_tokens_once():
    """Regression: InfoBatch's loss weights (mask values 2.0) were summed into loss_tokens."""
    from q_tuning.observe.hooks import gather_rollout_stats

    masks = [torch.tensor([0.0, 2.0, 2.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 1.0])]
    stats = gather_rollout_stats({"tokens": [torch.arange(4), torch.arange(4)],
                                  "loss_masks": masks})
    assert stats["loss_tokens"] == [2, 3]


def test_eu_plane_hook_plots_a_baseline_without_warning(tmp_path, caplog):
    """Regression: every plotted step of a baseline warned "edited by an earlier hook?"."""
    from q_tuning.observe.hooks import EUPlanePlot

    ppl = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    data = {"tokens": [torch.arange(6)] * 8, "loss_masks": [torch.tensor([0, 0, 1, 1, 1, 1])] * 8,
            "sample_ppls": ppl, "sample_entropies": [0.5 * p for p in ppl],
            "quadrants": [3, 3, 3, 3, 1, 1, 1, 1], "kept": [False] * 4 + [True] * 4}
    with caplog.at_level("WARNING"):
        EUPlanePlot(out_dir=tmp_path)(QTuningConfig(strategy="ppl_high"), 1, data)
    assert not caplog.records
    assert (tmp_path / "eu_plane_step_0000001.png").is_file()


def test_eu_plane_axis_labels_are_plain_numbers():

    ppl = torch.tensor([1.5, 2.0, 3.0, 6.0, 9.0], dtype=torch.float64)
    figure = eu_plane_figure(ppl, torch.ones(5), torch.tensor([2, 4, 1, 3, 2]),
                             torch.tensor([True, True, False, False, True]))
    figure.canvas.draw()
    labels = [t.get_text() for t in figure.axes[0].get_xticklabels() if t.get_text()]
    assert labels and all(re.fullmatch(r"\d+(\.\d+)?", text) for text in labels), labels
