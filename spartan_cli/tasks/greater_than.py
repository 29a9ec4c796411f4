"""The ``greater-than`` task (Hanna, Liu, Variengien 2023, arXiv 2305.00586), as in EAP-IG's data.

1. Prompt: "The {noun} lasted from the year {XX}{YY} to the year {XX}"; the model should continue
   with a two-digit token greater than YY. No BOS is prepended (the paper prepends "<|endoftext|>",
   EAP-IG a BOS): ``describe()`` says so.
2. Single-token rule: the answer vocabulary is the 100 tokens "00".."99" (no leading space), each must
   be one token; a year Y in 1100..1799 is valid when " Y" tokenises as exactly [" XX", "YY"] (and
   " XX01" as [" XX", "01"], for the corruption); within each century the first and the last valid
   year are dropped (as ``get_valid_years`` does). Nouns (the paper's 120) are kept where " noun" is
   one token, so every prompt has the same length.
3. Sampling (``balanced``): YY cycles through 02..98, and each prompt takes a random valid year with
   that YY and a random noun.
4. Corruption: YY -> "01" ("The {noun} lasted from the year {XX}01 to the year {XX}"), one position.
5. Metric: probability difference. Softmax over the whole vocabulary at the last real position, then
   PD = sum of p("yy") for yy > YY - sum for yy <= YY. ``answers`` per row: [YY, id("00"), ..,
   id("99")] (batch, 101), so a batch carries everything the metric reads.
Tokenizers that split numbers into single digits (SmolLM2, Llama 3, Qwen, Gemma ...) cannot express
the task: TaskError names the years and answer tokens that fail; a GPT-2 BPE (GPT-2, DistilGPT-2,
GPT-Neo, GPT-J) can.
"""

from __future__ import annotations

import random

from spartan_cli.errors import TaskError
from spartan_cli.tasks import RowMetric, Task, contrast_batch, encode, pad_id, show_tokens, single_token

TEMPLATE = "The {noun} lasted from the year {xx}{yy:02d} to the year {xx}"
YEARS = range(1100, 1800)  # EAP-IG's data: centuries 11..17
CORRUPT_YY = 1  # "01": almost every continuation is then greater
NOUNS = (
    "abduction", "accord", "affair", "agreement", "appraisal", "assaults", "assessment", "attack", "attempts",
    "campaign", "captivity", "case", "challenge", "chaos", "clash", "collaboration", "coma", "competition",
    "confrontation", "consequence", "conspiracy", "construction", "consultation", "contact", "contract", "convention",
    "cooperation", "custody", "deal", "decline", "decrease", "demonstrations", "development", "disagreement",
    "disorder", "dispute", "domination", "dynasty", "effect", "effort", "employment", "endeavor", "engagement",
    "epidemic", "evaluation", "exchange", "existence", "expansion", "expedition", "experiments", "fall", "fame",
    "flights", "friendship", "growth", "hardship", "hostility", "illness", "impact", "imprisonment", "improvement",
    "incarceration", "increase", "insurgency", "invasion", "investigation", "journey", "kingdom", "marriage",
    "modernization", "negotiation", "notoriety", "obstruction", "operation", "order", "outbreak", "outcome",
    "overhaul", "patrols", "pilgrimage", "plague", "plan", "practice", "process", "program", "progress", "project",
    "pursuit", "quest", "raids", "reforms", "reign", "relationship", "retaliation", "riot", "rise", "rivalry",
    "romance", "rule", "sanctions", "shift", "siege", "slump", "stature", "stint", "strikes", "study", "test",
    "testing", "tests", "therapy", "tour", "tradition", "treaty", "trial", "trip", "unemployment", "voyage", "warfare",
    "work",
)
WORKING = "a GPT-2 BPE tokenizer (GPT-2, DistilGPT-2, GPT-Neo, GPT-J), which writes ' 1352' as ' 13' + '52'"

PROB_DIFF = RowMetric("prob_diff", "p(year > YY) - p(year <= YY) over the 100 two-digit tokens", "probability")
ACCURACY = RowMetric("accuracy", "the likeliest two-digit token is greater than YY", "fraction")
YEAR_PROB = RowMetric("year_prob", "probability on the 100 two-digit tokens together", "probability")


