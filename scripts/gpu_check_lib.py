"""The measurements behind scripts/gpu_check.py: correctness checks and timings of Q-Tuning's
megatron-core path in one process on one device (CUDA; or CPU, as the test suite runs it).

`start(device)` sets up torch.distributed with a world of one (NCCL on CUDA, gloo plus `mcore_cpu`
on CPU) and megatron-core's parallel state; `stop()` undoes it. Every `check_*` returns a
`CheckResult`, every `time_*` a list of `TimingResult`; `guarded_check` / `guarded_timings` turn
an exception into an "error" result so that one failure does not stop the run. Model shapes are
read by attribute (`vocab, hidden, layers, heads, kv_heads, ffn, name`: gpu_check.ModelShape),
tolerances likewise (`atol, rtol`: gpu_check.Tolerance).

Models are megatron-core `GPTModel`s with the local (pure PyTorch) layer spec, built with
`tests/harness/megatron.py`'s config and seeded weights (so the CPU reference process builds the
same weights), and wrapped as `q_tuning/sft/train/trainer.py` does: `Float16Module` for bf16, DDP with
fp32 gradient reduction, `get_megatron_optimizer` (Adam), the per-token loss.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import sys
import time
import traceback
import types
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the repository (q_tuning, tests, benchmarks) and benchmarks/ itself: the benchmark scripts
# import their shared helpers (bench_common) as run from that folder
for _path in (os.path.join(ROOT, "benchmarks"), ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from benchmarks.bench_step_parts import load_batch  # noqa: E402
from benchmarks.bench_token_stats import naive_token_nll_entropy  # noqa: E402
from q_tuning import QTuningConfig, QTuningPruner, RunShape  # noqa: E402
from q_tuning.fused_stats import fused_nll_entropy  # noqa: E402
from q_tuning.parallel.process_group import join_process_group  # noqa: E402
from q_tuning.passes.scoring import TokenScores, score_samples  # noqa: E402
from q_tuning.passes.training import forward_backward  # noqa: E402
from q_tuning.token_stats import token_nll_entropy  # noqa: E402
from tests.harness.megatron import (build_tiny_gpt, tiny_gpt_config,  # noqa: E402
                                    tiny_gpt_layer_spec, unwrap)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PRUNE_CONFIG = dict(sample_keep_ratio=0.5, token_keep_ratio=0.7, scoring_micro_batch_size=4)
PEAK_COUNTER_NOTE = ("guards the fix of a known bug: score_samples used to call "
                     "torch.cuda.reset_peak_memory_stats, resetting the process-wide peak; "
                     "with such a scorer this check fails")


@dataclasses.dataclass
class CheckResult:
    name: str
    status: str  # "pass", "fail", "skip" or "error"
    summary: str
    metrics: dict = dataclasses.field(default_factory=dict)
    tolerance: dict = dataclasses.field(default_factory=dict)
    note: str = ""


@dataclasses.dataclass
class TimingResult:
    name: str
    model: str
    status: str = "ok"  # "ok", "error" or "skip"
    seconds: list = dataclasses.field(default_factory=list)
    median_s: float | None = None
    ratio: float | None = None  # median / median of `ratio_to`
    ratio_to: str = ""
    sizes: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)  # tokens_per_s, mfu, peak_memory_bytes
    reason: str = ""
    note: str = ""


# --- process group, environment ------------------------------------------------------------------

def start(device_name: str = "auto", seed: int = 1234) -> torch.device:
    """A process group of one and megatron-core's parallel state on `device_name`."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch.cuda.is_available() is False")
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    if not cuda:
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        warnings.filterwarnings("ignore", message="Apex is not installed")
    join_process_group(cuda=cuda)  # a process group of one: NCCL on CUDA, gloo (mcore_cpu) else
    ps.initialize_model_parallel()
    model_parallel_cuda_manual_seed(seed)
    return torch.device("cuda", 0) if cuda else torch.device("cpu")


def stop() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def environment(device: torch.device) -> dict:
    import platform

    import megatron.core

    cuda = device.type == "cuda"
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda
            else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "megatron_core": getattr(megatron.core, "__version__", "?"),
            "python": platform.python_version(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if cuda else None}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- results -------------------------------------------------------------------------------------

