"""q-tuning-train with --lora-rank, end to end on CPU (tiny random HF Llama, real megatron-core),
in one spawn of 2 processes (start-up dominates on 2 cores):

- DP=2, TP=2 and PP=2 LoRA runs with Q-Tuning give the same losses and Q-Tuning decisions (the
  same model function at every split), and the base weights stay as loaded;
- --bf16: trains, both exports in bf16;
- a checkpoint saved at DP=2 loads at TP=2 (adapters resharded): the same exports;
- resume: 4 steps straight == 2 steps, save, load, 2 steps (DP=2, distributed optimizer, refill):
  losses bitwise equal, merged and peft exports byte-identical; the checkpoint holds the adapters
  (and their optimizer state) but no base weight;
- a LoRA checkpoint with another rank, or onto another base (same shapes, other weights), is
  refused at --load, naming the difference.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from tests.harness.launch import run_distributed
from tests.workers.trainer import history_of, losses_of

pytest.importorskip("transformers")

TIMEOUT = 600
LORA = ["--lora-rank", "4", "--lora-alpha", "8"]
QT = ["--enable-q-tuning", "--q-tuning-sample-keep-ratio", "0.5",
      "--q-tuning-token-keep-ratio", "0.7"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.workers import trainer as W_trainer

    root = tmp_path_factory.mktemp("lora_trainer_assets")
    cache = tmp_path_factory.getbasetemp() / "q_tuning_cache"
    assets = W_trainer.make_assets(str(root), str(cache))
    assets["other_base"] = _other_base(pathlib.Path(assets["llama"]), root / "other_base")
    return assets


def _other_base(llama: pathlib.Path, folder: pathlib.Path) -> str:
    """The same architecture and shapes as `llama`, one weight changed (another base model)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(llama, folder)
    weights = load_file(llama / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 0.5
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


def _run(assets: dict, out: pathlib.Path, *extra: str, iters: int = 3,
         base: str = "llama") -> list[str]:
    return ["--hf-checkpoint", assets[base], "--data-path", assets["data"],
            "--global-batch-size", "8", "--micro-batch-size", "2", "--seq-length", "64",
            "--lr", "1e-2", "--lr-decay-style", "linear", "--seed", "7", "--output-dir",
            str(out), "--train-iters", str(iters), *LORA, *extra]


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    from tests.workers import trainer as W_trainer

    out = tmp_path_factory.mktemp("lora_runs")
    resume = [*QT, "--q-tuning-batch-policy", "refill", "--use-distributed-optimizer"]

    def exports(name):
        return ["--export-hf", str(out / name / "hf"), "--export-lora", str(out / name / "peft")]

    scenarios = [
        ("dp2", _run(assets, out / "dp2", *QT, *exports("dp2"))),
        ("tp2", _run(assets, out / "tp2", *QT, "--tensor-model-parallel-size", "2")),
        ("pp2", _run(assets, out / "pp2", *QT, "--pipeline-model-parallel-size", "2")),
        ("bf16", _run(assets, out / "bf16", *QT, "--bf16", *exports("bf16"))),
        # the DP=2 run's final checkpoint loaded at TP=2 (adapters and Adam state resharded)
        ("tp2_load", _run(assets, out / "tp2_load", *QT, "--tensor-model-parallel-size", "2",
                          "--load", str(out / "dp2" / "checkpoints"), *exports("tp2_load"))),
        ("full", _run(assets, out / "full", *resume, *exports("full"), iters=4)),
        ("first_half", _run(assets, out / "half", *resume, "--exit-interval", "2", iters=4)),
        ("second_half", _run(assets, out / "half", *resume, *exports("half"), "--load",
                             str(out / "half" / "checkpoints"), iters=4)),
        ("other_rank", _run(assets, out / "e1", *resume, "--lora-rank", "8", "--load",
                            str(out / "full" / "checkpoints"), iters=5)),
        ("other_base", _run(assets, out / "e2", *resume, "--load",
                            str(out / "full" / "checkpoints"), iters=5, base="other_base")),
    ]
    return out, run_distributed(W_trainer.run_many, 2, scenarios, timeout=TIMEOUT)[0]


@pytest.mark.parametrize("name", ["tp2", "pp2"])
def test_splits_reproduce_data_parallel(runs, name):
    _, results = runs
    dp, other = history_of(results, "dp2"), history_of(results, name)
    assert [h["q_tuning"]["quadrant_counts"] for h in other] == \
        [h["q_tuning"]["quadrant_counts"] for h in dp]
    np.testing.assert_allclose(losses_of(other), losses_of(dp), rtol=1e-4)
    assert losses_of(dp)[-1] < losses_of(dp)[0]  # the adapters learn


def test_merged_export_keeps_frozen_parts_and_moves_adapted_weights(runs, assets):
    from safetensors.torch import load_file

    out, results = runs
    history_of(results, "dp2")
    base = load_file(pathlib.Path(assets["llama"]) / "model.safetensors")
    merged = load_file(out / "dp2" / "hf" / "model.safetensors")
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name, tensor in base.items():
        moved = not bool((merged[name] == tensor).all())
        assert moved == any(f".{m}." in name for m in adapted), name
    config = json.loads((out / "dp2" / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert sorted(config["target_modules"]) == sorted(adapted)


def test_bf16_trains_and_exports_bf16(runs, assets):
    """--bf16: bf16 adapters (fp32 main weights in the optimizer), both exports in bf16; the
    merged export's frozen tensors are the base's, rounded to bf16."""
    import torch
    from safetensors.torch import load_file

    out, results = runs
    losses = losses_of(history_of(results, "bf16"))
    assert losses[-1] < losses[0]
    peft = load_file(out / "bf16" / "peft" / "adapter_model.safetensors")
    assert {t.dtype for t in peft.values()} == {torch.bfloat16} and len(peft) == 2 * 7 * 2
    base = load_file(pathlib.Path(assets["llama"]) / "model.safetensors")
    merged = load_file(out / "bf16" / "hf" / "model.safetensors")
    for name in ("model.norm.weight", "model.embed_tokens.weight",
                 "model.layers.1.input_layernorm.weight"):
        assert torch.equal(merged[name], base[name].to(torch.bfloat16)), name


def test_checkpoint_reshards_to_another_tensor_parallel_size(runs):
    """Loaded at TP=2 after the last iteration (nothing left to train), the DP=2 run's adapters
    export to the same peft file and the same merged model."""
    import torch
    from safetensors.torch import load_file

    out, results = runs
    assert history_of(results, "tp2_load") == []
    peft = [(out / d / "peft" / "adapter_model.safetensors").read_bytes()
            for d in ("dp2", "tp2_load")]
    assert peft[0] == peft[1]
    merged = [load_file(out / d / "hf" / "model.safetensors") for d in ("dp2", "tp2_load")]
    assert sorted(merged[0]) == sorted(merged[1])
    for name, tensor in merged[0].items():
        torch.testing.assert_close(merged[1][name], tensor, atol=1e-6, rtol=1e-6)


def test_resume_is_bitwise_identical(runs):
    out, results = runs
    full, first, second = (history_of(results, n) for n in ("full", "first_half", "second_half"))
    assert [h["iteration"] for h in first + second] == [1, 2, 3, 4]
    assert losses_of(first + second) == losses_of(full)
    for export in ("hf/model.safetensors", "peft/adapter_model.safetensors"):
        assert (out / "full" / export).read_bytes() == (out / "half" / export).read_bytes()


def test_checkpoint_holds_adapters_not_base(runs):
    from torch.distributed.checkpoint import FileSystemReader

    out, results = runs
    history_of(results, "full")
    keys = list(FileSystemReader(str(out / "full" / "checkpoints" / "iter_0000004"))
                .read_metadata().state_dict_metadata)
    adapters = [k for k in keys if ".adapter.linear_" in k and "optimizer" not in k]
    assert len(adapters) == 2 * 4 * 2  # A and B of 4 modules in 2 layers
    base = [k for k in keys if k.endswith(("linear_qkv.weight", "word_embeddings.weight",
                                           "linear_fc2.weight", "final_layernorm.weight"))]
    assert base == []
    assert any("optimizer" in k for k in keys)


@pytest.mark.parametrize("name, ranks, bases", [("other_rank", {4, 8}, 1),
                                                 ("other_base", {4}, 2)])
def test_other_rank_or_base_is_refused_at_load(runs, name, ranks, bases):
    """The error names the LoRA fingerprints of checkpoint and run: the ranks, and the base
    digests (different for another base)."""
    import re

    _, results = runs
    error = results[name]["error"]
    assert error is not None and "different model" in error, error
    assert {int(r) for r in re.findall(r"'rank': (\d+)", error)} == ranks, error
    assert len(set(re.findall(r"'base_weights': '(\w+)'", error))) == bases, error
