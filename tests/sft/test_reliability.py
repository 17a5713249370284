"""It survives: preemption, killed and stopped ranks, interrupted and failed saves, bad data and
non-finite numbers (docs/user_guide.md, "Failures and recovery"). CPU, gloo, a tiny random HF
Llama (tests/workers/trainer.py), 2 processes wherever the case is distributed.

Real jobs (torchrun, the Ray launcher) for what happens to processes: SIGTERM to every worker
(`--exit-signal-handler`), SIGKILL of every worker in the middle of a save, SIGKILL and SIGSTOP of
one worker; the resumed job is compared with the uninterrupted run of the in-process spawn.
`tests.workers.reliability.pause_hook` holds the workers at a known iteration while the test
signals them. Every job runs under a deadline and is killed (its own process group) when the
test ends, so a hang fails the test instead of blocking it.

One spawn of 2 gloo processes (`tests.harness.launch.run_distributed`) for the faults injected
in-process: a disk that fills up on one rank during a save, NaN loss and gradients on one rank,
NaN scoring statistics, --exit-duration-in-mins, bad data, a rank that cannot read its data or
write into --save.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.harness.launch import run_distributed

pytest.importorskip("transformers")

REPO = pathlib.Path(__file__).resolve().parents[2]
ITERS = 4
G = 8
JOB_TIMEOUT = 240  # seconds for one 2-process job of a few tiny iterations on 2 loaded cores
QT = ["--enable-q-tuning", "--q-tuning-sample-keep-ratio", "0.5",
      "--q-tuning-token-keep-ratio", "0.7"]
PAUSE = ["--rollout-data-postprocess-path", "tests.workers.reliability.pause_hook"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.workers import trainer as W_trainer

    root = tmp_path_factory.mktemp("reliability_assets")
    cache = tmp_path_factory.getbasetemp() / "q_tuning_cache"  # shared with the other tests
    found = W_trainer.make_assets(str(root), str(cache))
    good = [json.dumps({"prompt": f"What is {i} plus {i + 1}?",
                        "response": f"{i} plus {i + 1} is {2 * i + 1}."}) for i in range(12)]
    no_answer = json.dumps({"messages": [{"role": "user", "content": "no answer here"}]})
    too_long = json.dumps({"prompt": "count with me: " + "one two three " * 40,
                           "response": "done"})  # the response starts after --seq-length 64
    truncated = json.dumps({"prompt": "Say yes.", "response": "yes " * 80})  # cut, kept
    files = {
        # lines 3, 5: no assistant turn; 7: empty after truncation; 9: truncated (kept)
        "skippable": good[:2] + [no_answer] + good[2:3] + [no_answer] + good[3:4] + [too_long]
        + good[4:5] + [truncated] + good[5:],
        "malformed": good[:2] + ['{"prompt": "a", "response": '] + good[2:],
        "unknown_role": good[:3] + [json.dumps({"messages": [
            {"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]})] + good[3:],
    }
    for name, lines in files.items():
        (root / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines))
        found[name] = str(root / f"{name}.jsonl")
    (root / "not_utf8.jsonl").write_bytes(
        "".join(line + "\n" for line in good[:4]).encode()
        + b'{"prompt": "caf\xe9?", "response": "yes"}\n')
    found["not_utf8"] = str(root / "not_utf8.jsonl")
    return found


def _argv(assets: dict, out: pathlib.Path, *extra: str, iters: int = ITERS,
          data: str | None = None) -> list[str]:
    return ["--hf-checkpoint", assets["llama"], "--data-path", data or assets["data"],
            "--global-batch-size", str(G), "--micro-batch-size", "2", "--seq-length", "64",
            "--lr", "1e-3", "--lr-decay-style", "linear", "--seed", "7", "--device", "cpu",
            "--output-dir", str(out), "--train-iters", str(iters),
            "--distributed-timeout-minutes", "3", *extra]


def _env() -> dict:
    return {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _metrics(out: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _tracker(out: pathlib.Path) -> str:
    return (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip()


def _same_steps(got: list[dict], want: list[dict]) -> None:
    """Bitwise: the same Q-Tuning decisions, losses and learning rates."""
    assert [m["iteration"] for m in got] == [m["iteration"] for m in want]
    assert [m["loss"] for m in got] == [m["loss"] for m in want]
    assert [m["lr"] for m in got] == [m["lr"] for m in want]
    assert [m["q_tuning"] and m["q_tuning"]["quadrant_counts"] for m in got] == \
        [m["q_tuning"] and m["q_tuning"]["quadrant_counts"] for m in want]


# --- faults injected in-process (one spawn of 2 processes) ---------------------------------------

@pytest.fixture(scope="module")
def double(assets, tmp_path_factory):
    from tests.workers import reliability as W_reliability

    out = tmp_path_factory.mktemp("inprocess")
    # the distributed optimizer: rank 1 writes its own shard files (else rank 0 writes all)
    full = _argv(assets, out / "full", *QT, "--save-interval", "2", "--use-distributed-optimizer")
    enospc = _argv(assets, out / "enospc", *QT, "--save-interval", "2",
                   "--use-distributed-optimizer")
    watch = {"watch_model_load": True}
    scenarios = [
        ("full", full, {}),
        ("enospc", enospc, {"enospc_on_rank": (1, 4)}),
        ("enospc_resume", _argv(assets, out / "enospc_resume", *QT, "--save-interval", "2",
                                "--use-distributed-optimizer",
                                "--load", str(out / "enospc" / "checkpoints")), {}),
        ("nan_grad", _argv(assets, out / "nan_grad", iters=3), {"nan_grad_on_rank": (0, 2)}),
        ("nan_score", _argv(assets, out / "nan_score", *QT, iters=3),
         {"nan_score_on_rank": (1, 2)}),
        ("duration", _argv(assets, out / "duration", "--exit-duration-in-mins", "0.0001",
                           "--export-hf", str(out / "duration" / "hf")), {}),
        ("skippable", _argv(assets, out / "skippable", iters=1, data=assets["skippable"]), {}),
        ("strict", _argv(assets, out / "strict", "--strict-data", iters=1,
                         data=assets["skippable"]), watch),
        ("malformed", _argv(assets, out / "malformed", data=assets["malformed"]), watch),
        ("not_utf8", _argv(assets, out / "not_utf8", data=assets["not_utf8"]), watch),
        # a record that breaks its format is a counted skip, an error under --strict-data
        ("unknown_role", _argv(assets, out / "unknown_role", "--strict-data",
                               data=assets["unknown_role"]), watch),
        ("rank1_data", _argv(assets, out / "rank1_data"), {"data_error_on_rank": 1, **watch}),
        ("rank1_save", _argv(assets, out / "rank1_save"),
         {"unwritable_save_on_rank": 1, **watch}),
    ]
    return out, run_distributed(W_reliability.run_scenarios, 2, scenarios, timeout=600)


def _ok(results: list[dict], name: str) -> list[dict]:
    for rank, result in enumerate(results):
        assert result[name]["error"] is None, f"{name}, rank {rank}: {result[name]['error']}"
    return results[0][name]["history"]


def _error(results: list[dict], name: str) -> str:
    """The error of scenario `name`, the same on both ranks (neither hung nor went on)."""
    errors = [result[name]["error"] for result in results]
    assert errors[0] is not None and errors[0] == errors[1], errors
    return errors[0]


def test_disk_full_on_one_rank_mid_save(double):
    """ENOSPC on rank 1 while it writes its shard of checkpoint 4 (megatron's writer processes):
    both ranks stop with the same error naming the incomplete folder (removed) and the intact
    checkpoint 2; --load of it then trains 3 and 4 exactly as the uninterrupted run."""
    out, results = double
    error = _error(results, "enospc")
    ckpt = out / "enospc" / "checkpoints"
    assert error.startswith("CheckpointSaveError: the checkpoint of iteration 4 could not be "
                            "written (")
    assert "No space left on device" in error
    assert f"the incomplete {ckpt / '.iter_0000004.tmp'} is not a checkpoint and was removed" \
        in error
    assert f"the latest complete checkpoint is {ckpt / 'iter_0000002'}, intact" in error
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000002",
                                                     "latest_checkpointed_iteration.txt"]
    resumed = _ok(results, "enospc_resume")
    _same_steps(resumed, _ok(results, "full")[2:])


def test_nan_loss_and_gradients_on_one_rank_skip_the_step_everywhere(double):
    """NaN loss and gradients on rank 0 at iteration 2 (--check-for-nan-in-loss-and-grad, on
    by default): both ranks skip that optimizer step (weights and LR schedule unchanged, the
    replicas stay equal), say so, and train on."""
    out, results = double
    history = _ok(results, "nan_grad")
    assert [m["skipped_iterations"] for m in history] == [0, 1, 0]
    assert math.isnan(history[1]["loss"]) and history[1]["grad_norm"] is None
    assert all(np.isfinite(m["loss"]) for i, m in enumerate(history) if i != 1)
    assert history[2]["lr"] == history[1]["lr"]  # the schedule did not advance at iteration 2
    sums = [result["nan_grad"]["record"]["checksums"] for result in results]
    assert sums[0] == sums[1]  # both ranks' weights before each of the 3 steps
    assert sums[0][2] == sums[0][1] != sums[0][0]  # step 2 left the weights as step 1 did
    assert history[1]["trained_samples"] == history[0]["trained_samples"]
    log = (out / "nan_grad" / "train.log").read_text()
    assert ("iteration 2: non-finite loss and gradients (global loss sum nan over" in log
            and "optimizer step skipped on every rank" in log)


def test_nan_scoring_statistics_place_the_sample_nowhere(double):
    """A NaN in one sample's token statistics (rank 1, step 2): the sample is unplaceable,
    counted in the report, and the step trains the others."""
    out, results = double
    history = _ok(results, "nan_score")
    report = history[1]["q_tuning"]
    assert report["total_samples"] == G and report["unplaceable_samples"] == 1
    assert report["kept_samples"] == 4 and sum(report["quadrant_counts"].values()) == G - 1
    assert [m["q_tuning"]["unplaceable_samples"] for m in history] == [0, 1, 0]
    assert all(np.isfinite(m["loss"]) for m in history)
    assert "1 unplaceable" in (out / "nan_score" / "train.log").read_text()


def test_exit_duration_in_mins_saves_and_stops(double):
    """--exit-duration-in-mins: the ranks agree the time is up after iteration 1, save it, stop
    normally, and do not export an unfinished model."""
    out, results = double
    history = _ok(results, "duration")
    assert [m["iteration"] for m in history] == [1]
    assert _tracker(out / "duration") == "1"
    assert not (out / "duration" / "hf").exists()
    log = (out / "duration" / "train.log").read_text()
    assert "--exit-duration-in-mins 0.0001 reached" in log and "not exported" in log


def test_skipped_records_are_counted_with_file_and_line(assets, double):
    """No assistant turn (lines 3, 5) and empty after truncation (line 7) are skipped, a long
    record is truncated (line 9); the start-up summary counts them and names file:line."""
    out, results = double
    _ok(results, "skippable")
    data = assets["skippable"]
    log = (out / "skippable" / "train.log").read_text()
    assert f"2 skipped (no assistant turn) [{data}:3, {data}:5]" in log
    assert f"1 truncated to --seq-length 64 [{data}:9]" in log
    assert f"1 skipped (no assistant token within --seq-length 64) [{data}:7]" in log


@pytest.mark.parametrize("name, message", [
    ("strict", "skippable.jsonl:3: no assistant turn (--strict-data: 3 record(s) would be "
               "skipped: {data}:3 (no assistant turn); {data}:5 (no assistant turn); {data}:7 "
               "(no assistant token within --seq-length 64))"),
    ("malformed", "malformed.jsonl:3: malformed JSON"),
    ("not_utf8", "not_utf8.jsonl:5: not UTF-8"),
    ("unknown_role", "unknown_role.jsonl:4: messages[1] has unknown role 'bot'"),
    ("rank1_data", "rank 1: /data/shard.jsonl:7: injected read failure"),
    ("rank1_save", "rank 1: cannot write checkpoints there (OSError: [Errno 30] Read-only"),
])
def test_bad_input_stops_every_rank_before_the_model_loads(assets, double, name, message):
    """Rejected data (file:line), --strict-data, and a failure on one rank only (its data, its
    --save folder): the same error on both ranks, before any weight is loaded."""
    _, results = double
    error = _error(results, name)
    assert message.format(data=assets["skippable"]) in error, error
    assert error.startswith("ValueError: ") or error.startswith("DataError: ")
    assert not any(result[name]["record"].get("weights_loaded") for result in results)


# --- real jobs -----------------------------------------------------------------------------------

class Job:
    """A 2-worker job in its own process group; its output goes to <out>.job.log."""

    def __init__(self, argv: list[str], out: pathlib.Path, *, launcher: str = "torchrun",
                 module: str = "q_tuning.sft.train", torchrun_flags: tuple | list = ()):
        from q_tuning.parallel.process_group import free_port

        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.log_path = out.parent / f"{out.name}.job.log"
        if launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                   "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                   *torchrun_flags, "-m", module, *argv]
        else:  # the Ray launcher, a local CPU cluster
            cmd = [sys.executable, "-m", "q_tuning.sft.train.ray_launcher", "--ray-num-cpus", "2",
                   "--actor-num-nodes", "1", "--actor-num-gpus-per-node", "2", *argv]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=_env(),
                                     cwd=REPO, start_new_session=True)
        self.worker_pids: list[int] = []

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_paused(self, timeout: float = JOB_TIMEOUT) -> list[int]:
        """The pids of rank 0 and 1, once both wait in `pause_hook`."""
        deadline = time.monotonic() + timeout
        markers = [self.out / f"paused.rank{r}" for r in (0, 1)]
        while not all(m.exists() for m in markers):
            if self.proc.poll() is not None:
                pytest.fail(f"the job ended ({self.proc.returncode}) before pausing:\n"
                            + self.output()[-4000:])
            if time.monotonic() > deadline:
                pytest.fail("the workers did not reach the pause:\n" + self.output()[-4000:])
            time.sleep(0.1)
        self.worker_pids = [int(m.read_text()) for m in markers]
        return self.worker_pids

    def go(self) -> None:
        (self.out / "go").write_text("")

    def wait(self, timeout: float = JOB_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job did not end within {timeout:.0f} s:\n" + self.output()[-4000:])

    def close(self) -> None:
        """Kill what is left of this job (its process group, and the paused workers by pid)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in self.worker_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.log.close()


@pytest.fixture
def jobs():
    started: list[Job] = []

    def start(*args, **kwargs) -> Job:
        started.append(Job(*args, **kwargs))
        return started[-1]

    yield start
    for job in started:
        job.close()


def _run_job(start, argv, out, **kwargs) -> Job:
    job = start(argv, out, **kwargs)
    rc = job.wait()
    assert rc == 0, job.output()[-4000:]
    return job


@pytest.fixture(scope="module")
def reference(double):
    """The uninterrupted run: 4 iterations, Q-Tuning, distributed optimizer, a checkpoint every
    2 (2 gloo processes, in the `double` spawn; a torchrun job computes bitwise the same)."""
    history = _ok(double[1], "full")
    assert [m["iteration"] for m in history] == [1, 2, 3, 4]
    return history


@pytest.mark.slow
def test_preempted_then_killed_in_save_resumes_bitwise(assets, reference, jobs, tmp_path):
    """One job's life under torchrun, ending equal to the uninterrupted run:

    1. --exit-signal-handler: SIGTERM to both workers during iteration 3; they agree to stop
       after it, save iteration 3 and exit 0 (torchrun too);
    2. --load: iteration 4 is trained, but every worker is SIGKILLed after writing checkpoint 4's
       files, before the rename and the tracker: the tracker still names 3;
    3. --load again: the partial folder is reported and never read, the job resumes from 3 and
       trains iteration 4 exactly as the uninterrupted run (same Q-Tuning decisions, losses,
       learning rates); metrics.jsonl holds iterations 1-4 of the three runs.
    """
    out = tmp_path / "job"
    ckpt = out / "checkpoints"
    out.mkdir()
    argv = _argv(assets, out, *QT, *PAUSE, "--save-interval", "2", "--use-distributed-optimizer",
                 "--exit-signal-handler")

    (out / "pause_at").write_text("3")
    job = jobs(argv, out)
    for pid in job.wait_paused():
        os.kill(pid, signal.SIGTERM)
    job.go()
    assert job.wait() == 0, job.output()[-4000:]
    log = (out / "train.log").read_text()
    assert "received SIGTERM (--exit-signal-handler): stopping after iteration 3 of 4" in log
    assert _tracker(out) == "3" and (ckpt / "iter_0000003" / "metadata.json").is_file()
    _same_steps(_metrics(out), reference[:3])
    (out / "pause_at").unlink()

    (out / "kill_in_save_at").write_text("4")
    job = jobs(argv + ["--load", str(ckpt)], out, module="tests.workers.reliability")
    assert job.wait() != 0
    partial = ckpt / ".iter_0000004.tmp"
    assert _tracker(out) == "3"
    assert (partial / "metadata.json").is_file()  # it even looks complete: only its name says not
    (out / "kill_in_save_at").unlink()

    _run_job(jobs, argv + ["--load", str(ckpt)], out)
    log = (out / "train.log").read_text()
    assert f"ignoring {partial}: a save that did not finish" in log
    assert f"resumed from {ckpt / 'iter_0000003'} at iteration 3" in log
    _same_steps(_metrics(out), reference)
    assert _tracker(out) == "4" and not partial.exists()


@pytest.mark.slow
def test_killed_worker_ends_the_job_within_60_s(assets, jobs, tmp_path):
    """SIGKILL to rank 1 mid-run: torchrun ends the job with a non-zero status within 60 s."""
    out = tmp_path / "killed"
    out.mkdir()
    (out / "pause_at").write_text("2")
    job = jobs(_argv(assets, out, *QT, *PAUSE), out)
    pids = job.wait_paused()
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    job.go()
    rc = job.wait(timeout=60)
    assert rc != 0 and time.monotonic() - start < 60


@pytest.mark.slow
def test_stopped_worker_ends_the_job_after_the_distributed_timeout(assets, jobs, tmp_path):
    """SIGSTOP to rank 1 mid-run: rank 0's next collective gives up after
    --distributed-timeout-minutes 0.25 with a message naming it, and torchrun ends the job: it
    SIGKILLs the stopped worker after its shutdown grace (--shutdown-timeout, 30 s by default,
    5 s here to keep the test short). Never an endless hang."""
    out = tmp_path / "stopped"
    out.mkdir()
    (out / "pause_at").write_text("2")
    job = jobs(_argv(assets, out, *QT, *PAUSE) + ["--distributed-timeout-minutes", "0.25"], out,
               torchrun_flags=["--shutdown-timeout", "5"])
    pids = job.wait_paused()
    os.kill(pids[1], signal.SIGSTOP)
    start = time.monotonic()
    job.go()
    rc = job.wait(timeout=15 + 5 + 60)
    elapsed = time.monotonic() - start
    assert rc != 0
    assert 14 <= elapsed < 15 + 5 + 60, f"ended after {elapsed:.1f} s (timeout 15 s)"
    assert ("rank 0: a collective did not complete within --distributed-timeout-minutes 0.25 "
            "(15 s)") in job.output()


@pytest.mark.slow
def test_ray_launcher_killed_worker_ends_the_job(assets, jobs, tmp_path):
    """The Ray launcher: SIGKILL to one actor's process mid-run ends the job non-zero within
    60 s (the launcher notices the lost actor and stops the other)."""
    pytest.importorskip("ray")
    out = tmp_path / "ray_killed"
    out.mkdir()
    (out / "pause_at").write_text("2")
    job = jobs(_argv(assets, out, *QT, *PAUSE), out, launcher="ray")
    pids = job.wait_paused(timeout=JOB_TIMEOUT + 60)
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    job.go()
    rc = job.wait(timeout=60)
    assert rc != 0 and time.monotonic() - start < 60, job.output()[-4000:]


# --- flags and parse-time checks -----------------------------------------------------------------

def test_unwritable_save_is_an_error_before_anything_loads(assets, tmp_path):
    """--save under a regular file: `q-tuning-train` stops at once with one error line and
    status 2 (checked before the process group, the data or the model)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    argv = _argv(assets, tmp_path / "out", "--save", str(blocker / "ckpt"))
    proc = subprocess.run([sys.executable, "-m", "q_tuning.sft.train", *argv], capture_output=True,
                          text=True, timeout=JOB_TIMEOUT, env=_env(), cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"q-tuning-train: error: --save {blocker / 'ckpt'}: {blocker} is a file, not a "
            "folder") in proc.stderr
    assert "Traceback" not in proc.stderr and "loading" not in proc.stdout


def test_output_path_checks_and_new_flags(tmp_path):
    from q_tuning.sft.train.arguments import check_writable_paths, parse_args

    base = ["--hf-checkpoint", "m", "--data-path", "d.jsonl", "--global-batch-size", "2",
            "--train-iters", "1"]
    args = parse_args(base + ["--save", str(tmp_path / "new" / "deeper" / "ckpt"),
                              "--distributed-timeout-minutes", "0.1",
                              "--exit-duration-in-mins", "2.5", "--exit-signal-handler"])
    check_writable_paths(args)  # missing folders under a writable one are fine
    assert args.distributed_timeout_minutes == 0.1 and args.exit_duration_in_mins == 2.5
    assert args.exit_signal_handler and args.check_for_nan_in_loss_and_grad
    assert not args.strict_data
    assert not parse_args(base + ["--no-check-for-nan-in-loss-and-grad"]
                          ).check_for_nan_in_loss_and_grad
    existing_file = tmp_path / "f"
    existing_file.write_text("")
    for flag in ("--save", "--export-hf", "--tensorboard-dir", "--output-dir"):
        with pytest.raises(ValueError, match=f"{flag} .*exists and is not a folder"):
            check_writable_paths(parse_args(base + [flag, str(existing_file)]))
    for bad in ("0", "-1", "inf", "x"):
        with pytest.raises(SystemExit):
            parse_args(base + ["--distributed-timeout-minutes", bad])
        with pytest.raises(SystemExit):
            parse_args(base + ["--exit-duration-in-mins", bad])


def test_save_probe_leaves_nothing_behind(tmp_path):
    """The trainer's start-up probe of --save (every rank): a missing folder is probed through
    its nearest existing parent and not created (a run that fails later leaves no empty
    checkpoint folder); a file in the way is reported."""
    from q_tuning.sft.checkpoint.files import check_writable

    assert check_writable(tmp_path / "a" / "b" / "checkpoints") is None
    assert check_writable(tmp_path) is None
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("")
    assert check_writable(tmp_path / "f" / "checkpoints") == f"{tmp_path / 'f'} is not a folder"


def test_load_refuses_an_incomplete_folder(tmp_path):
    from q_tuning.sft.checkpoint.files import (CheckpointError, find_checkpoint,
                                              incomplete_checkpoints)

    root = tmp_path / "checkpoints"
    for name in ("iter_0000002", ".iter_0000004.tmp", "iter_0000006"):
        (root / name).mkdir(parents=True)
        (root / name / "metadata.json").write_text("{}")
    (root / "latest_checkpointed_iteration.txt").write_text("2\n")
    assert find_checkpoint(root) == root / "iter_0000002"
    # the interrupted save, and a folder written but never committed by the tracker
    assert incomplete_checkpoints(root) == [root / ".iter_0000004.tmp", root / "iter_0000006"]
    with pytest.raises(CheckpointError, match="a save that did not finish"):
        find_checkpoint(root / ".iter_0000004.tmp")
