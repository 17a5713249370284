"""`q-tuning-eval` / `python -m q_tuning.sft.evaluate.cli`: held-out GSM-Symbolic exact match and
reference-solution NLL of an HF checkpoint (the trainer's `--export-hf`, or a GGUF file); with
`--task mmlu | qa-exact | nll`, the tasks of `q_tuning.sft.evaluate.tasks`.

    q-tuning-eval --hf-checkpoint outputs/smollm2-gsm/hf --data-path outputs/smollm2-gsm/data/eval.jsonl \\
        --output eval.json --predictions predictions.jsonl

- accuracy: greedy decoding (KV cache; `--batch-size` rows decode together and a finished row's
  place goes to the next prompt, in prompt-length order: `q_tuning.sft.evaluate.decoding`) of the prompt
  rendered with the model's chat template exactly as the trainer renders the user turn; the
  answer is the number after the last `####`; exact match of the normalised number with the
  row's true `answer`. A sequence stops at end of turn or once its
  first `####` line (with a number) is complete; at most `--max-new-tokens` (default 256).
- NLL: teacher-forced, over exactly the tokens the trainer trains on
  (`q_tuning.sft.data.dataset.tokenize_conversation`); token-weighted corpus mean and mean per sample.
  Both share one prompt forward per row (`generate_with_nll`): the reference response runs on the
  prompt's KV cache before decoding starts from it.

Rows are `experiments.gsm.gsm_symbolic` rows (`prompt`, `response`, `answer`). Bad input ends with
one `q-tuning-eval: error: ...` line naming the file and line, exit status 2; the output JSON is
written whole (temporary file, then renamed) or not at all. Progress (rows decoded, rows/s,
tokens/s, ETA) goes to stderr: `q_tuning.observe.progress`.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Sequence

import torch

from q_tuning._files import write_text_atomic
from q_tuning.config import CommandLineParser, positive_int
from q_tuning.observe.progress import Progress
from q_tuning.sft.evaluate.rows import (EvalError, answer_complete, extract_answer,
                                        normalize_number, read_rows)
from q_tuning.sft.evaluate.tasks import (add_task_args, check_task_args, run_task,
                                         write_task_outputs)

if TYPE_CHECKING:
    from q_tuning.sft.evaluate.decoding import Prefilled

JOIN_ROWS = 16  # the most prompts that join the decoding at once (one prompt forward, one NLL)

__all__ = ["EvalError", "EvalSeconds", "answer_complete", "evaluate", "extract_answer",
           "finished", "generate_with_nll", "greedy_generate", "main", "normalize_number",
           "prompt_ids", "read_rows", "reference_nll", "RowNll", "digit_tokens",
           "samples_nll", "end_of_turn_ids", "load_model"]


def finished(tokenizer, new: Sequence[int], eos: Sequence[int], max_new_tokens: int) -> bool:
    """Has a row's generation ended? At end of turn, once its first answer line is complete
    (`answer_complete` on the decoded generated tokens only), or at the token limit."""
    return (new[-1] in eos or len(new) >= max_new_tokens
            or answer_complete(tokenizer.decode(new)))


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of the generation prompt: the chat-templated user turn and assistant header."""
    from q_tuning.sft.data.dataset import render_chat

    text = render_chat(tokenizer, [{"role": "user", "content": prompt}], "<prompt>",
                   generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _end_of_turn_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)


end_of_turn_ids = _end_of_turn_ids  # public name for the other evaluation tasks


@torch.inference_mode()
def greedy_generate(model, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int,
                    batch_size: int) -> list[list[int]]:
    """New token ids per prompt (greedy, KV cache), in the given order, each ending where
    `finished` says. Left-padded batches sorted by prompt length; a finished row leaves the batch
    and the KV cache at once, so a few rows that never write an answer line do not keep the whole
    batch decoding to the token limit (`generate` would, at about twice the cost here)."""
    from q_tuning.sft.evaluate.decoding import prefill

    eos = _end_of_turn_ids(tokenizer)
    out: list[list[int]] = [[] for _ in prompts]
    for live in _prompt_batches(prompts, batch_size):
        state = prefill(model, prompts, live)
        _decode(model, tokenizer, state, out, eos, max_new_tokens)
    return out