def skipped(name: str, reason: str) -> CheckResult:
    return CheckResult(name=name, status="skip", summary=reason)


def skipped_timing(name: str, reason: str) -> TimingResult:
    return TimingResult(name=name, model=name, status="skip", reason=reason)


def guarded_check(name: str, fn: Callable[[], CheckResult]) -> CheckResult:
    try:
        return fn()
    except Exception as e:  # reported as the check's result; the run goes on
        return CheckResult(name=name, status="error", summary=f"{type(e).__name__}: {e}"[:500],
                           metrics={"traceback": traceback.format_exc()[-4000:]})
    finally:
        release_memory()


def guarded_timings(name: str, fn: Callable[[], list]) -> list:
    try:
        return fn()
    except Exception as e:
        return [TimingResult(name=name, model=name, status="error",
                             reason=f"{type(e).__name__}: {e}"[:500],
                             extra={"traceback": traceback.format_exc()[-4000:]})]
    finally:
        release_memory()


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def compare(got: torch.Tensor, want: torch.Tensor, tol: Any) -> tuple[bool, dict]:
    """Elementwise |got - want| <= atol + rtol |want| (NaN fails); the worst errors."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    err = (got - want).abs()
    bound = tol.atol + tol.rtol * want.abs()
    ok = bool((err <= bound).all()) and got.shape == want.shape
    rel = err / want.abs().clamp_min(1e-12)
    return ok, {"max_abs_err": float(err.max()) if err.numel() else 0.0,
                "max_rel_err": float(rel.max()) if rel.numel() else 0.0}


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def tol_dict(tol: Any) -> dict:
    return {"atol": tol.atol, "rtol": tol.rtol}


def verdict(name: str, ok: bool, summary: str, metrics: dict, tol: Any = None,
            note: str = "") -> CheckResult:
    return CheckResult(name=name, status="pass" if ok else "fail", summary=summary,
                       metrics=metrics, tolerance=tol_dict(tol) if tol is not None else {},
                       note=note)


# --- models and batches --------------------------------------------------------------------------

def make_batch(vocab: int, samples: int, min_len: int, max_len: int, seed: int = 0) -> dict:
    """`bench_step_parts.load_batch` (random tokens, the first half of each sample a prompt), with
    a `uid` per sample."""
    batch = load_batch(dict(real=False, batch=samples, min_len=min_len, max_len=max_len,
                            vocab=vocab), seed)
    batch["uid"] = list(range(samples))
    return batch


def build_model(shape: Any, device: torch.device, dtype: torch.dtype, *, max_len: int,
                seeded: bool = True, seed: int = 5) -> torch.nn.Module:
    """A GPTModel of `shape` on `device`, in a Float16Module for bf16. `seeded`: weights from
    `build_tiny_gpt`'s per-parameter generators (identical on any device); otherwise
    megatron-core's own initialisation on the device (fast, for timing models)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.module import Float16Module

    config = tiny_gpt_config(
        layers=shape.layers, hidden=shape.hidden, heads=shape.heads, kv_heads=shape.kv_heads,
        ffn_hidden=shape.ffn, dtype=dtype, swiglu=True, normalization="RMSNorm",
        calculate_per_token_loss=True, use_cpu_initialization=seeded or device.type == "cpu")
    if seeded:
        (model,) = build_tiny_gpt(vocab=shape.vocab, seq_len=max_len, tied=True, seed=seed,
                                  config=config)
    else:
        model = GPTModel(config=config, transformer_layer_spec=tiny_gpt_layer_spec(),
                         vocab_size=shape.vocab, max_sequence_length=max_len,
                         share_embeddings_and_output_weights=True, position_embedding_type="rope")
    model = model.to(device)
    return Float16Module(config, model) if dtype == torch.bfloat16 else model


@dataclasses.dataclass
class Trainable:
    """A model wrapped for training as the trainer wraps it."""

    model: torch.nn.Module  # DistributedDataParallel
    optimizer: Any
    config: Any


