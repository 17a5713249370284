"""Run Megatron-LM's own `pretrain_gpt.py` on CPU with gloo (tests only, never product code).

Megatron-LM is not on PyPI: the tests find a checkout of NVIDIA/Megatron-LM (tag `core_v0.16.1`)
through an importable `megatron.training` (`scripts/test_megatron_lm.sh /path/to/Megatron-LM`
arranges that). Nothing of it is copied here.

What CPU needs on top of `mcore_cpu.install` (see ../shared/MEGATRON_NOTES.md, "Running
Megatron-LM's own training loop on CPU") is done at interpreter start in every torchrun worker by
`megatron_lm_site/sitecustomize.py`, which `launch_env()` puts on PYTHONPATH:
- `mcore_cpu.install(pretend_cuda_available=True)`: megatron/training/initialize.py asserts
  `torch.cuda.is_available()`;
- `torch.utils.cpp_extension.CUDA_HOME`: megatron/legacy/fused_kernels/__init__.py `load()` runs
  `$CUDA_HOME/bin/nvcc -V` even when no fused kernel is built; a CPU torch leaves it None.
`launch_env()` also sets `TORCHDYNAMO_DISABLE=1`, `CUDA_HOME` (`find_cuda_home`), and puts the
checkout first on PYTHONPATH, so that the sitecustomize and the script import the same `megatron`
package (the checkout's, whose `megatron.core` is the 0.16.1 wheel's code plus
`megatron.training`). With `Q_TUNING_HARNESS_LOG_TOKENS=1` the sitecustomize also prints each
training step's loss-token count, which `trained_tokens()` reads.

`build_dataset_helper()` compiles Megatron's C++ dataset helper with the venv's Python (its
Makefile asks `python3-config`, which a virtual environment lacks, for the extension suffix);
`launch_env()` pins that suffix in MAKEFLAGS so Megatron's start-up `make` finds it up to date.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import types
from pathlib import Path

import torch

from q_tuning.parallel.process_group import free_port
from tests.harness.launch import run_killable

REPO_ROOT = Path(__file__).resolve().parents[2]
SITE_DIR = Path(__file__).resolve().parent / "megatron_lm_site"

# Tiny GPT on mock data, CPU-safe (flags from MEGATRON_NOTES). 4 layers so PP=2 has 2 per stage.
TINY_GPT_FLAGS = [
    "--distributed-backend", "gloo", "--transformer-impl", "local", "--use-cpu-initialization",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion", "--no-persist-layer-norm", "--no-rope-fusion", "--clip-grad", "0",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "64", "--position-embedding-type", "rope",
    "--micro-batch-size", "2", "--global-batch-size", "8",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--weight-decay", "0.0",
    "--seed", "1234", "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1",
    "--num-workers", "0", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
]


def _drop_flags(flags: list[str], names: tuple[str, ...]) -> list[str]:
    """`flags` without each of `names` and the value after it."""
    out, skip = [], False
    for f in flags:
        if not skip and f not in names:
            out.append(f)
        skip = not skip and f in names
    return out


# The same GPT with Megatron-LM's default positions: learned absolute (no --position-embedding-type
# flag), exactly --seq-length of them (32).
LEARNED_POSITIONS_GPT_FLAGS = _drop_flags(
    TINY_GPT_FLAGS, ("--position-embedding-type", "--max-position-embeddings")
) + ["--max-position-embeddings", "32"]


def find_cuda_home() -> str:
    """A CUDA toolkit with bin/nvcc; without one, a stand-in whose `nvcc -V` prints a version
    (that is all Megatron-LM runs it for on CPU)."""
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists():
            return c
    stand_in = Path(tempfile.gettempdir()) / "q_tuning_fake_cuda_home"
    (stand_in / "bin").mkdir(parents=True, exist_ok=True)
    script = stand_in / "bin" / "nvcc"
    script.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    script.chmod(0o755)
    return str(stand_in)


def build_dataset_helper(checkout: Path, python: str = sys.executable) -> Path:
    """Compile megatron/core/datasets/helpers_cpp with `python`'s extension suffix (idempotent)."""
    datasets = checkout / "megatron" / "core" / "datasets"
    suffix = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
        text=True).strip()
    includes = subprocess.check_output([python, "-m", "pybind11", "--includes"], text=True).strip()
    subprocess.run(["make", "-C", str(datasets), f"LIBEXT={suffix}", f"CPPFLAGS={includes}"],
                   check=True, stdout=subprocess.DEVNULL)
    return datasets / f"helpers_cpp{suffix}"