class GreaterThanTask(Task):
    name = "greater-than"
    summary = "greater-than years (GPT-2 BPE tokenizers): probability difference, accuracy"
    metric_name = "prob_diff"
    metric_description = "sum p(yy > YY) - sum p(yy <= YY) over the tokens '00'..'99', last real position"
    default_n = 128
    row_metrics = (PROB_DIFF, ACCURACY, YEAR_PROB)
    fixed_layout = True  # one template, single-token nouns: every prompt has the same positions

    def describe(self) -> dict:
        return {**super().describe(), "corruption": "01",
                "corruption_description": "the start year's last two digits YY replaced by '01'",
                "prompts": f"{TEMPLATE!r}, years {YEARS.start}-{YEARS.stop - 1}, YY balanced over 02..98",
                "answers": "[YY, id('00'), ..., id('99')] per prompt"}

    def vocabulary(self, tokenizer) -> dict:
        """{"year_ids": 100 ids of "00".."99", "years": valid years, "nouns": {noun: id}}; TaskError
        naming the answer tokens, years and nouns that fail when the task cannot be built."""
        year_ids = {yy: single_token(tokenizer, f"{yy:02d}") for yy in range(100)}
        bad_answers = [f"{yy:02d}" for yy, i in year_ids.items() if i is None]
        centuries = {xx: single_token(tokenizer, f" {xx}") for xx in range(YEARS.start // 100, YEARS.stop // 100)}
        years, bad_years = [], []
        for year in YEARS:
            xx, yy = divmod(year, 100)
            pieces = [centuries[xx], year_ids[yy]]
            ok = None not in pieces and year_ids[CORRUPT_YY] is not None \
                and encode(tokenizer, f" {year}") == pieces \
                and encode(tokenizer, f" {xx}{CORRUPT_YY:02d}") == [centuries[xx], year_ids[CORRUPT_YY]]
            (years if ok else bad_years).append(year)
        nouns = {w: single_token(tokenizer, " " + w) for w in NOUNS}
        bad_nouns = [w for w, i in nouns.items() if i is None]
        nouns = {w: i for w, i in nouns.items() if i is not None}
        if bad_answers or not years or not nouns:
            problems = []
            if bad_answers:
                problems.append(f"{len(bad_answers)} of the 100 two-digit answers are not one token "
                                f"({', '.join(bad_answers[:8])}{' ...' if len(bad_answers) > 8 else ''}; e.g. "
                                f"{show_tokens(tokenizer, bad_answers[0])})")
            if not years:
                problems.append(f"none of the {len(YEARS)} years {YEARS.start}-{YEARS.stop - 1} splits into "
                                f"' XX' + 'YY' (e.g. {show_tokens(tokenizer, ' 1352')})")
            if not nouns:
                problems.append(f"no noun is one token (e.g. {show_tokens(tokenizer, ' ' + NOUNS[0])})")
            raise TaskError(f"task 'greater-than' cannot be expressed with this tokenizer: {'; '.join(problems)}. "
                            f"It needs {WORKING}; tokenizers that split numbers into single digits (SmolLM2, "
                            "Llama 3, Qwen, Gemma) cannot express it: use --task ioi or a custom task")
        return {"year_ids": [year_ids[yy] for yy in range(100)], "years": _trim_centuries(years), "nouns": nouns,
                "bad_years": bad_years, "bad_nouns": bad_nouns}

    def contrast(self, tokenizer, *, n: int | None = None, seed: int = 0):
        n = self.default_n if n is None else n
        if n < 1:
            raise TaskError(f"greater-than: n={n!r}; ask for at least one prompt")
        vocab = self.vocabulary(tokenizer)
        by_yy: dict[int, list[int]] = {}
        for year in vocab["years"]:
            by_yy.setdefault(year % 100, []).append(year)
        cycle = [yy for yy in range(2, 99) if yy in by_yy]
        if not cycle:
            raise TaskError(f"greater-than: no valid year with YY in 02..98 for this tokenizer; it needs {WORKING}")
        rng = random.Random(seed)
        nouns = sorted(vocab["nouns"])
        clean_rows, corrupted_rows, answers = [], [], []
        for i in range(n):
            yy = cycle[i % len(cycle)]
            xx = rng.choice(by_yy[yy]) // 100
            noun = rng.choice(nouns)
            clean = encode(tokenizer, TEMPLATE.format(noun=noun, xx=xx, yy=yy))
            corrupted = encode(tokenizer, TEMPLATE.format(noun=noun, xx=xx, yy=CORRUPT_YY))
            differ = [p for p, (a, b) in enumerate(zip(clean, corrupted)) if a != b]
            if len(clean) != len(corrupted) or len(differ) != 1 or clean[differ[0]] != vocab["year_ids"][yy]:
                raise TaskError(f"greater-than: {TEMPLATE.format(noun=noun, xx=xx, yy=yy)!r} and its '01' twin do "
                                f"not differ in the one YY token with this tokenizer; it needs {WORKING}")
            clean_rows.append(clean)
            corrupted_rows.append(corrupted)
            answers.append([yy, *vocab["year_ids"]])
        return contrast_batch(clean_rows, corrupted_rows, answers, pad=pad_id(tokenizer))

    def row_scores(self, last, answers):
        p, greater = _year_probs(last, answers)
        return (p * greater).sum(1) - (p * ~greater).sum(1)  # (batch,)

    def row_values(self, last, answers) -> dict:
        p, greater = _year_probs(last, answers)
        return {"prob_diff": (p * greater).sum(1) - (p * ~greater).sum(1),
                "accuracy": greater.gather(1, p.argmax(1, keepdim=True))[:, 0].float(),
                "year_prob": p.sum(1)}


def _year_probs(last, answers):
    """(p of "00".."99" (batch, 100), whether each is greater than the row's YY (batch, 100) bool)."""
    import torch

    answers = answers.to(last.device)
    probs = last.float().softmax(-1)  # (batch, vocab): over the whole vocabulary
    p = probs.gather(1, answers[:, 1:])  # (batch, 100)
    greater = torch.arange(100, device=last.device)[None, :] > answers[:, :1]  # (batch, 100)
    return p, greater


def _trim_centuries(years: list[int]) -> list[int]:
    """Drop the first and the last valid year of each century."""
    out = []
    for century in sorted({y // 100 for y in years}):
        inside = sorted(y for y in years if y // 100 == century)
        out.extend(inside[1:-1])
    return out
