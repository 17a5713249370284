"""Run slime's real Megatron actor training step on CPU with gloo (test-only, never product code).

slime (THUDM/slime) is not installable here and none of it is copied into this project: the
test takes a checkout through SLIME_ROOT, and a Megatron-LM checkout (for `megatron.training`,
which slime imports) through MEGATRON_LM_ROOT. `launch_env()` puts, in this order, on PYTHONPATH:
a temporary directory with links to the checkouts' `slime`, `slime_plugins` and `megatron`
packages only (their roots hold `tests` packages that would shadow ours),
`tests/harness/slime_cpu` (test-only stubs of the modules slime's actor imports at load but a
training step without an inference engine never calls: sglang, sglang_router,
torch_memory_saver, httpx, wandb; its sitecustomize installs the Megatron-LM CPU shims and a
`cpu` backend for slime's accelerator registry), and this repository.

`tests/integrations/slime_real/cpu_train.py` is the per-process training loop (slime's train.py without Ray);
`make_inputs()` writes what it reads: a tiny HF config + tokenizer (`--hf-checkpoint`: slime's
actor loads both) and saved debug rollout data (`--load-debug-rollout-data`), written with
slime's own `save_debug_rollout_data` from `Sample`s.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from q_tuning.parallel.process_group import free_port
from tests.harness.launch import run_killable

REPO_ROOT = Path(__file__).resolve().parents[3]
STUBS = REPO_ROOT / "tests" / "harness" / "slime_cpu"
TRAIN = REPO_ROOT / "tests" / "integrations" / "slime_real" / "cpu_train.py"

VOCAB, LAYERS, HIDDEN, HEADS, FFN = 128, 2, 64, 4, 128
NUM_SAMPLES = 16  # one rollout = one optimizer step (--global-batch-size = --rollout-batch-size)
MAX_TOKENS_PER_GPU = 64

MODEL_FLAGS = [
    "--num-layers", str(LAYERS), "--hidden-size", str(HIDDEN), "--num-attention-heads",
    str(HEADS), "--ffn-hidden-size", str(FFN), "--vocab-size", str(VOCAB),
    "--seq-length", "128", "--max-position-embeddings", "128",
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
    "--disable-bias-linear", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
    "--spec", "tests.integrations.slime_real.cpu_spec", "layer_spec",
]
CPU_FLAGS = [
    "--distributed-backend", "gloo", "--transformer-impl", "local", "--use-cpu-initialization",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
    "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-persist-layer-norm",
    "--no-rope-fusion",
]
SFT_FLAGS = [  # slime's scripts/run-qwen3-4B-base-sft.sh, minus the rollout function
    "--loss-type", "sft_loss", "--calculate-per-token-loss",
    "--disable-compute-advantages-and-returns", "--debug-train-only",
    "--rollout-batch-size", str(NUM_SAMPLES), "--global-batch-size", str(NUM_SAMPLES),
    "--n-samples-per-prompt", "1", "--use-dynamic-batch-size",
    "--max-tokens-per-gpu", str(MAX_TOKENS_PER_GPU), "--micro-batch-size", "1",
    "--optimizer", "adam", "--lr", "1e-3", "--lr-decay-style", "constant", "--weight-decay",
    "0.0", "--adam-beta1", "0.9", "--adam-beta2", "0.98", "--seed", "1234",
]


def slime_commit(slime_root: Path) -> str:
    return subprocess.check_output(["git", "-C", str(slime_root), "rev-parse", "HEAD"],
                                   text=True).strip()


def _linked_packages(slime_root: Path, megatron_root: Path) -> Path:
    site = Path(tempfile.mkdtemp(prefix="q_tuning_slime_site_"))
    for name, root in (("slime", slime_root), ("slime_plugins", slime_root),
                       ("megatron", megatron_root)):
        if (root / name).is_dir():
            (site / name).symlink_to(root / name)
    return site


def launch_env(slime_root: Path, megatron_root: Path) -> dict[str, str]:
    site = _linked_packages(slime_root, megatron_root)
    env = dict(os.environ)
    env.update(Q_TUNING_SLIME_CPU="1", SLIME_ACCELERATOR="cpu", TORCHDYNAMO_DISABLE="1",
               OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONUNBUFFERED="1",
               # the actor reads config and tokenizer from --hf-checkpoint offline
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(site), str(STUBS), str(REPO_ROOT)]
                                          + [p for p in [env.get("PYTHONPATH")] if p]))
    env.pop("Q_TUNING_SLIME_REFERENCE", None)
    return env


def make_inputs(out_dir: Path, env: dict[str, str], num_rollouts: int = 3) -> dict[str, str]:
    """A tiny HF checkpoint directory (config + tokenizer, no weights: the Megatron model is
    randomly initialised from --seed) and `num_rollouts` saved debug rollouts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # The initial checkpoint (--ref-load, which slime uses when --load holds no Megatron
    # checkpoint): slime asserts a non-empty directory and treats one named iter_NNNNNNN as a
    # Megatron checkpoint. This one holds no tracker file, so Megatron's load_checkpoint finds
    # nothing to load and the model keeps its random initialisation from --seed (Megatron's own
    # "will not load any checkpoints and will start from random" path).
    empty = out_dir / "iter_0000000"
    empty.mkdir(exist_ok=True)
    (empty / "README").write_text("no checkpoint: start from random initialisation (--seed)\n")
    subprocess.run([sys.executable, "-m", "tests.integrations.slime_real.harness", "make-inputs",
                    str(out_dir), str(num_rollouts)], cwd=REPO_ROOT, env=env, check=True,
                   timeout=300)
    return {"hf": str(out_dir / "hf"), "rollouts": str(out_dir / "rollout_{rollout_id}.pt"),
            "load": str(empty)}