def launch_env(checkout: Path) -> dict[str, str]:
    env = dict(os.environ, CUDA_HOME=find_cuda_home())
    # Megatron rebuilds its dataset helper at start-up (`make`, suffix from `python3-config`):
    # pin the suffix to ours so it finds the one `build_dataset_helper` made up to date.
    env["MAKEFLAGS"] = f"LIBEXT={sysconfig.get_config_var('EXT_SUFFIX')}"
    env.update(Q_TUNING_MEGATRON_LM_CPU="1", Q_TUNING_HARNESS_LOG_TOKENS="1",
               TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1",
               CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(checkout), str(SITE_DIR), str(REPO_ROOT)]
                                          + [p for p in [env.get("PYTHONPATH")] if p]))
    return env


def torchrun_command(nproc: int, script_args: list[str], *, q_tuning: bool,
                     python: str = sys.executable) -> list[str]:
    """`torchrun pretrain_gpt.py ...`, or through `-m q_tuning.megatron_lm` when `q_tuning`."""
    launcher = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(free_port())]
    if q_tuning:
        return launcher + ["-m", "q_tuning.megatron_lm", "pretrain_gpt.py", *script_args]
    return launcher + ["pretrain_gpt.py", *script_args]


def run_pretrain_gpt(checkout: Path, nproc: int, extra_flags: list[str], *, q_tuning: bool,
                     train_iters: int = 3, timeout: float = 480.0,
                     base_flags: list[str] = TINY_GPT_FLAGS) -> subprocess.CompletedProcess:
    """Run the unmodified `pretrain_gpt.py` of `checkout` (cwd) on `nproc` gloo processes; the
    whole process group is killed after `timeout` seconds (a hang fails, never blocks)."""
    args = [*base_flags, "--train-iters", str(train_iters), *extra_flags]
    cmd = torchrun_command(nproc, args, q_tuning=q_tuning)
    code, out = run_killable(cmd, cwd=checkout, env=launch_env(checkout), timeout=timeout)
    if code is None:
        raise TimeoutError(f"{' '.join(cmd)} did not finish in {timeout:.0f}s; output tail:\n"
                           + out[-4000:])
    return subprocess.CompletedProcess(cmd, code, out, None)


_LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.Ee+-]+|nan|inf)")


def iteration_losses(output: str) -> dict[int, float]:
    """{iteration: lm loss} from Megatron-LM's training log lines (--log-interval 1)."""
    return {int(m.group(1)): float(m.group(2)) for m in _LOSS.finditer(output)}


def q_tuning_reports(output: str) -> list[tuple[dict, tuple[int, int]]]:
    """Per step: (quadrant counts, (kept samples, total samples)) from the `[Q-Tuning]` lines."""
    quadrants = re.findall(r"\[Q-Tuning\] Quadrant distribution: (\{[^}]*\})", output)
    kept = re.findall(r"\[Q-Tuning\] Kept (\d+)/(\d+) samples", output)
    return [(ast.literal_eval(q), (int(k), int(t))) for q, (k, t) in zip(quadrants, kept)]


_STEP = re.compile(r"\[Q-Tuning\] step (\d+): kept samples (\[[^\]]*\]) of (\d+);")


def q_tuning_steps(output: str) -> list[tuple[int, list[int]]]:
    """Per pruned step, in order: (step number, global indices of the kept samples), from the
    adapter's `[Q-Tuning] step N: kept samples [...] of M; ...` lines."""
    return [(int(m.group(1)), ast.literal_eval(m.group(2))) for m in _STEP.finditer(output)]


