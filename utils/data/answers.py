"""Answer extraction and grading for GSM8K and MATH / MATH500, as the original's
``accuracy_utils.py`` does it (checked against ``shared/golden/accuracy.json``, computed
by the original with math_verify 0.7.0; pinned in requirements.txt).

Pipeline for one model response, ``match_fn_type`` choosing (extractor, comparer)::

    response --process_sample--> prediction  (content of the LAST box; '' if none)
    reference --reference_answer--> gold     (gsm8k: the answer string as is;
                                              math: last box of the solution)
    is_equiv(gold, prediction, match_fn_type)

Matchers (``MATCH_FNS``, chosen with ``--match_fn_type``), each an (extractor, comparer):

- ``symbolic`` (default): the original's, nothing added. Extraction
  (:func:`extract_boxed`, for predictions and MATH golds alike): the text between the
  braces of the last ``\\boxed{``, as is: not stripped (``\\boxed{ 5 }`` gives `` 5 ``);
  no ``\\fbox``, ``\\boxed {5}`` or ``\\boxed 5``; every brace counts, escaped ones too.
  Comparison, the original's ``numeric_or_symbolic_correctness``:
  ``verify(gold=parse("$" + gold + "$"), target=parse("$" + pred + "$"))`` with
  Math-Verify 0.7.0. So ``\\boxed{ 5.4 \\text{ cents} }`` is wrong against the gold
  ``5.4 \\text{ cents}`` (0.7.0 drops a ``\\text{...}`` unit only at the very end, so
  it reads ``5.4*cents``), while ``\\boxed{ 18 }`` is right against ``18``. The
  comparison is not symmetric: gold ``(-\\infty,2)`` rejects ``x<2``, gold ``x<2``
  accepts ``(-\\infty,2)``; gold ``50\\%`` accepts ``0.5`` but not ``50`` (math_verify
  0.9.0 accepts both). Any exception or timeout counts as "not equivalent".
- ``strict``: the original's extraction and ``sample_match_strict``, string equality
  (nothing stripped: `` 18 `` does not match ``18``; an empty answer matches nothing).
- ``symbolic_normalized`` (not the original; never the default): the project's former
  grader. Extraction (:func:`extract_boxed_tolerant`): the last ``\\boxed{...}`` or
  ``\\fbox{...}`` (also ``\\boxed {...}`` and ``\\boxed 5``), stripped, escaped braces
  not counted. Comparison: :func:`normalize_answer` on both sides, then Math-Verify as
  ``symbolic``. :func:`normalize_answer` removes ``\\$``/``$``, plain-word and
  ``\\text{...}`` units after a number (``18 dollars``, which Math-Verify parses as the
  product ``18*a*d*o*l*l*r*s``), thousands separators of a whole-answer number
  (``1,450,000``; malformed groups such as ``1,45`` are left alone), ``^\\circ``, ``\\!``
  and ``{,}``, and rewrites ``\\dfrac``/``\\tfrac`` to ``\\frac``. Percent signs are left
  to Math-Verify.

An empty prediction (no box, an unclosed last box, or an empty box) matches nothing,
not even an empty gold: Math-Verify parses ``$$`` to nothing. Math-Verify's 5-second
SIGALRM timeouts apply in the main thread; in other threads grading runs without one
(0.7.0 would otherwise fail every parse there; see :func:`_thread_aware_timeout`).

maj@k (:func:`majority_vote`), as the original's ``equivalence_partition`` and
``compute_majority_vote_correct``: every prediction, ``''`` included, goes into the
first class whose representative (its first member) relates to it, where
relation(representative, new) = ``match_fn(gold=new, pred=representative)`` (note the
order: a later ``x<2`` joins an earlier ``(-\\infty,2)``, not the reverse). ``''``
relates to nothing, so each ``''`` is a class of its own, and can tie. The largest
class wins; a tie is broken at random among the tied classes (the original uses
``np.random.choice``; here a ``random.Random`` is passed, so that results are
reproducible), or, with ``strict_tie_breaking``, any tie counts as wrong. The vote is
correct when the winner's representative is graded correct against gold.
pass@k (:func:`pass_at_k`): any response graded correct.
"""

from __future__ import annotations

import random
import re
import threading
from functools import lru_cache
from typing import Any, Callable, NamedTuple

import math_verify.grader
import math_verify.parser
import math_verify.utils
from math_verify import parse, verify