def _write_inputs(out_dir: Path, num_rollouts: int) -> None:
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from slime.observability.rollout_data_utils import save_debug_rollout_data
    from slime.utils.types import Sample
    from tests.harness.fixtures import global_batch

    hf = out_dir / "hf"
    LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=True).save_pretrained(hf)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", pad_token="t0",
                            eos_token="t1").save_pretrained(hf)
    for rollout_id in range(num_rollouts):
        batch = global_batch(NUM_SAMPLES, seed=3 + rollout_id, vocab=VOCAB, min_len=8,
                             max_len=40)
        samples = []
        for i, (tok, mask) in enumerate(zip(batch["tokens"], batch["loss_masks"])):
            prompt = int(mask.nonzero()[0])
            samples.append(Sample(index=i, group_index=i, tokens=tok.tolist(),
                                  response_length=tok.numel() - prompt,
                                  loss_mask=mask[prompt:].tolist(), reward=0.0,
                                  status=Sample.Status.COMPLETED))
        save_debug_rollout_data(str(out_dir / "rollout_{rollout_id}.pt"), samples,
                                rollout_id=rollout_id, evaluation=False)
    del torch


def slime_flags(inputs: dict[str, str], nproc: int, num_rollouts: int = 3,
                tp: int = 1) -> list[str]:
    return [*MODEL_FLAGS, *CPU_FLAGS, *SFT_FLAGS,
            "--tensor-model-parallel-size", str(tp),
            "--actor-num-nodes", "1", "--actor-num-gpus-per-node", str(nproc),
            "--hf-checkpoint", inputs["hf"], "--ref-load", inputs["load"], "--load-debug-rollout-data", inputs["rollouts"],
            "--num-rollout", str(num_rollouts)]


def run(env: dict[str, str], nproc: int, flags: list[str], *, launcher: bool,
        reference: bool = False, timeout: float = 900.0) -> str:
    """torchrun `cpu_train.py` (through `-m q_tuning.slime` when `launcher`); the output, or an
    AssertionError with its tail when it fails (a hang is killed after `timeout` seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port())]
    cmd += (["-m", "q_tuning.slime", str(TRAIN)] if launcher else [str(TRAIN)]) + flags
    env = dict(env, **({"Q_TUNING_SLIME_REFERENCE": "1"} if reference else {}))
    code, out = run_killable(cmd, cwd=REPO_ROOT, env=env, timeout=timeout)
    if code is None:
        raise AssertionError(f"timed out after {timeout:.0f}s: {' '.join(cmd)}\n{out[-6000:]}")
    if code != 0:
        raise AssertionError(f"exit {code}: {' '.join(cmd)}\n{out[-8000:]}")
    return out


# --- reading the output ---------------------------------------------------------------------------

_STEP = re.compile(r"step (\d+): (\{'train/.*\})")


def step_logs(output: str) -> dict[int, dict]:
    """{step: slime's per-step training log dict} (model.py `logger.info(f"step {i}: {...}")`)."""
    return {int(m.group(1)): ast.literal_eval(m.group(2)) for m in _STEP.finditer(output)}


def harness_records(output: str, tag: str) -> list:
    """The JSON payloads of cpu_train.py's `[harness] <tag> {...}` lines (anywhere in a line: the
    processes' progress bars share the stream)."""
    pattern = re.compile(r"\[harness\] " + re.escape(tag) + r" (\{.*\})\s*$")
    return [json.loads(m.group(1)) for m in map(pattern.search, output.splitlines()) if m]


def forwarded_tokens(output: str) -> int:
    """Tokens of every training micro-batch on every rank (all rollouts)."""
    return sum(r["tokens"] for r in harness_records(output, "forwarded"))


def q_tuning_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "[Q-Tuning]" in line]


if __name__ == "__main__" and sys.argv[1:2] == ["make-inputs"]:
    _write_inputs(Path(sys.argv[2]), int(sys.argv[3]))
