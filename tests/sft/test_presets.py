"""`--preset smollm2-gsm` outside the repository: its data generator (experiments/gsm/) is not in
the installed package, so the preset stops with an error that says so, on every rank, before any
collective; inside the repository it imports."""

from __future__ import annotations

import argparse
import sys

import pytest

from q_tuning.sft.train.presets import get_preset


def _args(tmp_path) -> argparse.Namespace:
    return argparse.Namespace(hf_checkpoint="model.gguf", export_hf=str(tmp_path / "hf"),
                              data_path=None, output_dir=str(tmp_path), seed=1)


def test_without_the_repository_the_preset_names_the_generator_and_the_way_out(tmp_path,
                                                                              monkeypatch):
    for name in [m for m in sys.modules if m == "experiments" or m.startswith("experiments.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "experiments", None)  # not importable
    with pytest.raises(FileNotFoundError, match=r"experiments/gsm/gsm_symbolic\.py.*--data-path"):
        get_preset("smollm2-gsm").prepare(_args(tmp_path))
    assert not (tmp_path / "data").exists()


def test_with_data_given_the_preset_needs_no_generator(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "experiments", None)
    args = _args(tmp_path)
    args.data_path = ["train.jsonl"]
    get_preset("smollm2-gsm").prepare(args)
    assert args.data_path == ["train.jsonl"]