from utils.registry import choose

__all__ = [
    "DATASET_TYPES",
    "MATCH_FNS",
    "Matcher",
    "equivalence_partition",
    "extract_boxed",
    "extract_boxed_tolerant",
    "grade",
    "is_equiv",
    "majority_vote",
    "normalize_answer",
    "pass_at_k",
    "process_sample",
    "reference_answer",
]

# Seconds Math-Verify may spend on one parse / one comparison (main thread only).
_PARSE_TIMEOUT_S = 5
_VERIFY_TIMEOUT_S = 5


# ---------------------------------------------------------------------------
# Box extraction
# ---------------------------------------------------------------------------

_BOX_OPEN = "\\boxed{"


def extract_boxed(text: str) -> str | None:
    """The original's extraction: the text between the braces of the last ``\\boxed{``, as is.

    Only ``\\boxed{`` opens a box (not ``\\boxed {``, ``\\fbox{`` or ``\\boxed 5``). Every
    brace after it counts, escaped ones too (``\\boxed{a\\}b}`` -> ``a\\``), so nested
    braces balance (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``). The content is not
    stripped. Returns None when there is no box or the last one is not closed (truncated
    generation).
    """
    start = text.rfind(_BOX_OPEN)
    if start < 0:
        return None
    start += len(_BOX_OPEN)
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


_TOLERANT_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _balanced_group(text: str, start: int) -> str | None:
    """Content of the brace group opening at ``text[start] == "{"``; None if unclosed.

    Escaped characters (``\\{``, ``\\}``, ``\\\\``) do not count as braces.
    """
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def extract_boxed_tolerant(text: str) -> str | None:
    """The project's extraction (``symbolic_normalized``): the last ``\\boxed{...}`` or
    ``\\fbox{...}`` in ``text``, stripped.

    Also ``\\boxed {...}``; escaped braces do not count (``\\boxed{a\\}b}`` -> ``a\\}b``).
    The brace-less form ``\\boxed 5`` (also ``\\boxed5``) gives the text up to the next
    whitespace or ``$``. Returns None when there is no box or the last one is not closed.
    """
    matches = list(_TOLERANT_BOX_RE.finditer(text))
    if not matches:
        return None
    pos = matches[-1].end()
    rest = text[pos:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        content = _balanced_group(text, pos + len(rest) - len(stripped))
        return None if content is None else content.strip()
    bare = re.match(r"[^\s$]+", stripped)
    return bare.group(0) if bare else None


# ---------------------------------------------------------------------------
# Normalisation and matching
# ---------------------------------------------------------------------------

_NUMBER = r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)"
_TEXT_CMD = r"\\(?:text|textrm|mbox|mathrm)\s*"
_UNIT_POWER = r"(?:\^\{?[23]\}?)?"
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# "\text{18 dollars}" as the whole answer.
_WRAPPED_RE = re.compile(rf"{_TEXT_CMD}\{{\s*({_NUMBER}\s+[A-Za-z][A-Za-z ]*)\}}")
# "18 \text{ dollars}", "18\mbox{cm}^2".
_TEXT_UNIT_RE = re.compile(rf"({_NUMBER})\s*{_TEXT_CMD}\{{\s*[A-Za-z][A-Za-z .]*\}}{_UNIT_POWER}\.?")
# "18 dollars", "12 square feet", "5 cm^2": whitespace, then words of >= 2 letters
# (so that "3 x" or "2 a" keep their variable).
_PLAIN_UNIT_RE = re.compile(rf"({_NUMBER})\s+[A-Za-z]{{2,}}(?:\s+[A-Za-z]{{2,}})*{_UNIT_POWER}\.?")
_DEGREE_RE = re.compile(r"\^\s*(?:\{\s*\\circ\s*\}|\\circ)")


