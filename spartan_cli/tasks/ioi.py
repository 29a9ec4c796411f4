"""The ``ioi`` task: indirect object identification (Wang et al. 2022, arXiv 2211.00593).

1. Words: the IOI dataset's 99 names, 8 places and 8 objects (Redwood's ``ioi_dataset.py``, copied
   into ACDC), each kept only if it is one token with a leading space for the given tokenizer, so a
   name swapped for another keeps every prompt's length. TaskError (naming the words) if fewer than
   three names, or no place or object, survive.
2. Prompts: the 15 BABA templates and their ABBA mirrors (the first clause's two names swapped), half
   each, alternating; per prompt a random template, three distinct names A (the indirect object, IO),
   B (the subject, S, said twice: S1 and S2) and C, a place and an object. The prompt stops before the
   final " A", e.g. "When Mary and John went to the store, John gave a drink to".
3. Corruption (``ioi:CONVENTION``, default ``s2``):
   - ``s2``: S2 -> C, a third name; IO and S1 stay (EAP-IG, Hanna et al. 2024). One position changes.
   - ``abc``: IO, S1 and S2 -> three fresh names X, Y, Z, distinct from each other and from A and B
     (the IOI paper's p_ABC distribution, ACDC).
   - ``aba``: S2 -> A, the IO name (EAP-IG's ``corrupted_hard``): the right answer flips to B.
4. Metric: logit difference at the last real position, logit[" A"] - logit[" B"] (``answers`` =
   [IO id, S id] per row, EAP-IG's ``[correct_idx, incorrect_idx]``), batch mean; ``evaluate`` adds
   accuracy, the fraction of prompts whose IO logit beats the S logit.
No BOS is prepended (ACDC and the IOI dataset use none; EAP-IG prepends one): ``describe()`` says so.
"""

from __future__ import annotations

import random

from spartan_cli.errors import TaskError
from spartan_cli.tasks import (CorruptionChoice, RowMetric, Task, best_is_right, contrast_batch, encode,
                               logit_difference, pad_id, single_token)

# [B] is the subject (S1, then S2), [A] the indirect object; the prompt ends before the final [A].
BABA_TEMPLATES = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
)

NAMES = (
    "Michael", "Christopher", "Jessica", "Matthew", "Ashley", "Jennifer", "Joshua", "Amanda", "Daniel", "David",
    "James", "Robert", "John", "Joseph", "Andrew", "Ryan", "Brandon", "Jason", "Justin", "Sarah", "William",
    "Jonathan", "Stephanie", "Brian", "Nicole", "Nicholas", "Anthony", "Heather", "Eric", "Elizabeth", "Adam", "Megan",
    "Melissa", "Kevin", "Steven", "Thomas", "Timothy", "Christina", "Kyle", "Rachel", "Laura", "Lauren", "Amber",
    "Brittany", "Danielle", "Richard", "Kimberly", "Jeffrey", "Amy", "Crystal", "Michelle", "Tiffany", "Jeremy",
    "Benjamin", "Mark", "Emily", "Aaron", "Charles", "Rebecca", "Jacob", "Stephen", "Patrick", "Sean", "Erin", "Jamie",
    "Kelly", "Samantha", "Nathan", "Sara", "Dustin", "Paul", "Angela", "Tyler", "Scott", "Katherine", "Andrea",
    "Gregory", "Erica", "Mary", "Travis", "Lisa", "Kenneth", "Bryan", "Lindsey", "Kristen", "Jose", "Alexander",
    "Jesse", "Katie", "Lindsay", "Shannon", "Vanessa", "Courtney", "Christine", "Alicia", "Cody", "Allison", "Bradley",
    "Samuel",
)
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")

CORRUPTIONS = {
    "s2": "S2 replaced by a third name C; IO and S1 unchanged (EAP-IG, Hanna et al. 2024)",
    "abc": "IO, S1 and S2 replaced by three fresh distinct names (the IOI paper's p_ABC, ACDC)",
    "aba": "S2 replaced by the IO name, so the right answer flips (EAP-IG's corrupted_hard)",
}
DEFAULT_CORRUPTION = "s2"
LOGIT_DIFF = RowMetric("logit_diff", "logit[' IO'] - logit[' S'] at the last real position", "logit")
ACCURACY = RowMetric("accuracy", "the IO name's logit beats the subject's", "fraction")


