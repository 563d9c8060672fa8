"""The bundled task: MathInstruct-like arithmetic word problems, and plain text to pretrain on.

Everything here is a deterministic function of a seed, so `scripts/make_assets.py` remakes the
bundled files byte for byte. Sources play the role of MathInstruct's `source` column (the label
the Dirichlet partition is over). Responses carry a short rationale and end "The answer is N",
as in MathInstruct/GSM8K-style data; the rationale states the arithmetic in the words the
pretraining text uses ("We know 3 plus 4 is 7."), so fine-tuning teaches the format and where
the numbers are, and the base model's arithmetic carries over. The eval split uses number tuples that no training
example uses, so exact match measures arithmetic the model carries over, not memorised items.
The pretraining text states the same kinds of facts in stories and fact lists, never in the
instruction/response format, so a base model knows arithmetic but not the answer format.
"""

from __future__ import annotations

import zlib

import numpy as np

NAMES = ["Ana", "Ben", "Chen", "Dana", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo", "Kai", "Lea", "Max", "Nia"]
ITEMS = ["apples", "books", "coins", "cards", "pens", "shells", "stamps", "marbles", "cups", "eggs"]
SOURCES = ("addition", "subtraction", "multiplication", "division", "two_step")


def _numbers(source: str, rng: np.random.Generator) -> tuple[int, ...]:
    # Small ranges (about 500 distinct facts in all), so that a 3M-parameter base model can learn
    # them in pretraining: held-out problems need facts the base model already knows.
    if source == "addition":
        return int(rng.integers(1, 13)), int(rng.integers(1, 13))
    if source == "subtraction":
        a = int(rng.integers(5, 26))
        return a, int(rng.integers(1, a))
    if source == "multiplication":
        return int(rng.integers(2, 10)), int(rng.integers(2, 10))
    if source == "division":
        b, q = int(rng.integers(2, 10)), int(rng.integers(2, 10))
        return b * q, b
    a, b = int(rng.integers(2, 6)), int(rng.integers(2, 6))  # two_step: a packs of b, c used
    return a, b, int(rng.integers(1, a * b))


def tuples(source: str) -> list[tuple[int, ...]]:
    """Every number tuple `_numbers` can draw for a source, in order."""
    if source == "addition":
        return [(a, b) for a in range(1, 13) for b in range(1, 13)]
    if source == "subtraction":
        return [(a, b) for a in range(5, 26) for b in range(1, a)]
    if source == "multiplication":
        return [(a, b) for a in range(2, 10) for b in range(2, 10)]
    if source == "division":
        return [(b * q, b) for b in range(2, 10) for q in range(2, 10)]
    return [(a, b, c) for a in range(2, 6) for b in range(2, 6) for c in range(1, a * b)]


def is_eval_tuple(numbers: tuple[int, ...]) -> bool:
    """About one number tuple in five is held out for evaluation (a stable hash, not Python's)."""
    return zlib.crc32(repr(numbers).encode()) % 5 == 0


QUESTIONS = {  # none starts with a number: a message-initial `81` is another token than the ` 81` to copy
    "addition": "{name} has {0} {item} and gets {1} more. How many {item} does {name} have now?",
    "subtraction": "{name} had {0} {item} and gave away {1}. How many {item} are left?",
    "multiplication": "There are {0} boxes with {1} {item} in each box. How many {item} are there?",
    "division": "There are {0} {item} shared equally by {1} friends. How many {item} does each friend get?",
    "two_step": "{name} buys {0} packs of {1} {item} and uses {2} of them. How many {item} are left?",
}


def problem(source: str, numbers: tuple[int, ...], name: str, item: str) -> tuple[str, str, int]:
    """(question, response with rationale, answer). The rationale is the fact in the words of the
    pretraining text ('We know 7 plus 5 is 12.'), so fine-tuning teaches the format and reuses what
    the base model knows."""
    stated, answer = fact(source, numbers)
    question = QUESTIONS[source].format(*numbers, name=name, item=item)
    return question, f"We know {stated} {answer}. The answer is {answer}.", answer


def fact(source: str, numbers: tuple[int, ...]) -> tuple[str, int]:
    """The arithmetic behind a problem as a bare statement: ('7 plus 5 is', 12)."""
    if source == "addition":
        a, b = numbers
        return f"{a} plus {b} is", a + b
    if source == "subtraction":
        a, b = numbers
        return f"{a} minus {b} is", a - b
    if source == "multiplication":
        a, b = numbers
        return f"{a} times {b} is", a * b
    if source == "division":
        a, b = numbers
        return f"{a} divided by {b} is", a // b
    a, b, c = numbers
    return f"{a} times {b} is {a * b}, and {a * b} minus {c} is", a * b - c


def narrative(source: str, numbers: tuple[int, ...], name: str, item: str) -> str:
    """The same fact as a story (pretraining), never in the question/answer format."""
    stated, c = fact(source, numbers)
    if source == "addition":
        a, b = numbers
        story = f"{name} had {a} {item} and got {b} more, so {name} had {c} {item}."
    elif source == "subtraction":
        a, b = numbers
        story = f"{name} had {a} {item} and gave {b} away, so {c} {item} were left."
    elif source == "multiplication":
        a, b = numbers
        story = f"{a} boxes held {b} {item} each, so there were {c} {item}."
    elif source == "division":
        a, b = numbers
        story = f"{b} friends shared {a} {item}, so each got {c}."
    else:
        a, b, used = numbers
        story = f"{name} bought {a} packs of {b} {item}, {a * b} in all, and used {used}, so {c} were left."
    return f"{story} We know {stated} {c}."


def make_split(n_per_source: int, *, eval_split: bool, seed: int) -> list[dict]:
    """Examples {source, instruction, output, answer}; eval_split selects the held-out number tuples."""
    rng = np.random.default_rng([seed, int(eval_split)])
    out = []
    for source in SOURCES:
        made = 0
        while made < n_per_source:
            numbers = _numbers(source, rng)
            if is_eval_tuple(numbers) != eval_split:
                continue
            name, item = NAMES[rng.integers(len(NAMES))], ITEMS[rng.integers(len(ITEMS))]
            question, response, answer = problem(source, numbers, name, item)
            out.append({"source": source, "instruction": question, "output": response, "answer": answer})
            made += 1
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def pretraining_text(n: int, seed: int) -> list[str]:
    """The base model's 'world knowledge' over every number tuple, eval tuples included: half
    stories, half lists of bare facts ('7 plus 5 is 12. 4 times 3 is 12. ...'), which pack many
    facts into few tokens. None of it uses the question/answer format."""
    rng = np.random.default_rng([seed, 7])
    lines = []
    for i in range(n):
        if i % 2:
            facts = []
            for _ in range(6):
                source = SOURCES[rng.integers(len(SOURCES))]
                stated, c = fact(source, _numbers(source, rng))
                facts.append(f"{stated} {c}.")
            lines.append(" ".join(facts))
        else:
            source = SOURCES[rng.integers(len(SOURCES))]
            numbers = _numbers(source, rng)
            lines.append(narrative(source, numbers, NAMES[rng.integers(len(NAMES))], ITEMS[rng.integers(len(ITEMS))]))
    return lines
