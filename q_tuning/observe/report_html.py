"""The HTML page of `q-tuning-analyze`: example samples per quadrant, their response tokens
shaded by NLL, Q2 samples' pruned tokens struck through.

Public API:
    pick_examples(rows, per_quadrant, seed) -> {quadrant: [sample index]}
    token_pieces(tokenizer, ids) -> [text of each token]
    write_html(path, tokenizer, samples, rows, summary, picks, tokens, figure="eu_plane.png")
"""

from __future__ import annotations

import html
import math
import pathlib
import random
from typing import Sequence

from q_tuning.observe.plot import QUADRANT_COLORS, QUADRANT_NAMES as LONG_NAMES

__all__ = ["pick_examples", "token_pieces", "write_html"]


def pick_examples(rows: list[dict], per_quadrant: int, seed: int) -> dict[int, list[int]]:
    """Up to `per_quadrant` sample indices per quadrant (1-4), drawn with `seed`, in data order.
    For Q2 only kept samples (those whose tokens are pruned)."""
    rng = random.Random(seed)
    picks = {}
    for q in (1, 2, 3, 4):
        pool = [r["index"] for r in rows if r["quadrant"] == q and (q != 2 or r["kept"])]
        picks[q] = sorted(rng.sample(pool, min(per_quadrant, len(pool))))
    return picks


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text of each token, such that their concatenation is the decoded sequence.

    Decodes growing prefixes (so spaces and merges are those of the whole text); a token ending
    inside a multi-byte character gets "" and the character goes to the token completing it.
    """
    pieces, emitted = [], 0
    for i in range(len(ids)):
        text = tokenizer.decode(ids[:i + 1], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd") and i + 1 < len(ids):
            pieces.append("")
            continue
        pieces.append(text[emitted:])
        emitted = len(text)
    return pieces


_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; }
table.summary { border-collapse: collapse; font-size: 14px; }
table.summary td, table.summary th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
.legend span { margin-right: 14px; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 8px 10px; margin: 10px 0;
        background: #fff; }
.card h3 { font-size: 13px; margin: 0 0 6px 0; font-weight: 600; }
.badge { display: inline-block; padding: 0 6px; border-radius: 8px; color: #fff; font-size: 12px; }
.text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12.5px;
        line-height: 1.55; word-break: break-word; }
.ctx { color: #999; }
del.pruned { color: #c00; text-decoration: line-through; text-decoration-thickness: 2px;
             background: #fde2e2; }
details summary { cursor: pointer; color: #555; font-size: 12px; }
.grid { display: grid; grid-template-columns: repeat(3, minmax(0, 1fr)); gap: 14px; }
.grid > div > h2 { margin-top: 0; }
"""


def _heat(nll: float) -> str:
    """Background for a target token: orange, stronger with its NLL (saturating at 6 nats)."""
    alpha = min(max(nll, 0.0) / 6.0, 1.0) * 0.45
    return f"background: rgba(230, 159, 0, {alpha:.2f})"


def _response_html(pieces: list[str], tokens: dict, first: int) -> str:
    parts = []
    for t in range(first, len(pieces)):
        text = html.escape(pieces[t])
        if not text:
            continue
        if not tokens["target"][t]:
            parts.append(f'<span class="ctx">{text}</span>')
            continue
        nll = tokens["nll"][t]
        tip = f"NLL {nll:.2f}, PPL {math.exp(min(nll, 700.0)):.3g}"
        if tokens["pruned"][t]:
            parts.append(f'<del class="pruned" title="pruned: {tip}">{text}</del>')
        else:
            parts.append(f'<span style="{_heat(nll)}" title="{tip}">{text}</span>')
    return "".join(parts)


