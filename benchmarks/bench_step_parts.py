"""The model, batch, host-sync counter and the two step runners of `bench_pruner_step.py`.

A runner has `full(batch)`, `scoring(batch)`, `q_tuning(batch, keep_ratio)`, and after each
training step `last_padding` (padded / real tokens of its training micro-batches) and, after a
Q-Tuning step, `last_breakdown` (seconds per stage: the pruner's, then training and optimizer).
"""

from __future__ import annotations

import collections
import pathlib
import sys
import time
import types
from functools import partial

import torch

from bench_common import REPO_ROOT

GSM_TRAIN = pathlib.Path(REPO_ROOT) / "outputs" / "smollm2-gsm" / "data" / "train.jsonl"


# --- model and data -------------------------------------------------------------------------------

def build_model(preset: dict):
    """(DDP-wrapped megatron-core GPTModel, megatron optimizer): SmolLM2-135M-Instruct with its
    real weights, or the small random model."""
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    if preset["real"]:
        from q_tuning.sft.hf.assets import smollm2_gguf_path
        from q_tuning.sft.hf.model import (build_gpt_model_chunks, load_hf_weights,
                                          read_hf_config, transformer_config_from_hf)

        gguf = str(smollm2_gguf_path())
        hf_config = read_hf_config(gguf)
        config = transformer_config_from_hf(hf_config, calculate_per_token_loss=True,
                                            use_cpu_initialization=True)
        (model,) = build_gpt_model_chunks(hf_config, config=config)
        load_hf_weights([model], gguf)
    else:
        from tests.harness.megatron import build_tiny_gpt

        (model,) = build_tiny_gpt(vocab=preset["vocab"], layers=preset["layers"],
                                  hidden=preset["hidden"], heads=preset["heads"],
                                  kv_heads=preset["kv_heads"], ffn_hidden=preset["ffn"],
                                  swiglu=True, seed=5)
    model.config.calculate_per_token_loss = True
    model.config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(config=model.config, module=model,
                                  ddp_config=DistributedDataParallelConfig(
                                      grad_reduce_in_fp32=True))
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, bf16=False,
                                                 params_dtype=torch.float32, clip_grad=0.0),
                                 [ddp])
    return ddp, opt


