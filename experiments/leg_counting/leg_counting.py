"""Leg-counting SFT data from reasoning-gym, with recorded noise: the data of the second
reproduction (issue 18, `experiments/leg_counting/leg_grid.py`).

Public API:
    build_leg_splits(train_size, eval_size, *, seed=0, misaligned=0.1, arithmetic=0.1)
        -> (train_rows, eval_rows)
    product_lines(animals) -> list[str]
    render_response(animals, products=None) -> str
    line_accuracy(generated, expected_lines) -> (right, total)

Prompt = the question with `gsm_symbolic.INSTRUCTION` (so `q-tuning-eval`'s "#### <number>" exact
match applies); response = a short worked solution rendered from the task's metadata:

    3 spiders have 8 legs each: 3 x 8 = 24
    1 leech has 0 legs each: 1 x 0 = 0
    Total: 24 + 0 = 24
    #### 24

Noise, training split only, fixed by `seed` and recorded per row in `noise`:
- "misaligned": the whole (clean) response of another training problem;
- "arithmetic": one or more per-animal products off by 1-5 (never negative), the total recomputed
  from the wrong products: a confidently, consistently wrong solution.
Both splits come from reasoning-gym `leg_counting` (1-4 kinds of animals, up to 5 of each), with
disjoint seeds and questions de-duplicated across the splits.
"""

from __future__ import annotations

import math
import random
import re
from typing import Any

from experiments.gsm.gsm_symbolic import SEED_STRIDE, make_prompt, unique_problems

OPTIONS = dict(min_animals=1, max_animals=4, max_instances=5)
NOISE_TYPES = ("clean", "misaligned", "arithmetic")


def _legs(animal: str) -> int:
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    return ANIMALS[animal]


def _name(animal: str, count: int) -> str:
    return animal + ("s" if count > 1 else "")  # reasoning-gym's own plural in the question


def product_lines(animals: dict[str, int], products: list[int] | None = None) -> list[str]:
    """One line per animal, `products` overriding the true ones (the arithmetic noise)."""
    lines = []
    for j, (animal, count) in enumerate(animals.items()):
        legs = _legs(animal)
        product = count * legs if products is None else products[j]
        verb = "have" if count > 1 else "has"
        lines.append(f"{count} {_name(animal, count)} {verb} {legs} legs each: "
                     f"{count} x {legs} = {product}")
    return lines


def render_response(animals: dict[str, int], products: list[int] | None = None) -> str:
    """The worked solution (module docstring); `products` as in `product_lines`."""
    if products is None:
        products = [count * _legs(a) for a, count in animals.items()]
    total = sum(products)
    return "\n".join([*product_lines(animals, products),
                      f"Total: {' + '.join(str(p) for p in products)} = {total}",
                      f"#### {total}"])


def line_accuracy(generated: str, expected_lines: list[str]) -> tuple[int, int]:
    """(lines of `expected_lines` found in `generated`, as whole lines up to spacing, total)."""
    def norm(text: str) -> str:
        return re.sub(r"\s+", " ", text).strip()

    found = {norm(line) for line in generated.splitlines()}
    return sum(norm(line) in found for line in expected_lines), len(expected_lines)


def build_leg_splits(train_size: int, eval_size: int, *, seed: int = 0, misaligned: float = 0.1,
                     arithmetic: float = 0.1) -> tuple[list[dict], list[dict]]:
    """(train_rows, eval_rows), deterministic in the arguments. Rows: prompt, response, answer,
    question, noise, id, lines (the true product lines)."""
    for name, value in (("misaligned", misaligned), ("arithmetic", arithmetic)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} noise fraction must be in [0, 1], got {value!r}")
    if misaligned + arithmetic > 1.0:
        raise ValueError("noise fractions add up to more than 1")
    train_seed = 2 * seed * SEED_STRIDE + 1
    eval_seed = train_seed + SEED_STRIDE
    seen: set[str] = set()
    eval_rows = [_row(item, eval_seed, i)
                 for i, item in unique_problems(eval_seed, eval_size, seen, "leg_counting",
                                                **OPTIONS)]
    train_rows = [_row(item, train_seed, i)
                  for i, item in unique_problems(train_seed, train_size, seen, "leg_counting",
                                                 **OPTIONS)]
    rng = random.Random(f"q_tuning.leg_counting.noise:{seed}")
    n_mis = math.floor(misaligned * train_size + 0.5)
    n_ari = math.floor(arithmetic * train_size + 0.5)
    noisy = rng.sample(range(train_size), n_mis + n_ari)
    clean_responses = [r["response"] for r in train_rows]
    for i in noisy[:n_mis]:
        other = rng.choice([j for j in range(train_size) if j != i
                            and clean_responses[j] != clean_responses[i]])
        train_rows[i].update(response=clean_responses[other], noise="misaligned")
    for i in noisy[n_mis:]:
        row = train_rows[i]
        row.update(response=render_response(row["animals"], _wrong_products(row["animals"], rng)),
                   noise="arithmetic")
    return train_rows, eval_rows


def _wrong_products(animals: dict[str, int], rng: random.Random) -> list[int]:
    """The true products with 1..all of them moved by 1-5 (staying >= 0)."""
    products = [count * _legs(a) for a, count in animals.items()]
    for j in rng.sample(range(len(products)), rng.randint(1, len(products))):
        delta = rng.randint(1, 5)
        products[j] += delta if products[j] - delta < 0 or rng.random() < 0.5 else -delta
    return products


def _row(item: dict[str, Any], rg_seed: int, index: int) -> dict[str, Any]:
    animals = dict(item["metadata"]["animals"])
    response = render_response(animals)
    if not response.endswith(f"#### {item['answer']}"):
        raise RuntimeError(f"leg_counting problem {rg_seed}/{index}: rendered total differs from "
                           f"reasoning-gym's answer {item['answer']}")
    return {"prompt": make_prompt(item["question"]), "response": response,
            "answer": str(item["answer"]), "question": item["question"], "noise": "clean",
            "id": f"leg_counting/{rg_seed}/{index}", "animals": animals,
            "lines": product_lines(animals)}