def trained_tokens(output: str) -> list[int]:
    """Per training step, the loss tokens the gradient step used (all ranks), as printed by the
    harness sitecustomize when per-token loss is on."""
    return [int(n) for n in re.findall(r"\[harness\] trained tokens: (\d+)", output)]


def kept_tokens(output: str) -> list[int]:
    """Per step, the kept target tokens of the `[Q-Tuning] Kept ...` line."""
    return [int(n) for n in re.findall(r"\[Q-Tuning\] Kept \d+/\d+ samples \([^)]*\), (\d+)/",
                                       output)]




# --- in-process adapter workers (megatron-core only, run in CI) ----------------------------------
#
# `step_worker` drives `QTuningStep.train_step` the way Megatron-LM's `train_step` does, with a
# forward step shaped like pretrain_gpt.py's: only TP rank 0 of the first/last stage reads the
# iterator and broadcasts the micro-batch to its TP group. Rows are mock-data-like (one sample per
# row, tokens = text[:-1], labels = text[1:]).

STEP_SEQ = 15  # odd on purpose
STEP_VOCAB = 96  # tests/workers/pruner.py MODEL, whose reference gradient the tests reuse


def step_rows(num_rows: int, seed: int = 5) -> list[dict]:
    """`num_rows` rows of `STEP_SEQ` positions, each with some loss-masked positions."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(num_rows):
        text = torch.randint(0, STEP_VOCAB, (STEP_SEQ + 1,), generator=g)
        mask = (torch.rand(STEP_SEQ, generator=g) > 0.25).float()
        mask[: i % 4] = 0.0  # a "prompt" of 0-3 tokens
        rows.append({"text": text, "loss_mask": mask})
    return rows


def rows_to_micro_batches(rows: list[dict], micro_batch_size: int) -> list[dict]:
    """Collate rows into micro-batch dicts as Megatron-LM's GPT DataLoader does."""
    from tests.harness.megatron import causal_attention_mask

    out = []
    for m in range(0, len(rows), micro_batch_size):
        part = rows[m:m + micro_batch_size]
        out.append({
            "tokens": torch.stack([r["text"][:-1] for r in part]),
            "labels": torch.stack([r["text"][1:] for r in part]),
            "loss_mask": torch.stack([r["loss_mask"] for r in part]),
            "attention_mask": causal_attention_mask(len(part), STEP_SEQ),
            "position_ids": torch.arange(STEP_SEQ).repeat(len(part), 1),
        })
    return out


def _step_forward(model, data_iterator, micro_batch_size: int):
    """pretrain_gpt.py's forward_step in miniature (get_batch_on_this_tp_rank + loss_func)."""
    from functools import partial

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from tests.harness.megatron import causal_attention_mask, unwrap

    vp = getattr(unwrap(model), "vp_stage", None)
    first = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp)
    last = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp)
    shape = (micro_batch_size, STEP_SEQ)
    tokens = labels = loss_mask = position_ids = None
    if first or last:
        if ps.get_tensor_model_parallel_rank() == 0:
            mb = next(data_iterator)
            tokens, labels, loss_mask, position_ids = (mb["tokens"], mb["labels"],
                                                       mb["loss_mask"], mb["position_ids"])
        else:
            tokens, labels, position_ids = (torch.empty(shape, dtype=torch.long) for _ in range(3))
            loss_mask = torch.empty(shape)
        for t in (tokens, labels, loss_mask, position_ids):
            dist.broadcast(t, ps.get_tensor_model_parallel_src_rank(),
                           group=ps.get_tensor_model_parallel_group())
    out = model(tokens if first else None, position_ids if first else None,
                causal_attention_mask(*shape), labels=labels if last else None)

    def loss_func(mask, output):
        total = (output.float() * mask).sum()
        count = mask.sum().to(torch.int)
        return total, count, {"lm loss": torch.stack([total.detach(), count.float()])}

    return out, partial(loss_func, loss_mask)


