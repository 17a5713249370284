#!/usr/bin/env python3
"""Check and time Q-Tuning's CUDA path on one GPU in one command (issue 17).

Run it through `scripts/gpu_check.sh` (which installs megatron-core from a wheel folder first):

    bash scripts/gpu_check.sh --wheels DIR --out DIR      # on the GPU machine
    bash scripts/gpu_check.sh --dry-run                   # list what would run, with sizes
    bash scripts/gpu_check.sh --device cpu --tiny --out DIR   # the CPU variant (test suite)

One process, a process group of one (NCCL on CUDA, gloo on CPU). First the correctness checks
(`CHECKS`), then the timings (`TIMINGS`, CUDA events on CUDA, `time.perf_counter` on CPU, medians
of `--repeats` runs after `--warmup` runs). `DIR/results.json` and `DIR/results.md` are rewritten
after every check and every timing section, so a run cut short still leaves what it measured.

Exit status: 0 every check passed (skipped ones aside); 1 a correctness check failed or raised;
2 bad usage or missing packages; 3 the checks passed but a timing raised (e.g. out of memory).

This module imports only the standard library at module level, so `--dry-run` works on any
python3 without torch; the measurements live in `gpu_check_lib.py`, imported for a real run only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
H200_BF16_PEAK_FLOPS = 989e12  # dense bf16, NVIDIA H200 SXM
ASSUMED_MFU = 0.35  # for the dry run's rough time estimate only


# --- what runs, and at what size -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A megatron-core GPTModel shape: SwiGLU MLP, RMSNorm, RoPE, tied embeddings."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int

    def with_layers(self, scale: float) -> "ModelShape":
        return dataclasses.replace(self, layers=max(1, round(self.layers * scale)))

    def params(self) -> int:
        """Parameter count (embedding counted once: tied)."""
        h, kv = self.hidden, self.kv_heads * self.hidden // self.heads
        per_layer = h * (h + 2 * kv) + h * h + 3 * h * self.ffn + 2 * h
        return self.vocab * h + self.layers * per_layer + h

    def describe(self) -> str:
        return (f"{self.name}: vocab {self.vocab}, hidden {self.hidden}, {self.layers} layers, "
                f"{self.heads} heads / {self.kv_heads} KV, ffn {self.ffn}, "
                f"{self.params() / 1e6:.0f}M params")


SMOLLM2_360M = ModelShape("SmolLM2-360M", 49152, 960, 32, 15, 5, 2560)
SMOLLM2_1_7B = ModelShape("SmolLM2-1.7B", 49152, 2048, 24, 32, 32, 8192)
TINY_TIMING = ModelShape("tiny", 512, 64, 2, 4, 2, 128)
CHECK_MODEL = ModelShape("check", 2048, 256, 4, 8, 4, 512)
TINY_CHECK_MODEL = ModelShape("tiny-check", 256, 64, 2, 4, 2, 128)


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """|got - want| <= atol + rtol * |want| elementwise (relative errors: atol 0)."""

    atol: float
    rtol: float

    def scaled(self, factor: float) -> "Tolerance":
        return Tolerance(self.atol * factor, self.rtol * factor)

    def describe(self) -> str:
        return f"atol {self.atol:g}, rtol {self.rtol:g}"


# nll / entropy in nats. fp32 math over float64: a few ulps of log(V) ~ 11. bf16 products: one
# bf16 rounding of a logit (|z| < 16: < 0.06) can differ between two matmul shapes on a GPU.
# Gradients: relative L2 error of bf16 (Float16Module) against fp32 on the same bf16 weights.
TOLERANCES = {
    "token_stats_fp32": Tolerance(2e-4, 2e-5),
    "token_stats_bf16": Tolerance(2e-4, 2e-5),
    "fused_vs_logits_fp32": Tolerance(5e-4, 5e-5),
    "fused_vs_logits_bf16": Tolerance(6e-2, 1e-2),
    "scoring_fused_vs_logits": Tolerance(6e-2, 1e-2),
    "prune_device_vs_cpu": Tolerance(1e-3, 1e-4),  # sample ppl / entropy; decisions are exact
    "training_step_bf16": Tolerance(0.0, 0.1),  # measured on CPU: 0.019 (tiny), 0.025 (full)
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size the run uses; `make_sizes` fills it from the flags."""

    tiny: bool
    scale: float
    stats_tokens: int  # token_nll_entropy checks: [tokens x vocab] logits
    stats_vocab: int
    fused_tokens: int  # fused_nll_entropy checks: hidden [tokens x hidden], weight [vocab x hidden]
    fused_hidden: int
    fused_vocab: int
    check_model: ModelShape  # model-level checks (seeded weights, same on CPU and device)
    check_samples: int
    check_min_len: int
    check_max_len: int
    timing_models: tuple[ModelShape, ...]
    batch: int  # timing global batch: sequences of `seq` tokens, first half prompt
    seq: int
    micro_batch: int
    scoring_micro_batch: int
    keep_ratios: tuple[float, ...]
    token_keep: float
    naive_tokens: int  # token_nll_entropy vs naive: [tokens x vocab] bf16 logits
    naive_vocab: int
    repeats: int
    warmup: int
    big_alloc_bytes: int  # the allocation that raises the CUDA peak before scoring


