"""q-tuning-eval's decoding pool (`q_tuning.sft.evaluate.decoding`): every row's greedy tokens equal the
slow no-cache reference while rows finish at different steps, later (longer) prompts join the
running pool, the window slides and its buffer grows; the GQA attention is bitwise transformers'
SDPA attention. A tiny random Llama, one torch thread."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from q_tuning.sft.evaluate import decoding as D  # noqa: E402
from q_tuning.sft.evaluate import cli as E  # noqa: E402
from tests.harness.hf import save_tiny_llama, slow_greedy  # noqa: E402

pytestmark = pytest.mark.next_stack  # transformers 5 regressions: .ci/run's .venv-next

WORDS = "one two three four five six seven eight nine ten".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_llama(folder, tmp_path_factory.getbasetemp() / "q_tuning_cache")
    yield E.load_model(str(folder))
    torch.set_num_threads(threads)


def prompts_for(tokenizer, lengths: list[int]) -> list[list[int]]:
    return [E.prompt_ids(tokenizer, " ".join(WORDS[k % 10] for k in range(n))) for n in lengths]


def length_order(prompts: list[list[int]]) -> list[int]:
    return sorted(range(len(prompts)), key=lambda i: len(prompts[i]))


def run_pool(model, prompts, limits, batch_size, join_rows=2, room=2):
    """decode_pool with a per-row token limit; records each admitted group and forward size."""
    out = [[] for _ in prompts]
    groups, sizes = [], []
    real_forward = model.forward

    def forward(*args, **kwargs):  # decoding steps: (rows, prompts not admitted yet)
        if kwargs["input_ids"].shape[1] == 1:
            sizes.append((kwargs["input_ids"].shape[0],
                          len(prompts) - sum(len(g) for g in groups)))
        return real_forward(*args, **kwargs)

    def admit(group):
        groups.append(list(group))
        return D.prefill(model, prompts, group)

    def finished(new):
        i = next(k for k, o in enumerate(out) if o is new)
        return len(new) >= limits[i]

    model.forward = forward
    try:
        with torch.inference_mode():
            D.decode_pool(model, length_order(prompts), out, admit=admit,
                          batch_size=batch_size, join_rows=join_rows, finished=finished,
                          room=room)
    finally:
        del model.forward
    return out, groups, sizes


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_pool_rows_equal_the_slow_reference(tiny, batch_size, monkeypatch):
    """Rows stop after 1..9 tokens, so slots free up at different steps; the longest prompt joins
    a window narrower than itself (room before the window is made); room=2 makes the buffer grow
    after the window more than once."""
    model, tokenizer = tiny
    prompts = prompts_for(tokenizer, [2, 3, 5, 8, 1, 30, 4])
    limits = [5, 1, 9, 3, 7, 6, 2]
    grown = []  # (left, right) of every reallocation
    real_reserve = D.SlotCache.reserve

    def reserve(cache, left, right):
        if cache.start < left or cache.end + right > cache.mask.shape[1]:
            grown.append((left, right))
        real_reserve(cache, left, right)

    monkeypatch.setattr(D.SlotCache, "reserve", reserve)
    out, groups, sizes = run_pool(model, prompts, limits, batch_size)
    assert grown[0][0] > 0 and any(left > 0 for left, _ in grown[1:])
    assert sum(left == 0 for left, _ in grown) >= 2
    assert [len(o) for o in out] == limits
    for prompt, limit, new in zip(prompts, limits, out):
        assert new == slow_greedy(model, prompt, limit, [])
    assert [i for g in groups for i in g] == length_order(prompts)  # joined in length order
    assert max(rows for rows, _ in sizes) <= batch_size and all(len(g) <= 2 for g in groups)


def test_a_freed_slot_takes_the_next_prompt_at_once(tiny):
    """While prompts wait, every decoding step runs a full pool; the pool shrinks only once they
    have all joined. Rows that finish on their first token (from the prompt forward) still match."""
    model, tokenizer = tiny
    prompts = prompts_for(tokenizer, [1, 2, 3, 4, 5, 6, 7, 8])
    limits = [1, 4, 1, 2, 6, 1, 3, 5]
    out, groups, sizes = run_pool(model, prompts, limits, batch_size=3)
    assert [len(o) for o in out] == limits
    for prompt, limit, new in zip(prompts, limits, out):
        assert new == slow_greedy(model, prompt, limit, [])
    assert len(groups) > 2 and all(len(g) <= 3 for g in groups)
    assert any(waiting for _, waiting in sizes)
    assert all(rows == 3 for rows, waiting in sizes if waiting)
    assert [rows for rows, waiting in sizes if not waiting] == sorted(
        [rows for rows, waiting in sizes if not waiting], reverse=True)


def test_gqa_attention_is_bitwise_sdpa(tiny):
    """Prompt forward and cached decoding steps of a left-padded batch give the same logits,
    bit for bit, with the KV heads repeated (transformers' sdpa) and without; on transformers 5
    the decoding steps (where its sdpa packs the heads instead, 2.7e-5 apart here) within 1e-4
    and with the same greedy tokens."""
    model, tokenizer = tiny
    prompts = prompts_for(tokenizer, [3, 9, 20])

    def logits():
        with torch.inference_mode():
            state = D.prefill(model, prompts, [0, 1, 2])
            seen = [state.logits]
            attention, positions = state.attention, state.positions[:, -1:]
            for _ in range(4):
                attention = torch.cat([attention, attention.new_ones((3, 1))], 1)
                positions = positions + 1
                seen.append(model(input_ids=seen[-1].argmax(-1)[:, None],
                                  attention_mask=attention, position_ids=positions,
                                  past_key_values=state.cache, use_cache=True).logits[:, -1])
            return torch.stack(seen)

    assert model.config._attn_implementation == D.GQA_ATTENTION
    fast = logits()
    model.set_attn_implementation("sdpa")
    try:
        reference = logits()
        assert torch.equal(reference[0], fast[0])  # the prompt forward
        if int(transformers.__version__.split(".")[0]) < 5:
            assert torch.equal(reference, fast)
        else:  # transformers 5's sdpa packs the GQA heads into the query at decoding steps
            torch.testing.assert_close(reference, fast, rtol=0, atol=1e-4)
            assert torch.equal(reference.argmax(-1), fast.argmax(-1))
        model.set_attn_implementation("eager")
        assert not D.use_gqa_attention(model)
        assert model.config._attn_implementation == "eager"
    finally:
        model.set_attn_implementation("sdpa")
        assert D.use_gqa_attention(model) and D.use_gqa_attention(model)
    assert model.config._attn_implementation == D.GQA_ATTENTION