def step_args(micro_batch_size: int, iteration: int = 0, **overrides) -> types.SimpleNamespace:
    """Megatron-LM's `get_args()` as the adapter reads it (`q_tuning_*` settings in overrides);
    `iteration`: Megatron's 0-based `curr_iteration`."""
    base = dict(micro_batch_size=micro_batch_size, seq_length=STEP_SEQ, enable_q_tuning=True,
                calculate_per_token_loss=True, curr_iteration=iteration, train_iters=10,
                position_embedding_type="rope", max_position_embeddings=STEP_SEQ + 1)
    return types.SimpleNamespace(**{**base, **overrides})


def run_step(step, chunks, micro_batches: list[dict], args, *, forward_only: bool = False
             ) -> dict:
    """One call of `step`'s wrapped forward-backward function with keyword arguments, as
    Megatron-LM's `train_step` makes it: fresh `RerunDataIterator`s over `micro_batches` plus one
    spare item on the ranks that read data. Returns the losses, the micro-batch counts the
    schedule was told, and whether each iterator was left at the spare item."""
    from functools import partial

    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.rerun_state_machine import RerunDataIterator

    spare = {"tokens": None}  # one more item: the step must take exactly its own
    iterators = []
    for i in range(len(chunks)):
        reads = ps.get_tensor_model_parallel_rank() == 0 and (
            ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=i)
            or ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=i))
        iterators.append(RerunDataIterator(iter(micro_batches + [spare])) if reads else None)
    calls = []
    inner = get_forward_backward_func()

    def recording_inner(**kwargs):
        calls.append(kwargs["num_microbatches"])
        return inner(**kwargs)

    for c in chunks:
        c.zero_grad_buffer()
    losses = step.wrap(recording_inner, args)(
        forward_step_func=partial(_swap_args, args.micro_batch_size),
        data_iterator=iterators if len(chunks) > 1 else iterators[0], model=chunks,
        num_microbatches=len(micro_batches), seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, forward_only=forward_only)
    return {"calls": calls, "left": [next(it) is spare for it in iterators if it is not None],
            "losses": [{k: v.tolist() for k, v in d.items()} for d in losses]}


def _local_micro_batches(micro_batch_size: int, num_micro_batches: int) -> list[dict]:
    """This DP rank's share of `step_rows`, as micro-batches."""
    from megatron.core import parallel_state as ps

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    local_rows = num_micro_batches * micro_batch_size
    rows = step_rows(local_rows * dp_size)[dp_rank * local_rows:(dp_rank + 1) * local_rows]
    return rows_to_micro_batches(rows, micro_batch_size)


def step_worker(rank, world_size, tp, pp, vpp, keep_ratio: float, micro_batch_size: int,
                num_micro_batches: int, forward_only: bool = False):
    """One adapter step on this rank's share of `step_rows`; returns what the tests compare."""
    from megatron.core import parallel_state as ps

    from q_tuning.megatron_lm.step import QTuningStep
    from tests.harness.fixtures import MODEL, wrap_ddp
    from tests.harness.megatron import build_tiny_gpt, full_state_dict, parallel_world

    with parallel_world(tp=tp, pp=pp, vpp=vpp):
        chunks = wrap_ddp(build_tiny_gpt(**MODEL))
        step = QTuningStep(log=False)
        args = step_args(micro_batch_size, q_tuning_sample_keep_ratio=keep_ratio,
                         q_tuning_token_keep_ratio=0.6)
        result = run_step(step, chunks, _local_micro_batches(micro_batch_size, num_micro_batches),
                          args, forward_only=forward_only)
        result.update(dp_rank=ps.get_data_parallel_rank(),
                      tp_rank=ps.get_tensor_model_parallel_rank())
        if not forward_only:
            d = step.pruner.last_decision
            result.update(grads=full_state_dict(chunks, grads=True), offset=d.local_offset,
                          keep=d.selection.keep.tolist(),
                          masks=[m.tolist() for m in d.local_loss_masks])
        return result