def wrap_for_training(model: torch.nn.Module, dtype: torch.dtype, lr: float = 1e-6) -> Trainable:
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = unwrap(model).config
    bf16 = dtype == torch.bfloat16
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    ddp = DistributedDataParallel(config=config, module=model, ddp_config=ddp_config)
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, min_lr=0.0, weight_decay=0.0, clip_grad=1.0,
                        bf16=bf16, params_dtype=dtype), [ddp])
    config.grad_scale_func = optimizer.scale_loss
    return Trainable(model=ddp, optimizer=optimizer, config=config)


def gradients(setup: Trainable, batch: dict, micro_batch_size: int) -> tuple[list, dict]:
    """forward_backward on `batch` (no optimizer step): its outputs and name -> fp32 grad."""
    setup.model.zero_grad_buffer()
    setup.optimizer.zero_grad()
    outputs = forward_backward([setup.model], batch, micro_batch_size=micro_batch_size)
    grads = {n: p.main_grad.detach().float().cpu().clone()
             for n, p in unwrap(setup.model).named_parameters()}
    return outputs, grads


def train_step(setup: Trainable, batch: dict, micro_batch_size: int) -> tuple:
    """One training step: forward_backward, then optimizer.step(); (outputs, step result)."""
    setup.model.zero_grad_buffer()
    setup.optimizer.zero_grad()
    outputs = forward_backward([setup.model], batch, micro_batch_size=micro_batch_size)
    return outputs, setup.optimizer.step()


def loss_of(outputs: list) -> tuple[float, float]:
    """(sum of token losses, loss tokens) of forward_backward's outputs."""
    total = sum(o["lm loss"].detach().double().cpu() for o in outputs)
    return float(total[0]), float(total[1])


# --- correctness checks --------------------------------------------------------------------------

def check_token_stats(device: torch.device, dtype_name: str, tokens: int, vocab: int,
                      tol: Any) -> CheckResult:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(tokens, vocab, generator=gen) * 3.0).to(DTYPES[dtype_name])
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    lp = torch.log_softmax(logits.double(), dim=-1)
    want_nll = -lp.gather(1, targets[:, None])[:, 0]
    want_ent = -(lp.exp() * lp).sum(-1)
    del lp
    nll, ent = token_nll_entropy(logits.to(device), targets.to(device))
    ok_n, m_n = compare(nll, want_nll, tol)
    ok_e, m_e = compare(ent, want_ent, tol)
    placed = nll.device.type == device.type and nll.dtype == torch.float32
    metrics = {"nll": m_n, "entropy": m_e, "result_device": str(nll.device)}
    return verdict(f"token_stats_{'fp32' if dtype_name == 'float32' else 'bf16'}",
                   ok_n and ok_e and placed,
                   f"max abs err nll {m_n['max_abs_err']:.2e}, entropy {m_e['max_abs_err']:.2e} "
                   f"([{tokens} x {vocab}] {dtype_name} on {device.type})", metrics, tol)