def templates(prompt_type: str) -> tuple[str, ...]:
    """The 15 templates of ``prompt_type`` ("BABA" or "ABBA") with role slots {S1} {IO} {S2} {place}
    {object}, cut before the final IO name."""
    out = []
    for t in BABA_TEMPLATES:
        assert t.endswith(" [A]") and t.count("[B] and [A]") == 1, t
        first = "{S1} and {IO}" if prompt_type == "BABA" else "{IO} and {S1}"
        t = t[: -len(" [A]")].replace("[B] and [A]", first).replace("[B]", "{S2}")
        out.append(t.replace("[PLACE]", "{place}").replace("[OBJECT]", "{object}"))
    return tuple(out)


class IOITask(CorruptionChoice, Task):
    name = "ioi"
    summary = "indirect object identification (15 BABA + ABBA templates): logit diff IO - S, accuracy"
    metric_name = "logit_diff"
    metric_description = "logit[' IO'] - logit[' S'] at the last real position, mean over prompts"
    default_n = 128
    row_metrics = (LOGIT_DIFF, ACCURACY)
    corruptions = CORRUPTIONS
    default_corruption = DEFAULT_CORRUPTION

    def describe(self) -> dict:
        return {**super().describe(),
                "prompts": "15 BABA templates and their ABBA mirrors, half each; names/places/objects of the IOI "
                           "dataset kept where ' '+word is one token",
                "answers": "[IO token id, S token id] per prompt"}

    def words(self, tokenizer) -> dict[str, dict[str, int]]:
        """{"names"|"places"|"objects": {word: id of ' '+word}} for the words that are one token;
        TaskError naming the words that are not when too few are left."""
        kept, lost = {}, {}
        for kind, words in (("names", NAMES), ("places", PLACES), ("objects", OBJECTS)):
            ids = {w: single_token(tokenizer, " " + w) for w in words}
            kept[kind] = {w: i for w, i in ids.items() if i is not None}
            lost[kind] = [w for w, i in ids.items() if i is None]
        short = [kind for kind, need in (("names", 3), ("places", 1), ("objects", 1)) if len(kept[kind]) < need]
        if short:
            detail = "; ".join(f"{kind}: {', '.join(lost[kind])}" for kind in short)
            raise TaskError(f"task 'ioi' needs at least 3 names, 1 place and 1 object that are one token with a "
                            f"leading space; this tokenizer splits {detail}; use a model whose tokenizer keeps "
                            f"common English names whole (GPT-2, Llama/SmolLM2 BPEs do)")
        return kept

    def contrast(self, tokenizer, *, n: int | None = None, seed: int = 0):
        n = self.default_n if n is None else n
        if n < 1:
            raise TaskError(f"ioi: n={n!r}; ask for at least one prompt")
        words = self.words(tokenizer)
        names, places, objects = list(words["names"]), list(words["places"]), list(words["objects"])
        if self.corruption == "abc" and len(names) < 5:
            raise TaskError(f"ioi:abc needs 5 single-token names, this tokenizer keeps {len(names)}: {names}; "
                            "use ioi:s2")
        kinds = {"BABA": templates("BABA"), "ABBA": templates("ABBA")}
        rng = random.Random(seed)
        clean_rows, corrupted_rows, answers = [], [], []
        for i in range(n):
            template = rng.choice(kinds["BABA" if i % 2 == 0 else "ABBA"])
            # five names whatever the convention, so one seed gives the same clean prompts under each
            a, b, c, *fresh = rng.sample(names, min(5, len(names)))
            fill = {"place": rng.choice(places), "object": rng.choice(objects)}
            clean = template.format(IO=a, S1=b, S2=b, **fill)
            if self.corruption == "s2":
                corrupted = template.format(IO=a, S1=b, S2=c, **fill)
            elif self.corruption == "abc":  # X, Y, Z: three names none of which is A or B
                corrupted = template.format(IO=c, S1=fresh[0], S2=fresh[1], **fill)
            else:  # aba
                corrupted = template.format(IO=a, S1=b, S2=a, **fill)
            clean_ids, corrupted_ids = encode(tokenizer, clean), encode(tokenizer, corrupted)
            if len(clean_ids) != len(corrupted_ids):
                raise TaskError(f"ioi: {clean!r} and {corrupted!r} tokenise to {len(clean_ids)} and "
                                f"{len(corrupted_ids)} tokens although every name is one token; this tokenizer "
                                "merges across word boundaries, use a custom task")
            clean_rows.append(clean_ids)
            corrupted_rows.append(corrupted_ids)
            answers.append([words["names"][a], words["names"][b]])
        return contrast_batch(clean_rows, corrupted_rows, answers, pad=pad_id(tokenizer))

    def row_scores(self, last, answers):
        return logit_difference(last, answers)  # (batch,)

    def row_values(self, last, answers) -> dict:
        return {"logit_diff": logit_difference(last, answers), "accuracy": best_is_right(last, answers)}