def iterations_worker(rank, world_size, runs: dict[str, list[int]], config: dict):
    """Per run (a fresh adapter each, as a fresh process would have), the adapter's steps at the
    given Megatron iterations (0-based `curr_iteration`), all on the same micro-batches: per call
    the pruner's step number and the global keep mask."""
    from q_tuning.megatron_lm.step import QTuningStep
    from tests.harness.fixtures import MODEL, wrap_ddp
    from tests.harness.megatron import build_tiny_gpt, parallel_world

    with parallel_world():
        chunks = wrap_ddp(build_tiny_gpt(**MODEL))
        micro_batches = _local_micro_batches(2, 3)
        out = {}
        for name, iterations in runs.items():
            step, out[name] = QTuningStep(log=False), []
            for it in iterations:
                run_step(step, chunks, micro_batches, step_args(2, it, **config))
                keep = step.pruner.last_decision.selection.keep.tolist()
                out[name].append((step.pruner.step, keep))
        return out


def learned_positions_worker(rank, world_size, pp: int, keep_ratio: float):
    """The adapter on a GPT with learned absolute positions and `max_position_embeddings` =
    `seq_length` (Megatron-LM's default), against (a) Megatron's own forward over its rows (one
    process) and (b) the plain `QTuningPruner` on the same samples with a copy of the model whose
    position table has one more row. Returns both decisions and per-token statistics."""
    from q_tuning import QTuningConfig, QTuningPruner, RunShape
    from q_tuning.megatron_lm.batches import micro_batches_to_samples
    from q_tuning.megatron_lm.step import QTuningStep, position_tables
    from tests.harness.fixtures import MODEL, wrap_ddp
    from tests.harness.megatron import build_tiny_gpt, parallel_world, unwrap

    with parallel_world(pp=pp):
        model = dict(MODEL, position_embedding="learned_absolute")
        chunks = wrap_ddp(build_tiny_gpt(**model, seq_len=STEP_SEQ))
        micro_batches = _local_micro_batches(2, 3)
        config = dict(sample_keep_ratio=keep_ratio, token_keep_ratio=0.6)
        args = step_args(2, position_embedding_type="learned_absolute",
                         max_position_embeddings=STEP_SEQ,
                         **{f"q_tuning_{k}": v for k, v in config.items()})
        step = QTuningStep(log=False)
        run_step(step, chunks, micro_batches, args)
        longer = build_tiny_gpt(**model, seq_len=STEP_SEQ + 1)
        _copy_weights([unwrap(c) for c in chunks], longer)
        samples = micro_batches_to_samples(micro_batches)
        plain = QTuningPruner(QTuningConfig(**config),
                              RunShape(micro_batch_size=2, seq_length=STEP_SEQ + 1), log=False)
        plain.prune(longer, {k: samples[k] for k in ("tokens", "loss_masks")}, step=1)
        return {"adapter": _decision_of(step.pruner), "plain": _decision_of(plain),
                "hooks_left": sum(len(t._forward_pre_hooks) for c in chunks
                                  for t in position_tables(c)),
                "reference_nll": _own_forward_nll(unwrap(chunks[0]), micro_batches)
                if pp == 1 else None,
                "loss_masks": [m.tolist() for m in samples["loss_masks"]]}


def _copy_weights(source: list, target: list) -> None:
    """`target` chunks get `source`'s weights; a longer position table keeps its extra rows."""
    with torch.no_grad():
        for src, dst in zip(source, target):
            theirs = dict(src.named_parameters())
            for name, p in dst.named_parameters():
                p[:theirs[name].shape[0]].copy_(theirs[name])


def _decision_of(pruner) -> dict:
    d = pruner.last_decision
    return {"step": pruner.step, "keep": d.selection.keep.tolist(),
            "masks": [m.tolist() for m in d.local_loss_masks],
            "nll": d.local_scores.nll.tolist(), "entropy": d.local_scores.entropy.tolist(),
            "target_mask": d.local_scores.target_mask.tolist()}