def make_sizes(*, tiny: bool, scale: float, repeats: int, warmup: int) -> Sizes:
    if tiny:
        return Sizes(tiny=True, scale=scale, stats_tokens=64, stats_vocab=1000, fused_tokens=64,
                     fused_hidden=32, fused_vocab=1000, check_model=TINY_CHECK_MODEL,
                     check_samples=12, check_min_len=16, check_max_len=48,
                     timing_models=(TINY_TIMING,), batch=8, seq=64, micro_batch=2,
                     scoring_micro_batch=4, keep_ratios=(0.5, 0.25, 0.125), token_keep=0.7,
                     naive_tokens=256, naive_vocab=4096, repeats=repeats, warmup=warmup,
                     big_alloc_bytes=1 << 20)
    batch = max(2, round(64 * scale))
    return Sizes(tiny=False, scale=scale, stats_tokens=1024, stats_vocab=49152, fused_tokens=1024,
                 fused_hidden=2048, fused_vocab=49152, check_model=CHECK_MODEL, check_samples=32,
                 check_min_len=64, check_max_len=256,
                 timing_models=tuple(m.with_layers(scale) for m in (SMOLLM2_360M, SMOLLM2_1_7B)),
                 batch=batch, seq=max(32, 8 * round(1024 * scale / 8)),
                 micro_batch=min(4, batch), scoring_micro_batch=min(8, batch),
                 keep_ratios=(0.5, 0.25, 0.125), token_keep=0.7,
                 naive_tokens=max(64, round(8192 * scale)), naive_vocab=151936,
                 repeats=repeats, warmup=warmup, big_alloc_bytes=1 << 30)


@dataclasses.dataclass(frozen=True)
class PlanItem:
    kind: str  # "check" or "timing"
    name: str
    what: str  # one line, with sizes
    cuda_only: bool = False