def normalize_answer(s: str) -> str:
    """Light, meaning-preserving clean-up of an answer before Math-Verify.

    Used only by the ``symbolic_normalized`` matcher (on gold and prediction alike),
    never by ``symbolic`` (the original's grader):

    - remove ``\\$`` and ``$``;
    - ``\\dfrac``/``\\tfrac`` -> ``\\frac``; remove ``^\\circ``/``^{\\circ}``;
    - ``{,}`` -> ``,``; remove ``\\!`` with the spaces around it
      (MATH writes ``11,\\! 111,\\! 100``);
    - ``\\text{18 dollars}`` -> ``18 dollars``;
    - ``<number> \\text{unit words}`` and ``<number> unit words`` -> ``<number>``
      (the whole answer must have that shape; words need >= 2 letters);
    - a whole answer like ``1,450,000`` -> ``1450000`` (proper 3-digit groups only).

    Percent signs are left to Math-Verify (see the module docstring).
    """
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREE_RE.sub("", s)
    s = re.sub(r"\s*\\!\s*", "", s.replace("{,}", ","))
    s = s.strip()
    wrapped = _WRAPPED_RE.fullmatch(s)
    if wrapped:
        s = wrapped.group(1).strip()
    unit = _TEXT_UNIT_RE.fullmatch(s) or _PLAIN_UNIT_RE.fullmatch(s)
    if unit:
        s = unit.group(1)
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    return s


def _timeouts() -> tuple[int | None, int | None]:
    """Math-Verify's timeouts use SIGALRM, which only works in the main thread."""
    if threading.current_thread() is threading.main_thread():
        return _PARSE_TIMEOUT_S, _VERIFY_TIMEOUT_S
    return None, None


_LIBRARY_TIMEOUT = math_verify.utils.timeout


def _thread_aware_timeout(timeout_seconds: int | None = 10) -> Callable[[Callable], Callable]:
    """Math-Verify 0.7.0's ``timeout`` decorator in the main thread; no timeout elsewhere.

    0.7.0 always arms SIGALRM, so in a worker thread (or with ``None``) ``parse`` logs an
    error and returns nothing, i.e. every answer would be graded wrong. Main-thread
    grading is unchanged (the original's)."""
    if timeout_seconds is not None and threading.current_thread() is threading.main_thread():
        return _LIBRARY_TIMEOUT(timeout_seconds=timeout_seconds)
    return lambda func: func


# parse and verify look ``timeout`` up in their module at each call.
math_verify.parser.timeout = _thread_aware_timeout
math_verify.grader.timeout = _thread_aware_timeout


@lru_cache(maxsize=8192)
def _parse(answer: str, parsing_timeout: int | None) -> tuple[Any, ...]:
    """Math-Verify parse of ``$answer$`` (cached: majority voting re-parses a lot)."""
    try:
        return tuple(parse(f"${answer}$", parsing_timeout=parsing_timeout))
    except Exception:  # noqa: BLE001 - a parse failure means "cannot match"
        return ()


def _strict_equiv(gold: str, pred: str) -> bool:
    """The original's ``sample_match_strict``: string equality, nothing stripped."""
    return gold != "" and gold == pred  # an empty answer matches nothing


def _math_verify(gold: str, pred: str) -> bool:
    """``verify(gold=parse($gold$), target=parse($pred$))``; False on any failure."""
    if gold == "" or pred == "":  # parse("$$") is empty: matches nothing (saves a parse)
        return False
    parse_timeout, verify_timeout = _timeouts()
    gold_parsed = _parse(gold, parse_timeout)
    pred_parsed = _parse(pred, parse_timeout)
    if not gold_parsed or not pred_parsed:
        return False
    try:
        return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=verify_timeout))
    except Exception:  # noqa: BLE001 - includes Math-Verify's TimeoutException
        return False


def _symbolic_equiv(gold: str, pred: str) -> bool:
    """The original's ``numeric_or_symbolic_correctness(pred, gold)``: no normalisation."""
    return _math_verify(gold, pred)


def _symbolic_normalized_equiv(gold: str, pred: str) -> bool:
    """The project's former grader: :func:`normalize_answer` on both sides, then Math-Verify."""
    return _math_verify(normalize_answer(gold), normalize_answer(pred))


class Matcher(NamedTuple):
    """A ``--match_fn_type``: how an answer is taken from a text, and how two compare."""

    extract: Callable[[str], str | None]  # last box of a text; None without a closed one
    equiv: Callable[[str, str], bool]  # (gold, prediction)


MATCH_FNS: dict[str, Matcher] = {
    "strict": Matcher(extract_boxed, _strict_equiv),
    "symbolic": Matcher(extract_boxed, _symbolic_equiv),
    "symbolic_normalized": Matcher(extract_boxed_tolerant, _symbolic_normalized_equiv),
}


def _matcher(match_fn_type: str) -> Matcher:
    return choose("match_fn_type", match_fn_type, MATCH_FNS)


