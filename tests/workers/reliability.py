"""Worker side of tests/sft/test_reliability.py: faults injected into the real trainer.

Two ways in:
- `run_scenarios` runs inside `tests.harness.launch.run_distributed` (2 gloo processes, one
  spawn for many trainer runs); each scenario names the faults to inject on which rank;
- `pause_hook`, a `--rollout-data-postprocess-path` hook for runs started as real jobs (torchrun,
  the Ray launcher): at the iteration written in `<output-dir>/pause_at` it writes
  `<output-dir>/paused.rank<R>` (its pid) and waits for `<output-dir>/go`, so that the test can
  signal, kill or stop the workers at a known iteration;
- `python -m tests.workers.reliability <trainer flags>` (under torchrun): the trainer's `main`, with
  `<output-dir>/kill_in_save_at` making every rank SIGKILL itself right after writing that
  iteration's checkpoint files, before the folder is renamed and the tracker updated.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import pathlib
import signal
import sys
import time

_HOOK_CALLS = 0


# --- hooks and entry point for real jobs ---------------------------------------------------------

def pause_hook(args, rollout_id, rollout_data) -> None:
    """Pause at the iteration in <output-dir>/pause_at until <output-dir>/go exists (300 s max)."""
    global _HOOK_CALLS
    _HOOK_CALLS += 1
    out = pathlib.Path(args.output_dir)
    config = out / "pause_at"
    if not config.is_file() or int(config.read_text()) != _HOOK_CALLS:
        return
    marker = out / f"paused.rank{os.environ.get('RANK', '0')}"
    tmp = out / f".{marker.name}.tmp"  # one per rank
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, marker)
    deadline = time.monotonic() + 300
    while not (out / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _kill_in_save(iteration: int) -> None:
    """Every rank SIGKILLs itself once checkpoint `iteration` is written into its temporary
    folder (megatron's save ends with a barrier, so all files are there)."""
    from megatron.core import dist_checkpointing

    original = dist_checkpointing.save

    @functools.wraps(original)
    def save(state, checkpoint_dir, *args, **kwargs):
        result = original(state, checkpoint_dir, *args, **kwargs)
        if pathlib.Path(checkpoint_dir).name == f".iter_{iteration:07d}.tmp":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    dist_checkpointing.save = save


def main(argv: list[str]) -> None:
    from q_tuning.sft.train.__main__ import main as trainer_main
    from q_tuning.sft.train.arguments import parse_args

    out = pathlib.Path(parse_args(argv).output_dir)
    if (out / "kill_in_save_at").is_file():
        _kill_in_save(int((out / "kill_in_save_at").read_text()))
    trainer_main(argv)


# --- faults for run_scenarios --------------------------------------------------------------------

@contextlib.contextmanager
def _patched(obj, name: str, value):
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield original
    finally:
        setattr(obj, name, original)


def _params_checksum(chunks) -> float:
    return float(sum(p.detach().double().sum() for c in chunks for p in c.parameters()))


@contextlib.contextmanager
def _faults(faults: dict, rank: int, record: dict):
    """Install the faults of a scenario (keys below) for the duration of one trainer run."""
    with contextlib.ExitStack() as stack:
        if "enospc_on_rank" in faults:  # disk full while rank R writes checkpoint `at`
            from megatron.core.dist_checkpointing.strategies import filesystem_async

            target_rank, at = faults["enospc_on_rank"]
            original = filesystem_async._write_item

            @functools.wraps(original)
            def write_item(*args, **kwargs):
                stream = next((a for a in args if hasattr(a, "write") and hasattr(a, "name")),
                              None)
                if rank == target_rank and stream is not None \
                        and f".iter_{at:07d}.tmp" in str(stream.name):
                    stream.write(b"\0" * 64)  # a few bytes made it, then the disk was full
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(stream.name))
                return original(*args, **kwargs)

            stack.enter_context(_patched(filesystem_async, "_write_item", write_item))
        if "nan_grad_on_rank" in faults:  # NaN loss and gradients on rank R at iteration `at`
            from q_tuning.passes import training

            target_rank, at = faults["nan_grad_on_rank"]
            original_fb = training.forward_backward
            record["checksums"] = []  # the weights before each training forward-backward
            calls = [0]

            def forward_backward(model_chunks, batch, **kwargs):
                if kwargs.get("forward_only"):
                    return original_fb(model_chunks, batch, **kwargs)
                calls[0] += 1
                record["checksums"].append(_params_checksum(model_chunks))
                outputs = original_fb(model_chunks, batch, **kwargs)
                if calls[0] == at and rank == target_rank:
                    for chunk in model_chunks:
                        for buffer in chunk.buffers:
                            buffer.grad_data.fill_(float("nan"))
                    if outputs:
                        loss = outputs[0]["lm loss"].clone()
                        loss[0] = float("nan")
                        outputs[0]["lm loss"] = loss
                return outputs

            stack.enter_context(_patched(training, "forward_backward", forward_backward))
        if "nan_score_on_rank" in faults:  # NaN token NLLs of rank R's first sample at `at`
            from q_tuning import pruner

            target_rank, at = faults["nan_score_on_rank"]
            original_score = pruner.score_samples
            calls = [0]

            def score_samples(*args, **kwargs):
                scores = original_score(*args, **kwargs)
                calls[0] += 1
                if calls[0] == at and rank == target_rank:
                    scores.nll[0] = float("nan")
                return scores

            stack.enter_context(_patched(pruner, "score_samples", score_samples))
        if "data_error_on_rank" in faults:  # rank R cannot read its data
            from q_tuning.sft.data import dataset as data

            target_rank = faults["data_error_on_rank"]
            original_from = data.SFTDataset.from_jsonl

            def from_jsonl(*args, **kwargs):
                if rank == target_rank:
                    raise data.DataError("/data/shard.jsonl:7: injected read failure")
                return original_from(*args, **kwargs)

            stack.enter_context(_patched(data.SFTDataset, "from_jsonl", from_jsonl))
        if "unwritable_save_on_rank" in faults:  # rank R cannot write into --save
            from q_tuning.sft.checkpoint import files as checkpointing

            target_rank = faults["unwritable_save_on_rank"]
            original_check = checkpointing.check_writable

            def check_writable(root):
                if rank == target_rank:
                    return ("cannot write checkpoints there (OSError: [Errno 30] Read-only "
                            "file system)")
                return original_check(root)

            stack.enter_context(_patched(checkpointing, "check_writable", check_writable))
        if "watch_model_load" in faults:  # did the weights load before the failure?
            from q_tuning.sft.hf import model

            original_load = model.load_hf_weights

            def load_hf_weights(*args, **kwargs):
                record["weights_loaded"] = True
                return original_load(*args, **kwargs)

            stack.enter_context(_patched(model, "load_hf_weights", load_hf_weights))
        yield


def run_scenarios(rank: int, world_size: int,
                  scenarios: list[tuple[str, list[str], dict]]) -> dict:
    """Run the trainer once per (name, argv, faults), in order; {name: {"history" | "error",
    "record"}}. Any exception is recorded (its type and message), so one scenario's failure is
    the next one's clean start."""
    import multiprocessing

    from q_tuning.sft.train.__main__ import run
    from q_tuning.sft.train.arguments import parse_args

    # megatron's dist_checkpointing forks writer processes; a daemonic process may not
    # (see tests/workers/trainer.py).
    multiprocessing.current_process()._config["daemon"] = False
    results = {}
    for name, argv, faults in scenarios:
        record: dict = {}
        with _faults(faults, rank, record):
            try:
                history = run(parse_args(argv))
                results[name] = {"history": history, "error": None}
            except Exception as err:  # recorded for the test to check
                results[name] = {"history": None, "error": f"{type(err).__name__}: {err}"}
        results[name]["record"] = record
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