def check_plan(s: Sizes, tol: dict[str, Tolerance]) -> list[PlanItem]:
    m = s.check_model
    samples = f"{s.check_samples} samples of {s.check_min_len}-{s.check_max_len} tokens"
    items = [
        ("token_stats_fp32", f"token_nll_entropy on fp32 logits [{s.stats_tokens} x "
                             f"{s.stats_vocab}] vs a float64 CPU reference"),
        ("token_stats_bf16", f"token_nll_entropy on bf16 logits [{s.stats_tokens} x "
                             f"{s.stats_vocab}] vs float64 on the same bf16 values"),
        ("fused_vs_logits_fp32", f"fused_nll_entropy (default and small blocks) vs "
                                 f"token_nll_entropy of the logits, fp32, hidden [{s.fused_tokens}"
                                 f" x {s.fused_hidden}], vocab {s.fused_vocab}"),
        ("fused_vs_logits_bf16", "the same in bf16 (weight and product in bf16)"),
        ("scoring_fused_vs_logits", f"score_samples method fused vs logits on a bf16 "
                                    f"Float16Module GPTModel ({m.describe()}), {samples}; fused "
                                    f"must not fall back"),
        ("prune_device_vs_cpu", f"QTuningPruner.prune (keep 0.5, tokens 0.7) on the device vs the "
                                f"same fp32 weights on CPU ({m.name}, {samples}): identical keep, "
                                f"quadrants and kept loss masks"),
        ("training_step_bf16", f"QTuningPruner.prune + forward_backward on Float16Module + DDP + "
                               f"bf16 optimizer: finite loss, gradients vs an fp32 model on the "
                               f"same weights, then optimizer.step() ({m.name}, {samples})"),
    ]
    plan = [PlanItem("check", n, f"{w} ({tol[n].describe()})" if n in tol else w)
            for n, w in items]
    plan.append(PlanItem("check", "scoring_peak_counter",
                         f"allocate and free {s.big_alloc_bytes >> 20} MiB, score, "
                         f"torch.cuda.max_memory_allocated() must not drop; "
                         f"TokenScores.peak_memory_bytes recorded (fails while the scorer "
                         f"calls torch.cuda.reset_peak_memory_stats)",
                         cuda_only=True))
    return plan


def timing_plan(s: Sizes) -> list[PlanItem]:
    plan = []
    step = (f"global batch {s.batch} x {s.seq} tokens (half prompt), micro-batch {s.micro_batch}, "
            f"bf16 Float16Module + DDP + Adam")
    for m in s.timing_models:
        plan += [
            PlanItem("timing", f"{m.name}: full step", f"{m.describe()}; {step}; tokens/s, MFU"),
            PlanItem("timing", f"{m.name}: scoring (fused)",
                     f"score_samples fused, {s.scoring_micro_batch} rows per micro-batch; "
                     f"ratio to the full step, peak memory"),
            PlanItem("timing", f"{m.name}: scoring (logits)", "score_samples logits, same rows"),
        ] + [PlanItem("timing", f"{m.name}: Q-Tuning step keep {r:g}",
                      f"prune (keep {r:g}, token keep {s.token_keep:g}) + training step on the "
                      f"kept samples; ratio to the full step") for r in s.keep_ratios]
    shape = f"[{s.naive_tokens} x {s.naive_vocab}] bf16 logits"
    plan += [PlanItem("timing", "token_nll_entropy: naive", f"log_softmax fp32, gather, "
                                                            f"sum p*logp on {shape}; peak memory"),
             PlanItem("timing", "token_nll_entropy: ours", f"token_nll_entropy on {shape}")]
    return plan


def rough_seconds(s: Sizes) -> float:
    """A rough H200 estimate of the timings (ASSUMED_MFU of the bf16 peak), correctness aside."""
    tokens = s.batch * s.seq
    runs = s.warmup + s.repeats
    total = 0.0
    for m in s.timing_models:
        full = 6 * m.params() * tokens / (ASSUMED_MFU * H200_BF16_PEAK_FLOPS)
        per_round = full * (1 + 2 / 3 + sum(1 / 3 + r for r in s.keep_ratios))
        total += runs * per_round
    return total