def load_batch(preset: dict, seed: int = 0) -> dict:
    """`{"tokens": [...], "loss_masks": [...]}`: the first N real GSM-Symbolic samples tokenized
    as the trainer does, or N random ones (half prompt) for the small preset."""
    if preset["real"]:
        from q_tuning.sft.hf.assets import load_tokenizer
        from q_tuning.sft.data.dataset import load_sft_samples

        if not GSM_TRAIN.is_file():
            from experiments.gsm.gsm_symbolic import build_gsm_splits, write_jsonl_atomic

            train, _ = build_gsm_splits(256, 100, seed=1234, corrupt_fraction=0.1)
            write_jsonl_atomic(GSM_TRAIN, train)
        samples, _ = load_sft_samples(str(GSM_TRAIN), load_tokenizer(), preset["seq_length"])
        if len(samples) < preset["batch"]:
            raise SystemExit(f"{GSM_TRAIN} has {len(samples)} samples, fewer than the batch")
        chosen = samples[:preset["batch"]]
        return {"tokens": [s.tokens for s in chosen], "loss_masks": [s.loss_mask for s in chosen]}
    g = torch.Generator().manual_seed(seed)
    tokens, masks = [], []
    for _ in range(preset["batch"]):
        n = int(torch.randint(preset["min_len"], preset["max_len"] + 1, (1,), generator=g))
        tokens.append(torch.randint(0, preset["vocab"], (n,), generator=g))
        masks.append((torch.arange(n) >= n // 2).long())  # half prompt, half response
    return {"tokens": tokens, "loss_masks": masks}


class HostSyncCounter:
    """Counts host reads of tensor values (`item`, `tolist`, `int()`, `float()`, `bool()`) made
    anywhere while active: each is a device synchronisation on an accelerator. `sites` counts them
    by the first caller outside torch (`file:line`), `by_package` by q_tuning / megatron / other."""

    METHODS = ("item", "tolist", "__int__", "__float__", "__bool__")

    def __enter__(self) -> "HostSyncCounter":
        self.count = 0
        self.sites: collections.Counter = collections.Counter()
        self._inside = False
        self._saved = {m: getattr(torch.Tensor, m) for m in self.METHODS}
        for m, original in self._saved.items():
            setattr(torch.Tensor, m, self._counting(original))
        return self

    def _counting(self, original):
        def wrapper(tensor, *args, **kwargs):
            if self._inside:  # a torch-function mode calls the method again: one read
                return original(tensor, *args, **kwargs)
            self.count += 1
            self.sites[caller_outside_torch()] += 1
            self._inside = True
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self._inside = False
        return wrapper

    def __exit__(self, *exc) -> None:
        for m, original in self._saved.items():
            setattr(torch.Tensor, m, original)

    @property
    def by_package(self) -> dict[str, int]:
        out = collections.Counter()
        for site, n in self.sites.items():
            out[next((p for p in ("q_tuning", "megatron") if site.startswith(f"{p}/")),
                     "other")] += n
        return dict(out)

    def top(self, k: int = 10) -> list[str]:
        return [f"{site} x{n}" for site, n in self.sites.most_common(k)]


SKIPPED_FRAMES = ("/torch/", "/mcore_cpu/")  # torch, and the CPU shim's torch-function mode


def caller_outside_torch() -> str:
    """`path:line` (from the repository or site-packages) of the nearest frame that is not
    torch's own code, the CPU shim, nor this file."""
    frame = sys._getframe(2)
    while frame is not None and (any(p in frame.f_code.co_filename for p in SKIPPED_FRAMES)
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    for root in ("/site-packages/", str(REPO_ROOT).rstrip("/") + "/"):
        path = path.split(root, 1)[-1]
    return f"{path}:{frame.f_lineno}"


# --- our trainer's step ---------------------------------------------------------------------------

class TrainerRunner:
    """Steps as `q_tuning.sft.train` runs them: pruner, then `forward_backward` and the optimizer."""

    def __init__(self, model, opt, args, preset) -> None:
        self.model, self.opt, self.args = model, opt, args
        self.last_padding = 0.0
        self.last_breakdown: dict[str, float] = {}
        self.last_syncs: dict[str, dict[str, int]] = {}  # host reads, latest Q-Tuning step
        self.last_sync_sites: dict[str, list[str]] = {}  # where most of them are
        self.last_kept: dict = {}

    def _train(self, batch: dict, drawn: dict) -> dict[str, float]:
        """The trainer's `forward_backward_step` on `batch`, pruned from `drawn`."""
        from q_tuning.passes.training import forward_backward

        a, start = self.args, time.perf_counter()
        reference = [t.numel() for t in drawn["tokens"]]
        self.model.zero_grad_buffer()
        self.opt.zero_grad()
        forward_backward([self.model], batch, micro_batch_size=a.micro_batch_size,
                         max_tokens_per_row=a.max_tokens_per_gpu, padding_reference=reference)
        middle = time.perf_counter()
        self.opt.step()
        self.last_padding = self._padding(batch, reference)  # after the timed part
        return {"forward_backward": middle - start, "optimizer": time.perf_counter() - middle}

    def _padding(self, batch: dict, reference: list[int]) -> float:
        from q_tuning.passes.training import training_micro_batches

        micro_batches, _ = training_micro_batches(
            batch, [self.model], micro_batch_size=self.args.micro_batch_size,
            max_tokens_per_row=self.args.max_tokens_per_gpu, padding_reference=reference)
        return padding_ratio([mb["tokens"] for mb in micro_batches], batch["tokens"])

    def full(self, batch: dict) -> None:
        self._train(batch, batch)

    def scoring(self, batch: dict) -> None:
        from q_tuning.passes.scoring import score_samples

        a = self.args
        score_samples([self.model], batch["tokens"], batch["loss_masks"],
                      rows_per_micro_batch=a.scoring_micro_batch_size,
                      training_micro_batch_size=a.micro_batch_size,
                      max_tokens_per_row=a.max_tokens_per_gpu)

    def q_tuning(self, batch: dict, ratio: float) -> None:
        from q_tuning import QTuningConfig, QTuningPruner, RunShape

        a = self.args
        pruner = QTuningPruner(
            QTuningConfig(sample_keep_ratio=ratio, token_keep_ratio=a.token_keep_ratio,
                          scoring_micro_batch_size=a.scoring_micro_batch_size),
            RunShape(micro_batch_size=a.micro_batch_size, max_tokens_per_row=a.max_tokens_per_gpu),
            log=False)
        with HostSyncCounter() as in_pruner:
            kept, _ = pruner.prune([self.model], batch)
        with HostSyncCounter() as in_training:
            train = self._train(kept, batch)
        self.last_syncs = {"pruner": in_pruner.by_package, "training": in_training.by_package}
        self.last_sync_sites = {"pruner": in_pruner.top(), "training": in_training.top()}
        self.last_kept = kept_share(kept["tokens"], batch["tokens"])
        self.last_breakdown = {k: round(v, 3) for k, v in
                               {**pruner.last_stage_seconds.to_json(), **train}.items()}


def kept_share(kept_tokens: list[torch.Tensor], all_tokens: list[torch.Tensor]) -> dict:
    """Samples kept and the share of the batch's real tokens they hold (the training forward
    runs all of them; token pruning only masks the loss)."""
    kept = sum(t.numel() for t in kept_tokens)
    return {"samples": len(kept_tokens),
            "token_share": round(kept / max(1, sum(t.numel() for t in all_tokens)), 4)}


def padding_ratio(micro_batch_tokens: list[torch.Tensor], sample_tokens: list[torch.Tensor]
                  ) -> float:
    """Padded positions / real tokens."""
    real = sum(t.numel() for t in sample_tokens)
    return (sum(t.numel() for t in micro_batch_tokens) - real) / max(real, 1)


def trainer_runner(model, opt, args, preset) -> TrainerRunner:
    return TrainerRunner(model, opt, args, preset)


# --- the Megatron-LM adapter's step ---------------------------------------------------------------

class AdapterRunner(TrainerRunner):
    """Steps as Megatron-LM's `train_step` makes them with `--enable-q-tuning`: micro-batches in
    its format (rows of --seq-length, or `--sft` packed rows), `QTuningStep.wrap` around
    megatron-core's schedule with a `pretrain_gpt.py`-style forward step."""

    def __init__(self, model, opt, args, preset) -> None:
        super().__init__(model, opt, args, preset)
        self.packed = args.max_tokens_per_gpu is not None
        self.seq_length = (args.max_tokens_per_gpu or args.seq_length
                           or preset.get("seq_length", 1024))
        self.micro_batch_size = 1 if self.packed else args.micro_batch_size

    def _megatron_args(self, ratio: float) -> types.SimpleNamespace:
        a = self.args
        return types.SimpleNamespace(
            micro_batch_size=self.micro_batch_size, seq_length=self.seq_length, sft=self.packed,
            enable_q_tuning=True, calculate_per_token_loss=True, curr_iteration=0,
            train_iters=10, position_embedding_type="rope",
            max_position_embeddings=self.seq_length + 1, q_tuning_sample_keep_ratio=ratio,
            q_tuning_token_keep_ratio=a.token_keep_ratio,
            q_tuning_scoring_micro_batch_size=a.scoring_micro_batch_size)

    def _step(self, batch: dict, ratio: float | None) -> dict[str, float]:
        """One Megatron-LM training step (plain, or through the adapter when `ratio` is set);
        seconds of its parts."""
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.rerun_state_machine import RerunDataIterator

        from q_tuning.megatron_lm.step import QTuningStep

        drained = megatron_lm_micro_batches(batch, self.seq_length, self.micro_batch_size,
                                            self.packed)
        inner = self._recorder(get_forward_backward_func())
        self.step = None if ratio is None else QTuningStep(log=False)
        func = inner if ratio is None else self.step.wrap(inner, self._megatron_args(ratio))
        start = time.perf_counter()
        self.model.zero_grad_buffer()
        self.opt.zero_grad()
        func(forward_step_func=megatron_lm_forward_step,
             data_iterator=RerunDataIterator(iter(drained)), model=[self.model],
             num_microbatches=len(drained), seq_length=self.seq_length,
             micro_batch_size=self.micro_batch_size, forward_only=False)
        middle = time.perf_counter()
        self.opt.step()
        end = time.perf_counter()
        self.drained = drained
        return {"adapter": self.inner_start - start, "forward_backward": middle - self.inner_start,
                "optimizer": end - middle}

    def _recorder(self, inner):
        """`inner`, keeping the micro-batches it is given (for the padding figure)."""
        from megatron.core.rerun_state_machine import RerunDataIterator

        def call(**kwargs):
            it = kwargs["data_iterator"]
            self.seen = [next(it) for _ in range(kwargs["num_microbatches"])]
            kwargs["data_iterator"] = RerunDataIterator(iter(self.seen))
            self.inner_start = time.perf_counter()
            return inner(**kwargs)
        return call

    def _note_kept(self, batch: dict, drained: list[dict]) -> None:
        """Padding of the micro-batches trained on, and the kept share. The pruner's samples are
        the rows' segments in row order: plain rows hold one sample each, in batch order; packed
        rows hold samples in first-fit order plus one padding segment per row (never kept)."""
        from q_tuning.megatron_lm.batches import micro_batches_to_samples

        samples = micro_batches_to_samples(drained)["tokens"] if self.packed \
            else batch["tokens"]  # each s + 1 tokens
        if self.step is None:
            kept = batch["tokens"]
        else:
            keep = self.step.pruner.last_decision.selection.keep.tolist()
            kept = [t for t, k in zip(samples, keep) if k]
        self.last_padding = padding_ratio([mb["tokens"] for mb in self.seen],
                                          [t[:-1] for t in kept])
        self.last_kept = kept_share(kept, batch["tokens"])

    def full(self, batch: dict) -> None:
        self._step(batch, None)
        self._note_kept(batch, self.drained)

    def q_tuning(self, batch: dict, ratio: float) -> None:
        with HostSyncCounter() as syncs:
            parts = self._step(batch, ratio)
        self._note_kept(batch, self.drained)  # after the count: the benchmark's own reads
        self.last_syncs = {"whole step": syncs.by_package}
        self.last_sync_sites = {"whole step": syncs.top()}
        stages = self.step.pruner.last_stage_seconds.to_json()
        parts["adapter"] -= sum(stages.values())  # drain, share, rebuild: the rest of it
        self.last_breakdown = {k: round(v, 3) for k, v in {**stages, **parts}.items()}


def adapter_runner(model, opt, args, preset) -> AdapterRunner:
    return AdapterRunner(model, opt, args, preset)


def megatron_lm_micro_batches(batch: dict, seq_length: int, micro_batch_size: int,
                              packed: bool) -> list[dict]:
    """The step's micro-batches as Megatron-LM's GPT / SFT DataLoader collates them: one sample
    per row of `seq_length` positions (zero-padded, loss mask 0), or `--sft` packed rows
    (first-fit, `cu_seqlens`, micro-batch size 1)."""
    from q_tuning.megatron_lm.batches import RowFormat, num_micro_batches, plan_rows, \
        samples_to_rows

    tokens, masks = batch["tokens"], batch["loss_masks"]
    if not packed:  # a plain row is exactly seq_length positions: the sample is padded to it
        pad = [seq_length + 1 - t.numel() for t in tokens]
        tokens = [torch.nn.functional.pad(t, (0, n)) for t, n in zip(tokens, pad)]
        masks = [torch.nn.functional.pad(m, (0, n)) for m, n in zip(masks, pad)]
    samples = {"tokens": tokens, "loss_masks": [m.float() for m in masks],
               "labels": [t[1:] for t in tokens],
               "position_ids": [torch.arange(t.numel() - 1) for t in tokens]}
    rows = plan_rows([t.numel() - 1 for t in tokens], seq_length=seq_length, packed=packed)
    keys = ("tokens", "labels", "loss_mask", "position_ids") + \
        (("cu_seqlens", "max_seqlen") if packed else ())
    dtypes = {"tokens": torch.long, "labels": torch.long, "loss_mask": torch.float32,
              "position_ids": torch.long, "cu_seqlens": torch.int32, "max_seqlen": torch.int32}
    fmt = RowFormat(keys=keys, micro_batch_size=micro_batch_size, seq_length=seq_length,
                    packed=packed, dtypes=dtypes, attention_mask=None)
    return samples_to_rows(samples, rows, fmt, num_micro_batches(len(rows), micro_batch_size))


def megatron_lm_forward_step(data_iterator, model):
    """`pretrain_gpt.py`'s forward step in miniature, for megatron-core's local attention on CPU:
    packed rows get a block-causal mask from their `cu_seqlens` (transformer-engine would take
    them as THD instead), plain rows the causal one."""
    from q_tuning.passes.microbatch import block_causal_mask

    mb = next(data_iterator)
    b, s = mb["tokens"].shape
    segment = torch.zeros(b, s, dtype=torch.long)
    if "cu_seqlens" in mb:
        bounds = mb["cu_seqlens"][0].long()
        segment[0] = torch.bucketize(torch.arange(s), bounds[1:], right=True)
    out = megatron_model_call(model, mb, block_causal_mask(segment))

    def loss_func(mask, output):
        total = (output.float() * mask).sum()
        count = mask.count_nonzero().to(torch.int)
        return total, count, {"lm loss": torch.stack([total.detach(), count.float()])}

    return out, partial(loss_func, mb["loss_mask"])


def megatron_model_call(model, mb: dict, attention_mask: torch.Tensor):
    return model(mb["tokens"], mb["position_ids"], attention_mask, labels=mb["labels"])