def is_equiv(gold: str, pred: str, match_fn_type: str = "symbolic") -> bool:
    """Whether ``pred`` matches ``gold`` under the matcher ``match_fn_type``.

    Never raises for odd answers (they compare unequal); raises ValueError for an
    unknown ``match_fn_type``.
    """
    return _matcher(match_fn_type).equiv(gold, pred)


def process_sample(response: str, match_fn_type: str = "symbolic") -> str:
    """The answer of a response, as the original's ``process_sample``: its last box, taken
    by the matcher's extractor; ``''`` when there is none or the last one is not closed
    (``''`` matches nothing)."""
    return _matcher(match_fn_type).extract(response) or ""


# ---------------------------------------------------------------------------
# Gold answers
# ---------------------------------------------------------------------------

# dataset_type -> (reference, the matcher's extractor) -> gold answer.
DATASET_TYPES: dict[str, Callable[[str, Callable[[str], str | None]], str]] = {
    "gsm8k": lambda reference, extract: reference,
    "math": lambda reference, extract: extract(reference) or "",
}


def reference_answer(reference: str, dataset_type: str, match_fn_type: str = "symbolic") -> str:
    """Gold answer string, as the original's: gsm8k -> ``reference`` as is (the record's
    ``answer``); math -> the last box of ``reference`` (the record's ``solution``), taken
    by the matcher's extractor, ``''`` without one, which nothing matches.

    Raises ValueError for an unknown ``dataset_type`` or ``match_fn_type``.
    """
    extract = _matcher(match_fn_type).extract
    return choose("dataset_type", dataset_type, DATASET_TYPES)(reference, extract)


# ---------------------------------------------------------------------------
# Grading
# ---------------------------------------------------------------------------


def grade(response: str, reference: str, dataset_type: str, match_fn_type: str = "symbolic") -> bool:
    """Whether the last box of ``response`` matches the gold answer of ``reference``
    (``match_fn(gold, prediction)``; no box, or an empty one, is wrong)."""
    gold = reference_answer(reference, dataset_type, match_fn_type)
    return is_equiv(gold, process_sample(response, match_fn_type), match_fn_type)


def equivalence_partition(answers: list[str], match_fn_type: str = "symbolic") -> list[list[str]]:
    """The original's ``equivalence_partition``: classes of ``answers``, in order of appearance.

    An answer joins the first class whose representative (its first member) relates to
    it, relation(representative, new) = ``match_fn(gold=new, pred=representative)``;
    otherwise it opens a new class. ``''`` relates to nothing (a class of its own each time).
    """
    equiv = _matcher(match_fn_type).equiv
    classes: list[list[str]] = []
    for answer in answers:
        for cls in classes:
            if equiv(answer, cls[0]):
                cls.append(answer)
                break
        else:
            classes.append([answer])
    return classes


def majority_vote(
    responses: list[str],
    reference: str,
    dataset_type: str,
    match_fn_type: str = "symbolic",
    rng: random.Random | None = None,
    strict_tie_breaking: bool = False,
) -> bool:
    """maj@k correctness of ``responses`` (the original's ``compute_majority_vote_correct``).

    The predictions (:func:`process_sample`, ``''`` included) are partitioned by
    :func:`equivalence_partition`; the largest class wins, a tie broken with
    ``rng.choice`` over the tied classes in order of appearance (default
    ``random.Random(0)``), or counted wrong when ``strict_tie_breaking``. Returns whether
    the winner's representative matches the gold answer. False for no responses.
    """
    gold = reference_answer(reference, dataset_type, match_fn_type)
    classes = equivalence_partition([process_sample(r, match_fn_type) for r in responses], match_fn_type)
    if not classes:
        return False
    top = max(len(cls) for cls in classes)
    tied = [cls for cls in classes if len(cls) == top]
    if strict_tie_breaking and len(tied) > 1:
        return False
    winner = (rng if rng is not None else random.Random(0)).choice(tied)
    return is_equiv(gold, winner[0], match_fn_type)


def pass_at_k(
    responses: list[str], reference: str, dataset_type: str, match_fn_type: str = "symbolic"
) -> bool:
    """pass@k: whether any response is graded correct."""
    gold = reference_answer(reference, dataset_type, match_fn_type)
    return any(is_equiv(gold, process_sample(r, match_fn_type), match_fn_type) for r in responses)