# --- command line --------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--out", default="gpu_check_out", help="folder for results.json/results.md")
    p.add_argument("--dry-run", action="store_true", help="list checks and timings, run nothing")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU test variant)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="0 < s <= 1: scale timing batch, sequence, layers and naive tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-timings", action="store_true", help="correctness checks only")
    p.add_argument("--tolerance-scale", type=float, default=1.0,
                   help="multiply every tolerance (0: any difference fails; for testing)")
    p.add_argument("--cpu-reference", choices=("auto", "process", "inline"), default="auto",
                   help="prune check's CPU side: a spawned gloo process (auto on CUDA) or this "
                        "process (auto on CPU)")
    p.add_argument("--time-budget", type=float, default=420.0,
                   help="seconds; timing sections starting later are skipped")
    p.add_argument("--peak-flops", type=float, default=None,
                   help=f"for MFU; default {H200_BF16_PEAK_FLOPS:g} on CUDA, none on CPU")
    args = p.parse_args(argv)
    if not 0 < args.scale <= 1:
        p.error(f"--scale must be in (0, 1], got {args.scale}")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def print_plan(args: argparse.Namespace, sizes: Sizes, plan: list[PlanItem]) -> None:
    device = args.device if args.device != "auto" else "auto (cuda when available at run time)"
    print(f"gpu_check dry run: device {device}, {'tiny sizes' if sizes.tiny else 'full sizes'}, "
          f"scale {sizes.scale:g}, {sizes.repeats} timed runs after {sizes.warmup} warm-up, "
          f"outputs in {args.out}/results.json and results.md")
    for kind, title in (("check", "Correctness checks"), ("timing", "Timings")):
        items = [i for i in plan if i.kind == kind]
        if kind == "timing" and args.no_timings:
            print(f"\n{title}: none (--no-timings)")
            continue
        print(f"\n{title} ({len(items)}):")
        for i in items:
            print(f"  {i.name}{' [CUDA only, skipped on CPU]' if i.cuda_only else ''}\n"
                  f"      {i.what}")
    if not sizes.tiny and not args.no_timings:
        print(f"\nRough H200 time of the timings at {ASSUMED_MFU:.0%} MFU: "
              f"{rough_seconds(sizes):.0f} s (plus ~1-2 min of set-up and checks); timing "
              f"sections starting after --time-budget {args.time_budget:g} s are skipped.")


# --- the run -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Report:
    meta: dict[str, Any]
    checks: list[Any] = dataclasses.field(default_factory=list)  # gpu_check_lib.CheckResult
    timings: list[Any] = dataclasses.field(default_factory=list)  # gpu_check_lib.TimingResult

    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if c.status in ("fail", "error")]

    def failed_timings(self) -> list[str]:
        return [t.name for t in self.timings if t.status == "error"]

    def exit_code(self) -> int:
        return 1 if self.failed_checks() else 3 if self.failed_timings() else 0

    def to_json(self) -> dict:
        return {"ok": not self.failed_checks(), "exit_code": self.exit_code(),
                "failed_checks": self.failed_checks(), "failed_timings": self.failed_timings(),
                "meta": self.meta, "checks": [dataclasses.asdict(c) for c in self.checks],
                "timings": [dataclasses.asdict(t) for t in self.timings]}