class EvalSeconds(NamedTuple):
    """Where `generate_with_nll`'s time goes: prompt forwards, the reference NLL (on the prompt
    cache, plus the two-pass fall-back), greedy decoding."""

    prefill: float
    nll: float
    decode: float


@torch.inference_mode()
def generate_with_nll(model, tokenizer, rows: Sequence[dict], *, max_new_tokens: int,
                      batch_size: int) -> tuple[list[list[int]], list["RowNll"], EvalSeconds]:
    """`greedy_generate` and `reference_nll` of the same rows with one prompt forward per row:
    (generated ids, NLL per row, seconds per stage).

    Decoding keeps `batch_size` rows going (`decoding.decode_pool`): prompts join in length
    order as rows finish, each group with one prompt forward. Before a group joins, its reference
    responses run on top of its prompt KV cache (teacher-forced, right-padded; the first response
    token is scored from the prompt forward's last logits), then the cache is cropped back to the
    prompts. A row whose training tokens do not start with its generation prompt, or that has a
    loss token inside the prompt, is scored by `reference_nll` instead. The arithmetic is
    `greedy_generate`'s, in other batch shapes: the same tokens wherever no two logits are within
    float32 rounding of each other (`benchmarks/bench_evaluate.py` checks both)."""
    from q_tuning.sft.evaluate.decoding import decode_pool, prefill

    prompts = [prompt_ids(tokenizer, r["prompt"]) for r in rows]
    samples = _training_tokens(tokenizer, rows)
    is_number, eos = digit_tokens(tokenizer), _end_of_turn_ids(tokenizer)
    out: list[list[int]] = [[] for _ in rows]
    nll: list[RowNll | None] = [None] * len(rows)
    clock = [time.perf_counter()]
    seconds = {"prefill": 0.0, "nll": 0.0, "decode": 0.0}

    def lap(stage: str) -> None:
        clock.append(time.perf_counter())
        seconds[stage] += clock[-1] - clock[-2]

    def admit(group: list[int]) -> "Prefilled":
        lap("decode")
        state = prefill(model, prompts, group)
        lap("prefill")
        shared = [i for i in group if _continues(samples[i], prompts[i])]
        for i, row_nll in zip(shared, _response_nll(model, state, shared, prompts, samples,
                                                    is_number)):
            nll[i] = row_nll
        lap("nll")
        return state

    with Progress("decoding", total=len(rows), unit="rows", rate_unit="tokens") as bar:
        def row_done(new: list[int]) -> bool:  # called once per generated token
            end = finished(tokenizer, new, eos, max_new_tokens)
            bar.update(int(end), extra=1)
            return end

        decode_pool(model, _length_order(prompts), out, admit=admit, batch_size=batch_size,
                    join_rows=JOIN_ROWS, finished=row_done)
    lap("decode")
    rest = [i for i, v in enumerate(nll) if v is None]
    for i, row_nll in zip(rest, reference_nll(model, tokenizer, [rows[i] for i in rest],
                                              batch_size=max(1, batch_size // 2))):
        nll[i] = row_nll
    lap("nll")
    return out, nll, EvalSeconds(**seconds)


def _continues(sample: tuple[torch.Tensor, torch.Tensor], prompt: list[int]) -> bool:
    """The training tokens start with the generation prompt and train on nothing inside it."""
    tokens, mask = sample
    n = len(prompt)
    return tokens.numel() > n and tokens[:n].tolist() == prompt and not bool(mask[1:n].any())


def _response_nll(model, state: "Prefilled", shared: list[int], prompts, samples,
                  is_number: torch.Tensor) -> list["RowNll"]:
    """NLL of the `shared` rows' responses on top of the batch's prompt cache; the cache is
    cropped back to the prompt afterwards."""
    width = state.attention.shape[1]
    if not shared:
        return []
    rows = [state.live.index(i) for i in shared]
    responses = [samples[i][0][len(prompts[i]):] for i in shared]  # [R_i]
    scored = [samples[i][1][len(prompts[i]):].bool() for i in shared]
    length = max(r.numel() for r in responses)
    ids = torch.zeros((len(state.live), length), dtype=torch.long)
    real = torch.zeros((len(state.live), length), dtype=torch.long)
    target = torch.zeros((len(state.live), length), dtype=torch.bool)  # response token k scored
    for row, resp, sc in zip(rows, responses, scored):  # right padding after the prompt
        ids[row, :resp.numel()], real[row, :resp.numel()], target[row, :resp.numel()] = resp, 1, sc
    hidden = model.get_decoder()(
        input_ids=ids, attention_mask=torch.cat([state.attention, real], 1),
        position_ids=state.positions[:, -1:] + 1 + torch.arange(length),
        past_key_values=state.cache, use_cache=True).last_hidden_state  # [b, R, h]
    extra = state.cache.get_seq_length() - width
    if extra > 0:  # transformers 5's crop takes only a negative count (4.57: a length or that)
        state.cache.crop(-extra)
    head = model.get_output_embeddings()
    first = torch.nn.functional.cross_entropy(state.logits.float(), ids[:, 0], reduction="none")
    later = torch.zeros(ids.shape, dtype=torch.float64)
    later[:, 1:][target[:, 1:]] = torch.nn.functional.cross_entropy(
        head(hidden[:, :-1][target[:, 1:]]).float(), ids[:, 1:][target[:, 1:]],
        reduction="none").double()
    later[:, 0] = first.double()
    return [_row_nll(later[row][target[row]], is_number[ids[row][target[row]]]) for row in rows]


def _row_nll(values: torch.Tensor, digits: torch.Tensor) -> "RowNll":
    return RowNll(float(values.sum()), values.numel(), float(values[digits].sum()),
                  int(digits.sum()))


def _length_order(prompts: Sequence[list[int]]) -> list[int]:
    return sorted(range(len(prompts)), key=lambda i: len(prompts[i]))


def _prompt_batches(prompts: Sequence[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches of `batch_size`, sorted by prompt length."""
    order = _length_order(prompts)
    return [order[first:first + batch_size] for first in range(0, len(order), batch_size)]


def _decode(model, tokenizer, state: "Prefilled", out: list[list[int]], eos: Sequence[int],
            max_new_tokens: int) -> None:
    """Greedy tokens from a prefilled batch into `out` until every row is `finished`."""
    live, cache, attention, positions, logits = state
    while True:
        tokens = logits.argmax(-1).tolist()
        keep = []
        for row, (i, token) in enumerate(zip(live, tokens)):
            out[i].append(token)
            if not finished(tokenizer, out[i], eos, max_new_tokens):
                keep.append(row)
        if not keep:
            return
        if len(keep) < len(live):
            index = torch.tensor(keep)
            cache.batch_select_indices(index)
            attention, positions = attention[index], positions[index]
            live, tokens = [live[r] for r in keep], [tokens[r] for r in keep]
        ids = torch.tensor(tokens)[:, None]
        attention = torch.cat([attention, attention.new_ones((len(live), 1))], dim=1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


class RowNll(NamedTuple):
    """NLL over one row's loss tokens, also split out for the tokens that contain a digit."""

    sum: float
    count: int
    number_sum: float
    number_count: int


def digit_tokens(tokenizer) -> torch.Tensor:
    """Bool [vocab]: the token's text contains a digit (the "number tokens" of an NLL split)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([any(ch.isdigit() for ch in (p or "")) for p in pieces])


@torch.inference_mode()
def reference_nll(model, tokenizer, rows: Sequence[dict], *, batch_size: int) -> list[RowNll]:
    """NLL per row over the trainer's loss tokens of prompt + response (`samples_nll`)."""
    return samples_nll(model, _training_tokens(tokenizer, rows), digit_tokens(tokenizer),
                       batch_size=batch_size)


@torch.inference_mode()
def samples_nll(model, samples: Sequence[tuple[torch.Tensor, torch.Tensor]],
                is_number: torch.Tensor, *, batch_size: int) -> list[RowNll]:
    """NLL per (tokens, loss mask) sample over its loss tokens (mask[t] = 1: token t is scored,
    predicted from tokens[:t]). Samples go through in length order (little padding) and the
    output layer runs on the loss positions only: no [tokens, vocab] logits for the prompts."""
    _check_plain_output_layer(model)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    order = sorted(range(len(samples)), key=lambda i: samples[i][0].numel())
    results: list[RowNll] = [RowNll(0.0, 0, 0.0, 0)] * len(samples)
    for first in range(0, len(order), batch_size):
        chunk = order[first:first + batch_size]
        width = max(samples[i][0].numel() for i in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)  # position t predicts t + 1
        for row, i in enumerate(chunk):  # right padding
            tokens, mask = samples[i]
            n = tokens.numel()
            ids[row, :n], attention[row, :n] = tokens, 1
            labels[row, :n - 1], scored[row, :n - 1] = tokens[1:], mask[1:].bool()
        hidden = decoder(input_ids=ids, attention_mask=attention).last_hidden_state
        nll = torch.nn.functional.cross_entropy(head(hidden[scored]).float(), labels[scored],
                                                reduction="none").double()
        number = is_number[labels[scored]]
        counts = scored.sum(1).tolist()
        for i, part, digits, count in zip(chunk, nll.split(counts), number.split(counts), counts):
            results[i] = RowNll(float(part.sum()), count, float(part[digits].sum()),
                                int(digits.sum()))
    return results


def _check_plain_output_layer(model) -> None:
    for key in ("final_logit_softcapping", "logit_scale"):
        if getattr(model.config, key, None):
            raise EvalError(f"--hf-checkpoint: a model with {key} (logits are not the output "
                            "layer of the last hidden state) is not supported")


def _training_tokens(tokenizer, rows: Sequence[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, loss mask) of prompt + reference response, exactly as the trainer tokenizes."""
    from q_tuning.sft.data.dataset import tokenize_conversation

    return [tokenize_conversation(tokenizer, [{"role": "user", "content": r["prompt"]},
                                              {"role": "assistant", "content": r["response"]}],
                                  source=r.get("_source", f"row {i}"))
            for i, r in enumerate(rows)]


def load_model(path: str):
    """(model, tokenizer) from an HF folder or a GGUF file, float32, eval mode, local files; SDPA
    attention without copying the KV heads (`decoding.use_gqa_attention`)."""
    from transformers import AutoModelForCausalLM

    from q_tuning.sft.hf.assets import load_tokenizer
    from q_tuning.sft.evaluate.decoding import use_gqa_attention
    from q_tuning.sft.hf.model import resolve_checkpoint

    try:  # the tokenizer first: a folder without one fails before the (slow) weights load
        folder, gguf = resolve_checkpoint(path)
        tokenizer = load_tokenizer(path)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(f"--hf-checkpoint: {e}") from None
    kwargs = {"dtype": torch.float32, "local_files_only": True}
    if gguf:
        kwargs["gguf_file"] = gguf
    with Progress(f"loading the model from {path}"):
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs).eval()
    use_gqa_attention(model)
    return model, tokenizer


def evaluate(checkpoint: str, data_path: str, *, num_samples: Optional[int] = None,
             batch_size: int = 64, max_new_tokens: int = 256,
             predictions: Optional[str] = None) -> dict[str, Any]:
    rows = read_rows(data_path, num_samples)
    model, tokenizer = load_model(checkpoint)
    _check_plain_output_layer(model)
    generated, nll, seconds = generate_with_nll(model, tokenizer, rows,
                                                max_new_tokens=max_new_tokens,
                                                batch_size=batch_size)
    records, correct = [], 0
    for row, new, (nll_sum, count, number_sum, number_count) in zip(rows, generated, nll):
        text = tokenizer.decode(new, skip_special_tokens=True)
        predicted = extract_answer(text)
        truth = normalize_number(str(row["answer"]))
        ok = predicted is not None and truth is not None and predicted == truth
        correct += ok
        records.append({"id": row.get("id"), "answer": str(row["answer"]),
                        "predicted": None if predicted is None else str(predicted),
                        "correct": ok, "nll": nll_sum / max(count, 1), "loss_tokens": count,
                        "nll_sum": nll_sum, "number_nll_sum": number_sum,
                        "number_tokens": number_count, "generated": text})
    total_tokens = sum(r.count for r in nll)
    number_tokens = sum(r.number_count for r in nll)
    result = {
        "checkpoint": str(checkpoint), "data_path": str(data_path), "num_samples": len(rows),
        "accuracy": correct / len(rows), "correct": correct,
        "nll_per_token": sum(r.sum for r in nll) / max(total_tokens, 1),
        "nll_per_sample_mean": sum(r.sum / max(r.count, 1) for r in nll) / len(rows),
        "nll_per_number_token": sum(r.number_sum for r in nll) / max(number_tokens, 1),
        "nll_per_other_token": sum(r.sum - r.number_sum for r in nll)
        / max(total_tokens - number_tokens, 1),
        "number_tokens": number_tokens,
        "loss_tokens": total_tokens, "generated_tokens": sum(len(g) for g in generated),
        "seconds_generate": seconds.prefill + seconds.decode, "seconds_nll": seconds.nll,
        "seconds_prefill": seconds.prefill, "seconds_decode": seconds.decode,
        "max_new_tokens": max_new_tokens, "batch_size": batch_size,
    }
    if predictions:
        write_text_atomic(predictions, "".join(json.dumps(r) + "\n" for r in records))
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = CommandLineParser(prog="q-tuning-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-checkpoint", default=None,
                        help="HF folder or .gguf file (default: the installed SmolLM2-135M-Instruct "
                             "GGUF, i.e. zero-shot)")
    parser.add_argument("--data-path", required=True,
                        help="JSONL rows of the task (gsm: gsm_symbolic eval.jsonl)")
    parser.add_argument("--num-samples", type=positive_int, default=None, help="first N rows")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="rows decoded together (default 64); prompts join the decoding "
                        f"in groups of at most {JOIN_ROWS}")
    parser.add_argument("--output", default=None, help="result JSON (written atomically)")
    parser.add_argument("--predictions", default=None, help="per-sample JSONL")
    parser.add_argument("--threads", type=positive_int, default=None)
    add_task_args(parser)
    args = parser.parse_args(argv)
    check_task_args(parser, args)
    from q_tuning.sft.data.dataset import DataError

    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = args.hf_checkpoint
    try:
        if checkpoint is None:
            from q_tuning.sft.hf.assets import smollm2_gguf_path
            checkpoint = str(smollm2_gguf_path())
        if args.task != "gsm":
            result, records = run_task(args, checkpoint)
        else:
            result = evaluate(checkpoint, args.data_path, num_samples=args.num_samples,
                              batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                              predictions=args.predictions)
    except (EvalError, DataError, FileNotFoundError) as e:
        print(f"q-tuning-eval: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if args.task != "gsm":
        write_task_outputs(args, result, records)
        return
    if args.output:
        write_text_atomic(args.output, json.dumps(result, indent=1))
    print(f"q-tuning-eval: {result['correct']}/{result['num_samples']} exact match "
          f"({100 * result['accuracy']:.1f}%), held-out NLL {result['nll_per_token']:.4f}/token; "
          f"prompt forwards {result['seconds_prefill']:.0f} s, NLL {result['seconds_nll']:.0f} s, "
          f"decoding {result['seconds_decode']:.0f} s",
          flush=True)


if __name__ == "__main__":
    main()
