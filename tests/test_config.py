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
    assert cfg == QTuningConfig(enabled=True, sample_keep_ratio=0.25, token_keep_ratio=1.0,
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