def write_outputs(report: Report, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    for name, text in (("results.json", json.dumps(report.to_json(), indent=2, default=str)),
                       ("results.md", markdown(report))):
        tmp = os.path.join(out, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, os.path.join(out, name))


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(report: Report) -> str:
    m = report.meta
    counts = {s: sum(c.status == s for c in report.checks)
              for s in ("pass", "fail", "error", "skip")}
    lines = [f"# Q-Tuning GPU check ({m.get('started', '')})", "",
             f"Device: {m.get('device_name', '?')}; torch {m.get('torch', '?')}, CUDA "
             f"{m.get('cuda') or '-'}, megatron-core {m.get('megatron_core', '?')}, Python "
             f"{m.get('python', '?')}. Command: `{m.get('command', '')}`. "
             f"Elapsed {m.get('elapsed_s', 0):.1f} s.", "",
             f"Checks: {counts['pass']} passed, {counts['fail']} failed, {counts['error']} raised, "
             f"{counts['skip']} skipped. Exit status {report.exit_code()}.", "",
             "## Correctness", "", "| check | status | result | tolerance |", "|---|---|---|---|"]
    lines += [check_row(c) for c in report.checks]
    lines += ["", "## Timings", "", "| model | what | median s | min-max s | ratio | tokens/s | "
              "MFU | peak MiB | notes |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [timing_row(t) for t in report.timings]
    return "\n".join(lines)


def check_row(c: Any) -> str:
    tol = ", ".join(f"{k} {v:g}" for k, v in c.tolerance.items())
    text = c.summary + (f" ({c.note})" if c.note else "")
    return f"| {c.name} | {c.status} | {text.replace('|', '/')} | {tol} |"


def timing_row(t: Any) -> str:
    span = f"{min(t.seconds):.4f}-{max(t.seconds):.4f}" if t.seconds else ""
    peak = t.extra.get("peak_memory_bytes")
    ratio = f"{t.ratio:.3f} to {t.ratio_to}" if t.ratio is not None else ""
    notes = f"{t.status}: {t.reason}" if t.status != "ok" else t.note
    return (f"| {t.model} | {t.name} | {_fmt(t.median_s, '.4f')} | {span} | {ratio} | "
            f"{_fmt(t.extra.get('tokens_per_s'), ',.0f')} | {_fmt(t.extra.get('mfu'), '.1%')} | "
            f"{'' if peak is None else f'{peak / 2**20:,.0f}'} | {notes.replace('|', '/')} |")


def check_runners(lib: Any, device: Any, s: Sizes, tol: dict[str, Tolerance],
                  cpu_reference: str) -> dict[str, Callable[[], Any]]:
    """Check name -> a call that returns its gpu_check_lib.CheckResult."""
    batch = dict(samples=s.check_samples, min_len=s.check_min_len, max_len=s.check_max_len)
    m = s.check_model
    return {
        "token_stats_fp32": lambda: lib.check_token_stats(
            device, "float32", s.stats_tokens, s.stats_vocab, tol["token_stats_fp32"]),
        "token_stats_bf16": lambda: lib.check_token_stats(
            device, "bfloat16", s.stats_tokens, s.stats_vocab, tol["token_stats_bf16"]),
        "fused_vs_logits_fp32": lambda: lib.check_fused_vs_logits(
            device, "float32", s.fused_tokens, s.fused_hidden, s.fused_vocab,
            tol["fused_vs_logits_fp32"]),
        "fused_vs_logits_bf16": lambda: lib.check_fused_vs_logits(
            device, "bfloat16", s.fused_tokens, s.fused_hidden, s.fused_vocab,
            tol["fused_vs_logits_bf16"]),
        "scoring_fused_vs_logits": lambda: lib.check_scoring_methods(
            device, m, batch, tol["scoring_fused_vs_logits"]),
        "prune_device_vs_cpu": lambda: lib.check_prune_device_vs_cpu(
            device, m, batch, tol["prune_device_vs_cpu"], cpu_reference),
        "training_step_bf16": lambda: lib.check_training_step(
            device, m, batch, tol["training_step_bf16"], micro_batch_size=2),
        "scoring_peak_counter": lambda: lib.check_scoring_peak_counter(
            device, m, batch, s.big_alloc_bytes),
    }


def timing_sections(lib: Any, device: Any, s: Sizes, peak_flops: float | None
                    ) -> list[tuple[str, Callable[[], list]]]:
    """(section name, call returning its gpu_check_lib.TimingResult list), in run order."""
    sections = []
    for m in s.timing_models:
        sections.append((m.name, lambda m=m: lib.time_model(
            device, m, batch=s.batch, seq=s.seq, micro_batch=s.micro_batch,
            scoring_micro_batch=s.scoring_micro_batch, keep_ratios=s.keep_ratios,
            token_keep=s.token_keep, repeats=s.repeats, warmup=s.warmup,
            peak_flops=peak_flops)))
    sections.append(("token_nll_entropy", lambda: lib.time_token_stats(
        device, s.naive_tokens, s.naive_vocab, repeats=s.repeats, warmup=s.warmup)))
    return sections


@dataclasses.dataclass
class Session:
    """One real run: the measurement module, the device, and the report being written."""

    args: argparse.Namespace
    sizes: Sizes
    lib: Any  # the gpu_check_lib module
    device: Any  # torch.device
    report: Report
    start: float

    def save(self) -> None:
        self.report.meta["elapsed_s"] = time.perf_counter() - self.start
        write_outputs(self.report, self.args.out)

    def run_checks(self, plan: list[PlanItem]) -> None:
        a, lib, device = self.args, self.lib, self.device
        tol = {k: v.scaled(a.tolerance_scale) for k, v in TOLERANCES.items()}
        reference = a.cpu_reference if a.cpu_reference != "auto" else (
            "process" if device.type == "cuda" else "inline")
        runners = check_runners(lib, device, self.sizes, tol, reference)
        for item in (i for i in plan if i.kind == "check"):
            print(f"[gpu_check] check {item.name} ...", flush=True)
            if item.cuda_only and device.type != "cuda":
                result = lib.skipped(item.name, f"CUDA only: the device is {device.type}, where "
                                                f"torch.cuda's peak-memory counters do not exist")
            else:
                result = lib.guarded_check(item.name, runners[item.name])
            self.report.checks.append(result)
            print(f"[gpu_check]   {result.status}: {result.summary}", flush=True)
            self.save()

    def run_timings(self) -> None:
        a, lib, device = self.args, self.lib, self.device
        peak = a.peak_flops or (H200_BF16_PEAK_FLOPS if device.type == "cuda" else None)
        for name, section in timing_sections(lib, device, self.sizes, peak):
            elapsed = time.perf_counter() - self.start
            print(f"[gpu_check] timing {name} ({elapsed:.0f} s elapsed) ...", flush=True)
            if elapsed > a.time_budget:
                self.report.timings.append(lib.skipped_timing(
                    name, f"--time-budget {a.time_budget:g} s spent ({elapsed:.0f} s)"))
            else:
                self.report.timings += lib.guarded_timings(name, section)
            self.save()


def run(args: argparse.Namespace, sizes: Sizes, plan: list[PlanItem], argv: Sequence[str]) -> int:
    start = time.perf_counter()
    sys.path[:0] = [p for p in (HERE, ROOT) if p not in sys.path]
    try:
        import gpu_check_lib as lib
    except ImportError as e:
        print(f"gpu_check: cannot import the measurement code ({e}); install megatron-core with "
              f"`bash scripts/gpu_check.sh --wheels DIR ...`", file=sys.stderr)
        return 2
    try:
        device = lib.start(args.device)
    except RuntimeError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    meta = {**lib.environment(device), "command": " ".join(["scripts/gpu_check.py", *argv]),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sizes": dataclasses.asdict(sizes), "tolerance_scale": args.tolerance_scale,
            "plan": [dataclasses.asdict(i) for i in plan]}
    session = Session(args=args, sizes=sizes, lib=lib, device=device, report=Report(meta=meta),
                      start=start)
    session.run_checks(plan)
    if not args.no_timings:
        session.run_timings()
    lib.stop()
    session.save()
    report = session.report
    print(f"[gpu_check] wrote {args.out}/results.json and results.md; failed checks: "
          f"{report.failed_checks() or 'none'}; exit {report.exit_code()}", flush=True)
    return report.exit_code()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    sizes = make_sizes(tiny=args.tiny, scale=args.scale, repeats=args.repeats, warmup=args.warmup)
    tol = {k: v.scaled(args.tolerance_scale) for k, v in TOLERANCES.items()}
    plan = check_plan(sizes, tol) + timing_plan(sizes)
    if args.dry_run:
        print_plan(args, sizes, plan)
        return 0
    return run(args, sizes, plan, argv)


if __name__ == "__main__":
    sys.exit(main())
