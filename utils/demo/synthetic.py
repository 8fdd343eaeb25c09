"""Synthetic multi-step arithmetic word problems in the GSM8K record format.

    python dataset/synthetic.py --out_dir DIR [--num_train 2000] [--num_test 500] [--seed 0]

writes into ``DIR``

    synth_train.jsonl  synth_test.jsonl        {"problem", "solution", "answer", "prompt"}
    synth_train_eval.json                      train/eval split map (eval_ratio 0.1, seed 47)
    synth_test_eval.json                       all eval

Records are ``json.dumps(record)`` joined with "\\n" (no trailing newline), exactly like
``dataset/prepare_data.py`` writes GSM8K, so every stage script reads them with
``--dataset_type gsm8k``. ``answer`` is an integer string and the solution ends with
``The answer is \\boxed{N}.``.

Each problem is two or three small steps in words; every step combines a number below 100
with a single digit (single-digit factors and divisors, one-digit additions and subtractions),
so that a tiny model learns the arithmetic quickly and the trap is what it gets wrong.
Every template has a *trap* at its first equation: a plausible wrong operation (adding
instead of multiplying, adding what was lost, subtracting instead of dividing, ...).
:meth:`Problem.solution` writes the correct worked solution or, with ``wrong=True``, the
one that falls into the trap and carries on consistently to a wrong boxed answer. The
data files hold correct solutions only; ``utils/demo/pretrain.py`` mixes in trapped ones
(:func:`pretraining_records`) so the pretrained reference model takes the wrong branch
with some probability, decided by the operator token of its first equation.
"""

from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from utils.data.io import atomic_open, dumps_jsonl
from utils.data.problems import PROMPT
from utils.data.splits import build_split_map, write_split_map

FILES = {
    "train": ("synth_train.jsonl", "synth_train_eval.json"),
    "test": ("synth_test.jsonl", "synth_test_eval.json"),
}
# Problems of the test set come from their own random stream, so that the test set of a
# seed does not depend on --num_train.
TEST_STREAM, TRAIN_STREAM = 1_000_003, 2_000_003

NAMES = [
    ("Mia", "she"), ("Noah", "he"), ("Emma", "she"), ("Liam", "he"), ("Ava", "she"), ("Omar", "he"),
    ("Lily", "she"), ("Ben", "he"), ("Zoe", "she"), ("Leo", "he"), ("Sara", "she"), ("Sam", "he"),
    ("Nina", "she"), ("Max", "he"), ("Ella", "she"), ("Tom", "he"), ("Ruby", "she"), ("Jack", "he"),
    ("Anna", "she"), ("Eli", "he"),
]
OBJECTS = [
    "apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells", "stamps",
    "candies", "balloons", "coins", "flowers", "toys", "eggs",
]
CONTAINERS = ["bags", "boxes", "packs", "jars", "baskets"]
ACTIVITIES = [  # (verb phrase, unit, period)
    ("reads", "pages", "day"), ("bakes", "cookies", "day"), ("saves", "dollars", "week"),
    ("walks", "miles", "week"), ("plants", "trees", "day"), ("writes", "poems", "week"),
]


@dataclass(frozen=True)
class Problem:
    """One word problem with its correct and its trapped worked solution."""

    template: str
    problem: str
    steps: tuple[str, ...]  # correct solution, one sentence per step
    answer: int
    wrong_steps: tuple[str, ...]  # first step falls into the trap, the rest follows from it
    wrong_answer: int

    def solution(self, wrong: bool = False) -> str:
        steps, answer = (self.wrong_steps, self.wrong_answer) if wrong else (self.steps, self.answer)
        return "\n".join(steps) + f"\nThe answer is \\boxed{{{answer}}}."

    def record(self, wrong: bool = False) -> dict:
        """``{"problem", "solution", "answer", "prompt"}``; ``answer`` is always the correct one."""
        return {
            "problem": self.problem,
            "solution": self.solution(wrong),
            "answer": str(self.answer),
            "prompt": PROMPT.format(problem=self.problem),
        }


def _person(rng: random.Random, exclude: str | None = None) -> tuple[str, str]:
    while True:
        name, pronoun = rng.choice(NAMES)
        if name != exclude:
            return name, pronoun


# --------------------------------------------------------------------------- templates
# Each returns a Problem, or None when the drawn numbers do not fit (the caller redraws).
# Constraints: every intermediate value of both solutions is >= 0, and the wrong answer
# differs from the right one.