def check_fused_vs_logits(device: torch.device, dtype_name: str, tokens: int, hidden: int,
                          vocab: int, tol: Any) -> CheckResult:
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(1)
    states = torch.randn(tokens, hidden, generator=gen).to(device)
    weight = (torch.randn(vocab, hidden, generator=gen) * (3.0 / hidden ** 0.5)).to(device, dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    want_nll, want_ent = token_nll_entropy(states.to(dtype) @ weight.t(), targets)
    small = dict(chunk_tokens=max(1, tokens // 3), chunk_vocab=max(1, vocab // 3 + 1))
    ok, metrics = True, {}
    for label, blocks in (("default blocks", {}), ("small blocks", small)):
        nll, ent = fused_nll_entropy(states, weight, targets, **blocks)
        ok_n, m_n = compare(nll, want_nll, tol)
        ok_e, m_e = compare(ent, want_ent, tol)
        ok = ok and ok_n and ok_e
        metrics[label] = {"nll": m_n, "entropy": m_e}
    worst = max(m[k]["max_abs_err"] for m in metrics.values() for k in ("nll", "entropy"))
    name = f"fused_vs_logits_{'fp32' if dtype_name == 'float32' else 'bf16'}"
    return verdict(name, ok, f"max abs err {worst:.2e} over default and small blocks "
                             f"({tokens} tokens, vocab {vocab}, {dtype_name})", metrics, tol)


def check_scoring_methods(device: torch.device, shape: Any, batch_spec: dict,
                          tol: Any) -> CheckResult:
    model = build_model(shape, device, torch.bfloat16, max_len=batch_spec["max_len"])
    batch = make_batch(shape.vocab, **batch_spec)
    scores = {method: score_samples([model], batch["tokens"], batch["loss_masks"],
                                    rows_per_micro_batch=4, method=method)
              for method in ("fused", "logits")}
    fused, logits = scores["fused"], scores["logits"]
    mask = logits.target_mask
    ok_n, m_n = compare(fused.nll[mask], logits.nll[mask], tol)
    ok_e, m_e = compare(fused.entropy[mask], logits.entropy[mask], tol)
    methods = {"fused_run": fused.method, "logits_run": logits.method}
    ok = ok_n and ok_e and methods == {"fused_run": "fused", "logits_run": "logits"} \
        and torch.equal(fused.target_mask, mask)
    return verdict("scoring_fused_vs_logits", ok,
                   f"max abs err nll {m_n['max_abs_err']:.2e}, entropy {m_e['max_abs_err']:.2e} "
                   f"over {int(mask.sum())} targets; methods used {methods}",
                   {"nll": m_n, "entropy": m_e, **methods}, tol)


def prune_decisions(device: torch.device, shape: Any, batch_spec: dict) -> dict:
    """QTuningPruner.prune of an fp32 seeded model on `device`: its decisions as plain lists."""
    model = build_model(shape, device, torch.float32, max_len=batch_spec["max_len"])
    batch = make_batch(shape.vocab, **batch_spec)
    pruner = QTuningPruner(QTuningConfig(**PRUNE_CONFIG), log=False)
    new_batch, report = pruner.prune([model], batch)
    d = pruner.last_decision
    return {"keep": d.selection.keep.tolist(), "quadrant": d.selection.quadrant.tolist(),
            "ppl": d.sample_ppl.tolist(), "entropy": d.sample_entropy.tolist(),
            "kept_masks": {int(u): m.tolist() for u, m in
                           zip(new_batch["uid"], new_batch["loss_masks"])},
            "kept_tokens": report.kept_tokens}


def prune_reference_worker(rank: int, world_size: int, shape_fields: dict,
                           batch_spec: dict) -> dict:
    """`prune_decisions` on CPU in a spawned gloo process (tests.harness.launch.run_distributed)."""
    from tests.harness.megatron import destroy_parallel, init_parallel

    init_parallel()
    try:
        return prune_decisions(torch.device("cpu"), types.SimpleNamespace(**shape_fields),
                               batch_spec)
    finally:
        destroy_parallel()


def cpu_only_child(spawn: Callable[[], Any]) -> Any:
    """Run `spawn` (which starts child processes) with CUDA hidden from the children, so the CPU
    reference runs exactly as in the CPU test suite; this process keeps its GPU."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        return spawn()
    finally:
        if saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def check_prune_device_vs_cpu(device: torch.device, shape: Any, batch_spec: dict, tol: Any,
                              cpu_reference: str) -> CheckResult:
    """`cpu_reference`: "process" (a spawned CPU process; required on CUDA, where megatron-core
    cannot also run on CPU in this process) or "inline" (this process, CPU runs only)."""
    from tests.harness.launch import run_distributed

    mine = prune_decisions(device, shape, batch_spec)
    if cpu_reference == "process":
        fields = {k: getattr(shape, k) for k in ("vocab", "hidden", "layers", "heads",
                                                  "kv_heads", "ffn")}
        (ref,) = cpu_only_child(lambda: run_distributed(prune_reference_worker, 1, fields,
                                                        batch_spec, timeout=300))
    elif device.type == "cpu":
        ref = prune_decisions(torch.device("cpu"), shape, batch_spec)
    else:
        raise ValueError("--cpu-reference inline works on CPU only")
    same = {k: mine[k] == ref[k] for k in ("keep", "quadrant", "kept_masks")}
    ok_p, m_p = compare(torch.tensor(mine["ppl"]), torch.tensor(ref["ppl"]), tol)
    ok_e, m_e = compare(torch.tensor(mine["entropy"]), torch.tensor(ref["entropy"]), tol)
    metrics = {"same": same, "ppl": m_p, "entropy": m_e, "cpu_reference": cpu_reference,
               "kept_samples": sum(mine["keep"]), "kept_tokens": [mine["kept_tokens"],
                                                                  ref["kept_tokens"]]}
    differ = [k for k, v in same.items() if not v]
    return verdict("prune_device_vs_cpu", not differ and ok_p and ok_e,
                   f"identical {', '.join(k for k, v in same.items() if v) or 'nothing'}"
                   f"{'; DIFFERENT ' + ', '.join(differ) if differ else ''}; sample ppl max "
                   f"rel err {m_p['max_rel_err']:.1e}, entropy {m_e['max_rel_err']:.1e} "
                   f"({cpu_reference} CPU reference)", metrics, tol)


def bf16_and_fp32_twins(shape: Any, device: torch.device, max_len: int
                        ) -> tuple[Trainable, Trainable]:
    """The bf16 model as the trainer wraps it, and an fp32 one holding exactly its weights."""
    bf16 = wrap_for_training(build_model(shape, device, torch.bfloat16, max_len=max_len),
                             torch.bfloat16)
    fp32_model = build_model(shape, device, torch.float32, max_len=max_len)
    with torch.no_grad():
        for p32, p16 in zip(fp32_model.parameters(), unwrap(bf16.model).parameters()):
            p32.copy_(p16.float())
    return bf16, wrap_for_training(fp32_model, torch.float32)


def gradient_errors(got: dict, want: dict) -> dict:
    """Relative L2 error of all gradients together, the worst tensor's, and finiteness."""
    per_param = {n: relative_l2(got[n], want[n]) for n in want}
    worst = max(per_param, key=per_param.get)
    return {"grad_rel_l2": relative_l2(torch.cat([g.flatten() for g in got.values()]),
                                       torch.cat([g.flatten() for g in want.values()])),
            "worst_param": worst, "worst_param_rel_l2": per_param[worst],
            "grads_finite": all(bool(torch.isfinite(g).all()) for g in got.values())}


def check_training_step(device: torch.device, shape: Any, batch_spec: dict, tol: Any, *,
                        micro_batch_size: int) -> CheckResult:
    """Prune with the bf16 model, then one forward_backward of both twins on the kept batch:
    loss and gradients of bf16 against fp32 (relative, `tol.rtol`); then the bf16 optimizer step."""
    bf16, fp32 = bf16_and_fp32_twins(shape, device, batch_spec["max_len"])
    pruner = QTuningPruner(QTuningConfig(**PRUNE_CONFIG),
                           RunShape(micro_batch_size=micro_batch_size), log=False)
    new_batch, report = pruner.prune([bf16.model], make_batch(shape.vocab, **batch_spec))
    out16, g16 = gradients(bf16, new_batch, micro_batch_size)
    out32, g32 = gradients(fp32, new_batch, micro_batch_size)
    (s16, n16), (s32, n32) = loss_of(out16), loss_of(out32)
    loss16, loss32 = s16 / max(n16, 1), s32 / max(n32, 1)
    errors = gradient_errors(g16, g32)
    update_ok, grad_norm, _ = bf16.optimizer.step()
    norm = None if grad_norm is None else float(grad_norm)
    metrics = {"loss_bf16": loss16, "loss_fp32": loss32,
               "loss_rel_err": abs(loss16 - loss32) / max(abs(loss32), 1e-12),
               "loss_tokens": [n16, n32], "kept_tokens": report.kept_tokens,
               "kept_samples": report.kept_samples, **errors,
               "update_successful": bool(update_ok), "grad_norm": norm}
    ok = (errors["grads_finite"] and torch.isfinite(torch.tensor([loss16, norm or 0.0])).all()
          and n16 == n32 == report.kept_tokens and metrics["loss_rel_err"] <= tol.rtol
          and errors["grad_rel_l2"] <= tol.rtol and bool(update_ok) and norm is not None)
    return verdict("training_step_bf16", bool(ok),
                   f"loss {loss16:.4f} (fp32 {loss32:.4f}), grad rel L2 err "
                   f"{errors['grad_rel_l2']:.2e} (worst tensor {errors['worst_param_rel_l2']:.2e}"
                   f"), {int(n16)} loss tokens of {report.kept_samples} kept samples, grad norm "
                   f"{'n/a' if norm is None else format(norm, '.4g')}", metrics, tol)


def check_scoring_peak_counter(device: torch.device, shape: Any, batch_spec: dict,
                               big_bytes: int) -> CheckResult:
    model = build_model(shape, device, torch.bfloat16, max_len=batch_spec["max_len"])
    batch = make_batch(shape.vocab, **batch_spec)
    big = torch.empty(big_bytes, dtype=torch.uint8, device=device)
    del big
    before = torch.cuda.max_memory_allocated(device)
    scores = score_samples([model], batch["tokens"], batch["loss_masks"], rows_per_micro_batch=4)
    after = torch.cuda.max_memory_allocated(device)
    ok = after >= before and scores.peak_memory_bytes > 0
    metrics = {"max_allocated_before": before, "max_allocated_after": after,
               "peak_memory_bytes": scores.peak_memory_bytes,
               "peak_memory_measured": scores.peak_memory_measured}
    return verdict("scoring_peak_counter", ok,
                   f"process peak {before / 2**20:.0f} MiB before scoring, {after / 2**20:.0f} "
                   f"MiB after{' (DROPPED: reset by the scorer)' if after < before else ''}; "
                   f"TokenScores.peak_memory_bytes {scores.peak_memory_bytes / 2**20:.1f} MiB "
                   f"(measured: {scores.peak_memory_measured})", metrics,
                   note=PEAK_COUNTER_NOTE)


# --- timings -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Timer:
    """Seconds per call: CUDA events on CUDA, time.perf_counter elsewhere."""

    device: torch.device
    repeats: int
    warmup: int

    def runs(self, fn: Callable[[], Any]) -> list[float]:
        for _ in range(self.warmup):
            fn()
        sync(self.device)
        return [self.once(fn) for _ in range(self.repeats)]

    def once(self, fn: Callable[[], Any]) -> float:
        if self.device.type != "cuda":
            begin = time.perf_counter()
            fn()
            return time.perf_counter() - begin
        begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1000.0

    def peak_bytes(self, fn: Callable[[], Any]) -> int | None:
        """Peak extra CUDA memory of one call above what was allocated before it."""
        if self.device.type != "cuda":
            return None
        sync(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        fn()
        sync(self.device)
        return torch.cuda.max_memory_allocated(self.device) - base


def timing(name: str, model: str, seconds: list[float], sizes: dict, *,
           baseline: TimingResult | None = None, note: str = "", **extra: Any) -> TimingResult:
    median = statistics.median(seconds)
    ratio = median / baseline.median_s if baseline is not None and baseline.median_s else None
    return TimingResult(name=name, model=model, seconds=seconds, median_s=median, ratio=ratio,
                        ratio_to=baseline.name if baseline is not None else "", sizes=sizes,
                        extra=extra, note=note)


def time_model(device: torch.device, shape: Any, *, batch: int, seq: int, micro_batch: int,
               scoring_micro_batch: int, keep_ratios: tuple, token_keep: float, repeats: int,
               warmup: int, peak_flops: float | None) -> list[TimingResult]:
    """Full step, scoring (fused, logits) and Q-Tuning steps of one bf16 model."""
    dtype = torch.bfloat16
    setup = wrap_for_training(build_model(shape, device, dtype, max_len=seq, seeded=False), dtype)
    data = make_batch(shape.vocab, batch, seq, seq)
    timer = Timer(device, repeats, warmup)
    params = sum(p.numel() for p in unwrap(setup.model).parameters())
    tokens = batch * seq
    sizes = {"batch": batch, "seq": seq, "micro_batch": micro_batch, "params": params,
             "layers": shape.layers, "hidden": shape.hidden, "vocab": shape.vocab}
    full = timer.runs(lambda: train_step(setup, data, micro_batch))
    median = statistics.median(full)
    base = timing("full step", shape.name, full, sizes, tokens_per_s=tokens / median,
                  mfu=6 * params * tokens / median / peak_flops if peak_flops else None,
                  peak_flops=peak_flops, note="MFU = 6 x params x tokens / time / peak")
    results = [base]
    for method in ("fused", "logits"):
        results.append(time_scoring(timer, setup, data, method, scoring_micro_batch, base, sizes))
    for ratio in keep_ratios:
        results.append(time_q_step(timer, setup, data, ratio, token_keep, micro_batch,
                                   scoring_micro_batch, base, sizes))
    return results


def time_scoring(timer: Timer, setup: Trainable, data: dict, method: str, rows: int,
                 base: TimingResult, sizes: dict) -> TimingResult:
    last: list[TokenScores] = []

    def score() -> None:
        last[:] = [score_samples([setup.model], data["tokens"], data["loss_masks"],
                                 rows_per_micro_batch=rows, method=method)]
    seconds = timer.runs(score)
    peak = timer.peak_bytes(score)
    scores = last[0]
    return timing(f"scoring ({method})", base.model, seconds, {**sizes, "scoring_rows": rows},
                  baseline=base, peak_memory_bytes=peak if peak is not None
                  else scores.peak_memory_bytes, scorer_peak_memory_bytes=scores.peak_memory_bytes,
                  scorer_peak_measured=scores.peak_memory_measured, method_used=scores.method,
                  note=f"{scores.method} path" + ("" if peak is not None else
                                                  "; peak = the scorer's size estimate"))


def time_q_step(timer: Timer, setup: Trainable, data: dict, ratio: float, token_keep: float,
                micro_batch: int, rows: int, base: TimingResult, sizes: dict) -> TimingResult:
    pruner = QTuningPruner(QTuningConfig(sample_keep_ratio=ratio, token_keep_ratio=token_keep,
                                         scoring_micro_batch_size=rows),
                           RunShape(micro_batch_size=micro_batch), log=False)
    reports: list = []

    def step() -> None:
        new_batch, report = pruner.prune([setup.model], data)
        train_step(setup, new_batch, micro_batch)
        reports[:] = [report]
    seconds = timer.runs(step)
    r = reports[0]
    return timing(f"Q-Tuning step keep {ratio:g}", base.model, seconds,
                  {**sizes, "keep": ratio, "token_keep": token_keep}, baseline=base,
                  kept_samples=r.kept_samples, kept_tokens=r.kept_tokens,
                  note=f"kept {r.kept_samples}/{r.total_samples} samples, "
                       f"{r.kept_tokens}/{r.total_tokens} loss tokens")


def time_token_stats(device: torch.device, tokens: int, vocab: int, *, repeats: int,
                     warmup: int) -> list[TimingResult]:
    """token_nll_entropy vs the naive formulation (bench_token_stats) on bf16 logits."""
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(tokens, vocab, generator=gen, device=device, dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    timer = Timer(device, repeats, warmup)
    sizes = {"tokens": tokens, "vocab": vocab, "dtype": "bfloat16"}
    results: list[TimingResult] = []
    with torch.no_grad():
        for name, fn in (("naive", naive_token_nll_entropy), ("ours", token_nll_entropy)):
            seconds = timer.runs(lambda fn=fn: fn(logits, targets))
            peak = timer.peak_bytes(lambda fn=fn: fn(logits, targets))
            results.append(timing(f"token_nll_entropy: {name}", "logits", seconds, sizes,
                                  baseline=results[0] if results else None,
                                  peak_memory_bytes=peak,
                                  note="peak: extra CUDA memory above the inputs"
                                  if peak is not None else "peak: not measured on CPU"))
    return results
