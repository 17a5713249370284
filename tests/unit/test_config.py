import argparse

import pytest

from q_tuning import QTuningConfig, add_q_tuning_args


def parse(*argv):
    return add_q_tuning_args(argparse.ArgumentParser()).parse_args(list(argv))


def test_defaults_match_spec():
    args = parse()
    assert not args.enable_q_tuning
    assert (args.q_tuning_sample_keep_ratio, args.q_tuning_token_keep_ratio,
            args.q_tuning_neighbor_lambda, args.q_tuning_bisect_max_iter) == (0.5, 0.7, 0.5, 10)
    assert args.q_tuning_batch_policy == "shrink"


def test_flags_fill_the_config():
    args = parse("--enable-q-tuning", "--q-tuning-sample-keep-ratio", "0.25",
                 "--q-tuning-token-keep-ratio", "1", "--q-tuning-neighbor-lambda", "0",
                 "--q-tuning-bisect-max-iter", "3", "--q-tuning-batch-policy", "refill")
    cfg = QTuningConfig.from_args(args)
    assert cfg == QTuningConfig(sample_keep_ratio=0.25, token_keep_ratio=1.0,
                                neighbor_lambda=0.0, bisect_max_iter=3, batch_policy="refill")


@pytest.mark.parametrize("flag,value,interval", [
    ("--q-tuning-sample-keep-ratio", "0", "(0, 1]"),
    ("--q-tuning-sample-keep-ratio", "1.5", "(0, 1]"),
    ("--q-tuning-token-keep-ratio", "-0.1", "(0, 1]"),
    ("--q-tuning-neighbor-lambda", "1.01", "[0, 1]"),
    ("--q-tuning-bisect-max-iter", "0", ">= 1"),
    ("--q-tuning-sample-keep-ratio", "abc", "number"),
])
def test_out_of_range_rejected_at_parse_time_naming_the_flag(flag, value, interval, capsys):
    with pytest.raises(SystemExit):
        parse(flag, value)
    err = capsys.readouterr().err
    assert flag in err and interval in err


def test_config_validation_names_the_flag():
    with pytest.raises(ValueError, match="--q-tuning-neighbor-lambda must be in"):
        QTuningConfig(neighbor_lambda=2.0)
    with pytest.raises(ValueError, match="--q-tuning-batch-policy"):
        QTuningConfig(batch_policy="grow")
    with pytest.raises(ValueError, match="--q-tuning-bisect-max-iter"):
        QTuningConfig(bisect_max_iter=0)


def test_usable_as_megatron_extra_args_provider():
    parser = argparse.ArgumentParser()
    assert add_q_tuning_args(parser) is parser
    assert any(g.title == "q-tuning" for g in parser._action_groups)


def test_one_table_defines_fields_flags_and_checks():
    import dataclasses

    from q_tuning.config import SETTINGS, STRATEGY_NAMES
    from q_tuning.strategies import STRATEGIES

    assert [s.field for s in SETTINGS] == [f.name for f in dataclasses.fields(QTuningConfig)]
    flags = {a.option_strings[0] for a in add_q_tuning_args(argparse.ArgumentParser())._actions
             if a.option_strings and a.option_strings[0].startswith("--q-tuning-")}
    assert flags == {s.flag for s in SETTINGS}
    assert STRATEGY_NAMES == STRATEGIES


@pytest.mark.parametrize("flag,value,message", [
    ("--q-tuning-infobatch-prune-ratio", "1", "[0, 1)"),   # regression: accepted until the pruner
    ("--q-tuning-strategy", "nonsense", "module.path.function"),
    ("--q-tuning-strategy", "no_such_module.fn", "cannot import"),
    ("--q-tuning-strategy", "json.nonexistent", "cannot import"),
    ("--q-tuning-selection", "official", "paper"),
])
def test_bad_values_fail_at_parse_time(flag, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(flag, value)
    err = capsys.readouterr().err
    assert e.value.code == 2 and flag in err and message in err
    with pytest.raises(ValueError, match=flag):
        QTuningConfig(**{flag[len("--q-tuning-"):].replace("-", "_"):
                         float(value) if value[0].isdigit() else value})


def test_user_strategy_that_imports_is_accepted():
    assert parse("--q-tuning-strategy", "examples.custom_strategy.q2_only").q_tuning_strategy \
        == "examples.custom_strategy.q2_only"


@pytest.mark.parametrize("module,extra,flag", [
    ("q_tuning.sft.train", ["--q-tuning-strategy", "nonsense"], "--q-tuning-strategy"),
    ("q_tuning.sft.train", ["--q-tuning-sample-keep-ratio", "1.5"], "--q-tuning-sample-keep-ratio"),
    ("q_tuning.sft.train", ["--q-tuning-infobatch-prune-ratio", "1"],
     "--q-tuning-infobatch-prune-ratio"),
    ("q_tuning.sft.train", ["--sequence-parallel"], "--sequence-parallel"),
    ("q_tuning.sft.analyze.cli", ["--q-tuning-strategy", "random"], "--q-tuning-strategy"),
    ("q_tuning.sft.analyze.cli", ["--q-tuning-scoring-micro-batch-size", "4"],
     "--q-tuning-scoring-micro-batch-size"),
])
def test_entry_points_reject_bad_settings_before_anything_loads(module, extra, flag):
    """Exit status 2 naming the flag, from argument parsing: the paths given do not even exist,
    so an error after anything loaded would name them instead."""
    import subprocess
    import sys

    common = ["--hf-checkpoint", "/nonexistent/model", "--data-path", "/nonexistent/data.jsonl"]
    if module == "q_tuning.sft.train":
        common += ["--global-batch-size", "8", "--train-iters", "1", "--enable-q-tuning"]
    proc = subprocess.run([sys.executable, "-m", module, *common, *extra], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], proc.stderr[-2000:]  # no usage block above it
    assert "nonexistent" not in proc.stderr, proc.stderr[-2000:]