def _own_forward_nll(model, micro_batches: list[dict]) -> list[list[float]]:
    """Per row, Megatron's own forward over its `s` positions: nll of `labels[t]` at `t`."""
    out = []
    model.eval()
    with torch.no_grad():
        for mb in micro_batches:
            logits = model(mb["tokens"], mb["position_ids"], mb["attention_mask"])
            logp = torch.log_softmax(logits.double(), dim=-1)
            out += (-logp.gather(2, mb["labels"][..., None])[..., 0]).tolist()
    model.train()
    return out


def bad_call_worker(rank, world_size, case: str):
    """The adapter refuses what it cannot prune with an error (no unpruned step): returns it."""
    from q_tuning.megatron_lm.step import QTuningStep
    from tests.harness.fixtures import MODEL, wrap_ddp
    from tests.harness.megatron import build_tiny_gpt, parallel_world

    with parallel_world():
        chunks = wrap_ddp(build_tiny_gpt(**MODEL))
        micro_batches = _local_micro_batches(2, 2)
        args = step_args(2)
        if case == "labels":
            micro_batches[1]["labels"] = micro_batches[1]["labels"].roll(1, dims=1)
        elif case == "no_iteration":
            del args.curr_iteration
        try:
            run_step(QTuningStep(log=False), chunks, micro_batches, args)
        except (ValueError, RuntimeError) as e:
            return {"error": f"{type(e).__name__}: {e}"}
        return {"error": None}


def _swap_args(micro_batch_size, data_iterator, model):
    return _step_forward(model, data_iterator, micro_batch_size)


class RecordingTensorBoard:
    """Records `add_scalar(tag, value, step)` as Megatron-LM's SummaryWriter receives it."""

    def __init__(self):
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, float(value), int(step)))


class RecordingWandb:
    """Records `log(data, step=...)` as Megatron-LM's writer (the wandb module) receives it."""

    def __init__(self):
        self.logged: list[tuple[dict, int]] = []

    def log(self, data, step=None):
        self.logged.append((dict(data), step))


def fake_megatron_writers(world_size: int, rank: int) -> tuple:
    """A stand-in `megatron.training.global_vars` in sys.modules whose writers exist on the last
    rank only, as Megatron-LM's `_set_tensorboard_writer` / `_set_wandb_writer` make them (None
    elsewhere). Returns (tensorboard, wandb) recorders, None on the other ranks."""
    module = types.ModuleType("megatron.training.global_vars")
    last = rank == world_size - 1
    tensorboard, wandb = (RecordingTensorBoard(), RecordingWandb()) if last else (None, None)
    module.get_tensorboard_writer = lambda: tensorboard
    module.get_wandb_writer = lambda: wandb
    sys.modules["megatron.training.global_vars"] = module
    return tensorboard, wandb


def writers_worker(rank, world_size, pp: int, iterations: list[int]):
    """Adapter steps at Megatron's `iterations` with fake Megatron-LM writers: what each rank's
    writers received, and per step the decision's kept count, quadrant labels and level."""
    from q_tuning.megatron_lm.step import QTuningStep
    from tests.harness.fixtures import MODEL, wrap_ddp
    from tests.harness.megatron import build_tiny_gpt, parallel_world

    tensorboard, wandb = fake_megatron_writers(world_size, rank)
    with parallel_world(pp=pp):
        chunks = wrap_ddp(build_tiny_gpt(**MODEL))
        step, decisions = QTuningStep(log=False), []
        for it in iterations:
            run_step(step, chunks, _local_micro_batches(2, 3),
                     step_args(2, it, q_tuning_sample_keep_ratio=0.5))
            selection = step.pruner.last_decision.selection
            decisions.append({"kept": int(selection.keep.sum()), "level": float(selection.level),
                              "quadrant": selection.quadrant.tolist()})
        return {"rank": rank, "decisions": decisions,
                "tensorboard": None if tensorboard is None else tensorboard.scalars,
                "wandb": None if wandb is None else wandb.logged}