def _card(tokenizer, sample, row: dict, tokens: dict, colors: dict) -> str:
    ids = sample.tokens.tolist()
    pieces = token_pieces(tokenizer, ids)
    mask = sample.loss_mask.tolist()
    first = next((t for t, m in enumerate(mask) if m), len(ids))
    prompt = html.escape("".join(pieces[:first]))
    q = row["quadrant"]
    pruned = sum(tokens["pruned"])
    fate = (f"kept, {row['kept_tokens']}/{row['response_tokens']} response tokens trained "
            f"({pruned} pruned)" if q == 2 else
            "kept whole" if row["kept"] else "dropped")
    return (f'<div class="card"><h3><span class="badge" style="background:{colors[q]}">'
            f'Q{q}</span> sample {row["index"]} · {html.escape(str(row["id"]))} · '
            f'PPL {row["ppl"]:.3g} · entropy {row["entropy"]:.3g} · {fate}</h3>'
            f'<details><summary>prompt ({first} tokens)</summary><div class="text ctx">{prompt}'
            f'</div></details><div class="text">{_response_html(pieces, tokens, first)}</div>'
            "</div>")


def write_html(path: pathlib.Path, tokenizer, samples, rows: list[dict], summary: dict,
               picks: dict[int, list[int]], tokens: dict[int, dict], *,
               figure: str = "eu_plane.png") -> None:
    """The page; `tokens` as `q_tuning.sft.analyze.statistics.example_tokens` returns them, `figure` the
    EU-plane PNG beside it."""
    cfg = summary["config"]
    counts = summary["quadrant_counts"]
    fates = {1: "dropped", 2: "kept, tokens pruned", 3: "dropped", 4: "kept whole"}
    table = "".join(f"<tr><td>{html.escape(LONG_NAMES[q])}</td><td>{counts[f'Q{q}']}</td>"
                    f"<td>{fates[q]}</td></tr>" for q in (1, 2, 3, 4))
    if summary.get("thresholds"):
        t = summary["thresholds"]
        level = (f"level a* = {summary['level']:.4g}; Q2 corner: PPL >= "
                 f"{t['q2_ppl_floor']:.4g}, entropy <= {t['q2_entropy_ceiling']:.4g}; Q4 corner: "
                 f"PPL <= {t['q4_ppl_ceiling']:.4g}, entropy >= {t['q4_entropy_floor']:.4g}")
    else:
        level = (f"selection in {summary['selection_batches']} batches of "
                 f"{summary['selection_batch_size']} samples; per-batch thresholds in "
                 "summary.json")

    def cards(q: int) -> str:
        found = "".join(_card(tokenizer, samples[i], rows[i], tokens[i], QUADRANT_COLORS)
                        for i in picks[q])
        return found or "<p><i>no sample in this quadrant</i></p>"

    side = "".join(f"<div><h2>{html.escape(LONG_NAMES[q])} ({fates[q]})</h2>{cards(q)}</div>"
                   for q in (1, 3, 4))
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Q-Tuning analysis</title><style>{_CSS}</style></head>
<body>
<h1>Q-Tuning analysis</h1>
<p>{html.escape(str(summary['model']))} on {html.escape(', '.join(summary['data']))}:
{summary['num_samples']} samples, sample keep ratio {cfg['sample_keep_ratio']:g}, token keep ratio
{cfg['token_keep_ratio']:g} (Q2), neighbour lambda {cfg['neighbor_lambda']:g}.
Kept {summary['kept_samples']} samples and {summary['kept_tokens']} of
{summary['response_tokens']} response tokens; {summary['unplaceable_samples']} unplaceable.
{level}.</p>
<table class="summary"><tr><th>quadrant</th><th>samples</th><th>fate</th></tr>{table}</table>
<p><img src="{figure}" alt="EU plane" style="max-width: 800px; width: 100%"></p>
<p class="legend"><span><del class="pruned">struck through</del>: pruned token (left out of the
loss, kept as context)</span><span><span style="{_heat(3.0)}">shaded</span>: response token,
darker = higher NLL</span><span class="ctx">grey: context, not trained</span>
<span>hover a token for its NLL / PPL</span></p>
<h2>{html.escape(LONG_NAMES[2])}: a sample of kept Q2 responses, pruned tokens struck through</h2>
{cards(2)}
<h2>Q1 / Q3 / Q4 side by side</h2>
<div class="grid">{side}</div>
</body></html>
"""
    path.write_text(page, encoding="utf-8")