def _groups(rng: random.Random) -> Problem | None:
    """have + buy b groups of c - give away d.  Trap: b + c instead of b * c."""
    name, pr = _person(rng)
    obj, box = rng.choice(OBJECTS), rng.choice(CONTAINERS)
    a, b, c, d = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
    good, bad = b * c, b + c
    s, ws = a + good, a + bad
    ans, wans = s - d, ws - d
    if wans < 0 or ans == wans:
        return None
    text = (
        f"{name} has {a} {obj}. {pr.capitalize()} buys {b} {box} with {c} {obj} each. "
        f"Then {pr} gives away {d} {obj}. How many {obj} does {name} have now?"
    )

    def steps(op, bc, total, final):
        return (
            f"{name} buys {b} {op} {c} = {bc} {obj}.",
            f"Now {name} has {a} + {bc} = {total} {obj}.",
            f"After giving away {d}, {name} has {total} - {d} = {final} {obj}.",
        )

    return Problem("groups", text, steps("*", good, s, ans), ans, steps("+", bad, ws, wans), wans)


def _rate(rng: random.Random) -> Problem | None:
    """a per period for b periods, then c more.  Trap: a + b instead of a * b."""
    name, pr = _person(rng)
    verb, unit, period = rng.choice(ACTIVITIES)
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
    good, bad = a * b, a + b
    ans, wans = good + c, bad + c
    if ans == wans:
        return None
    base = verb[:-1] if verb.endswith("s") else verb
    text = (
        f"{name} {verb} {a} {unit} every {period} for {b} {period}s. "
        f"Then {pr} {verb} {c} more {unit}. How many {unit} does {name} {base} in total?"
    )

    def steps(op, first, final):
        return (
            f"In {b} {period}s {name} {verb} {a} {op} {b} = {first} {unit}.",
            f"In total {name} {verb} {first} + {c} = {final} {unit}.",
        )

    return Problem("rate", text, steps("*", good, ans), ans, steps("+", bad, wans), wans)


def _more_than(rng: random.Random) -> Problem | None:
    """other has b more (fewer) than a, then finds c more.  Trap: the opposite sign."""
    name, _ = _person(rng)
    other, pr = _person(rng, exclude=name)
    obj = rng.choice(OBJECTS)
    a, b, c = rng.randint(10, 60), rng.randint(2, 9), rng.randint(2, 9)
    more = rng.random() < 0.5
    good, bad = (a + b, a - b) if more else (a - b, a + b)
    ans, wans = good + c, bad + c
    word = "more" if more else "fewer"
    text = (
        f"{name} has {a} {obj}. {other} has {b} {word} {obj} than {name}. "
        f"Then {other} finds {c} more {obj}. How many {obj} does {other} have now?"
    )

    def steps(op, m, final):
        return (
            f"{other} has {a} {op} {b} = {m} {obj}.",
            f"After finding {c} more, {other} has {m} + {c} = {final} {obj}.",
        )

    good_op, bad_op = ("+", "-") if more else ("-", "+")
    return Problem("more_than", text, steps(good_op, good, ans), ans, steps(bad_op, bad, wans), wans)


def _times_as_many(rng: random.Random) -> Problem | None:
    """other has k times as many as a, then gives d away.  Trap: a + k instead of a * k."""
    name, _ = _person(rng)
    other, pr = _person(rng, exclude=name)
    obj = rng.choice(OBJECTS)
    a, k = rng.randint(2, 9), rng.randint(2, 9)
    good, bad = a * k, a + k
    d = rng.randint(1, min(9, good, bad))
    ans, wans = good - d, bad - d
    if ans == wans:
        return None
    text = (
        f"{name} has {a} {obj}. {other} has {k} times as many {obj} as {name}. "
        f"Then {other} gives {d} {obj} to {name}. How many {obj} does {other} have now?"
    )

    def steps(op, m, final):
        return (
            f"{other} has {a} {op} {k} = {m} {obj}.",
            f"After giving {d} away, {other} has {m} - {d} = {final} {obj}.",
        )

    return Problem("times_as_many", text, steps("*", good, ans), ans, steps("+", bad, wans), wans)


def _share(rng: random.Random) -> Problem | None:
    """a shared equally among b friends, each gets c more.  Trap: a - b instead of a / b."""
    name, pr = _person(rng)
    obj = rng.choice(OBJECTS)
    b, q, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
    a = b * q
    good, bad = q, a - b
    ans, wans = good + c, bad + c
    if ans == wans:
        return None
    text = (
        f"{name} has {a} {obj} and shares them equally among {b} friends. "
        f"Then each friend gets {c} more {obj}. How many {obj} does each friend have?"
    )

    def steps(op, each, final):
        return (
            f"Each friend gets {a} {op} {b} = {each} {obj}.",
            f"Then each friend has {each} + {c} = {final} {obj}.",
        )

    return Problem("share", text, steps("/", good, ans), ans, steps("-", bad, wans), wans)


def _lost_found(rng: random.Random) -> Problem | None:
    """had a, lost b, found c.  Trap: a + b (adds what was lost)."""
    name, pr = _person(rng)
    obj = rng.choice(OBJECTS)
    a, b, c = rng.randint(10, 60), rng.randint(2, 9), rng.randint(2, 9)
    good, bad = a - b, a + b
    ans, wans = good + c, bad + c
    text = (
        f"{name} had {a} {obj}. {pr.capitalize()} lost {b} of them and then found {c} more. "
        f"How many {obj} does {name} have now?"
    )

    def steps(op, left, final):
        return (
            f"After losing {b}, {name} has {a} {op} {b} = {left} {obj}.",
            f"After finding {c} more, {name} has {left} + {c} = {final} {obj}.",
        )

    return Problem("lost_found", text, steps("-", good, ans), ans, steps("+", bad, wans), wans)


TEMPLATES: dict[str, Callable[[random.Random], Problem | None]] = {
    "groups": _groups,
    "rate": _rate,
    "more_than": _more_than,
    "times_as_many": _times_as_many,
    "share": _share,
    "lost_found": _lost_found,
}


def sample_problem(rng: random.Random) -> Problem:
    """One problem from a uniformly chosen template (redrawing numbers that do not fit)."""
    make = TEMPLATES[rng.choice(sorted(TEMPLATES))]
    while True:
        problem = make(rng)
        if problem is not None:
            return problem


def iter_problems(seed: int, exclude: Iterable[str] = ()) -> Iterable[Problem]:
    """An endless stream of problems with distinct texts (none in ``exclude``), deterministic by seed."""
    rng = random.Random(seed)
    seen = set(exclude)
    while True:
        problem = sample_problem(rng)
        if problem.problem not in seen:
            seen.add(problem.problem)
            yield problem


def sample_problems(n: int, seed: int, exclude: Iterable[str] = ()) -> list[Problem]:
    """``n`` problems with distinct texts, none in ``exclude``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    stream = iter_problems(seed, exclude)
    return [next(stream) for _ in range(n)]


def generate_problems(n: int, seed: int, exclude: Iterable[str] = ()) -> list[dict]:
    """``n`` records ``{"problem", "solution", "answer", "prompt"}`` with correct solutions."""
    return [problem.record() for problem in sample_problems(n, seed, exclude)]


def generate_splits(num_train: int, num_test: int, seed: int) -> dict[str, list[dict]]:
    """``{"train": [...], "test": [...]}``: disjoint by problem text, test drawn first."""
    test = generate_problems(num_test, seed * 7919 + TEST_STREAM)
    train = generate_problems(num_train, seed * 7919 + TRAIN_STREAM, exclude=[r["problem"] for r in test])
    return {"train": train, "test": test}


def pretraining_records(
    n: int, seed: int, wrong_rate: float, exclude: Iterable[str] = ()
) -> list[tuple[dict, bool]]:
    """``n`` pretraining examples ``(record, took_wrong_branch)`` on fresh problems (none in ``exclude``).

    With probability ``wrong_rate`` (independently per example) the record's solution is the
    trapped one; its ``answer`` stays the correct one.
    """
    if not 0.0 <= wrong_rate <= 1.0:
        raise ValueError(f"wrong_rate must be in [0, 1], got {wrong_rate}")
    rng = random.Random(seed * 7919 + 3_000_017)
    out = []
    for problem in sample_problems(n, seed * 7919 + 4_000_037, exclude):
        wrong = rng.random() < wrong_rate
        out.append((problem.record(wrong), wrong))
    return out


_FIRST_EQUATION = re.compile(r"(\d+)\s*([-+*/])\s*(\d+)\s*=")


def first_equation(text: str) -> tuple[str, str, str] | None:
    """``(left operand, operator, right operand)`` of the first ``x op y =`` in ``text``."""
    match = _FIRST_EQUATION.search(text)
    return match.groups() if match else None


def took_wrong_branch(response: str, gold_solution: str) -> bool:
    """Whether ``response`` departs from ``gold_solution`` at its first equation (the trap).

    Compares the first ``x op y =`` of both: a different operator or operand (or no
    equation at all) counts as the wrong branch.
    """
    return first_equation(response) != first_equation(gold_solution)


def write_synthetic_dataset(out_dir: str | Path, num_train: int, num_test: int, seed: int) -> dict[str, Path]:
    """Write the four files (see the module docstring) into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    splits = generate_splits(num_train, num_test, seed)
    paths = {}
    for part, records in splits.items():
        data_name, map_name = FILES[part]
        split_map = build_split_map([r["problem"] for r in records], 0.1 if part == "train" else None, seed=47)
        with atomic_open(out_dir / data_name) as handle:
            handle.write(dumps_jsonl(records))
        write_split_map(out_dir / map_name, split_map)
        paths[part] = out_dir / data_name
        paths[f"{part}_eval"] = out_dir / map_name
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", type=str, required=True, help="folder of the four files")
    parser.add_argument("--num_train", type=int, default=2000, help="training problems")
    parser.add_argument("--num_test", type=int, default=500, help="test problems")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problems")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    if args.num_train < 0 or args.num_test < 0:
        raise ValueError("--num_train and --num_test must be >= 0")
    paths = write_synthetic_dataset(args.out_dir, args.num_train, args.num_test, args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main(parse_args())
