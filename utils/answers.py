"""Answer extraction and grading for GSM8K and MATH / MATH500.

Pipeline for one model response::

    response --extract_boxed--> prediction   (content of the LAST \\boxed{...})
    reference --reference_answer--> gold     (gsm8k: the answer string itself;
                                              math: last box of the solution)
    is_equiv(gold, prediction, match_fn_type)

Two matchers are available (``MATCH_FNS``):

- ``strict``: string equality after stripping surrounding whitespace (empty matches nothing).
- ``symbolic``: both sides go through :func:`normalize_answer`, then Math-Verify
  decides: ``verify(parse("$" + gold + "$"), parse("$" + pred + "$"))``, gold first
  (Math-Verify's comparison is not symmetric in every case, e.g. for sets/intervals).
  Any exception or timeout inside Math-Verify counts as "not equivalent".

Which phenomena are handled where (checked against math_verify 0.9.0):

- Handled by Math-Verify itself (kept there, not duplicated): ``\\frac{2}{4}`` vs
  ``0.5``; ``\\dfrac``/``\\tfrac``; ``\\$18``; ``18\\%`` vs ``18`` (and vs ``0.18``:
  Math-Verify accepts both readings of a percentage, so ``%`` is deliberately NOT
  stripped here, stripping would lose the ``0.18`` reading); ``18\\text{ dollars}``,
  ``5\\mbox{ cm}``, ``5 \\mathrm{cm}``; ``^\\circ``; ``1,450,000`` and ``10,\\!000``;
  interval endpoints ``(-\\infty, 2]`` vs ``(-\\infty, 2)``; sets/tuples ``1,2,3``.
- Not handled (or handled inconsistently) by Math-Verify, hence in
  :func:`normalize_answer`: trailing plain-word units (``18 dollars`` parses as the
  product ``18*a*d*o*l*l*r*s``; ``7 cookies`` likewise), a whole-answer
  ``\\text{18 dollars}``, units after a number with thousands separators
  (``1,450,000 dollars`` becomes the set ``{1, 450, 0*dollars}``). ``\\$`` and bare
  ``$`` are removed as well, so that the ``$...$`` wrapper added for parsing
  stays well formed.
- Cheap, meaning-preserving rewrites also done in :func:`normalize_answer` so that
  the result does not depend on Math-Verify's internals: ``\\dfrac``/``\\tfrac`` ->
  ``\\frac``, ``^\\circ`` removed, ``{,}`` -> ``,`` and ``\\!`` removed with the
  spaces around it (needed for the thousands rule below on ``1,\\!450,\\!000``).
- Thousands separators are removed by :func:`normalize_answer` only when the WHOLE
  answer is one number whose commas separate proper 3-digit groups
  (``-1,450,000.5``). Anything else is left alone, so ``(1,234)`` stays an
  interval/tuple and ``\\{1,2,3\\}`` a set. ``1,45`` is therefore NOT read as 145:
  Math-Verify parses it as the set ``{1, 45}``, which does not match gold ``145``
  (a malformed number is graded wrong rather than guessed).
"""

from __future__ import annotations

import random
import re
import threading
from functools import lru_cache
from typing import Any, Callable

from math_verify import parse, verify

from utils.registry import choose

__all__ = [
    "DATASET_TYPES",
    "MATCH_FNS",
    "extract_boxed",
    "grade",
    "is_equiv",
    "majority_vote",
    "normalize_answer",
    "pass_at_k",
    "reference_answer",
]

# Seconds Math-Verify may spend on one parse / one comparison (main thread only).
_PARSE_TIMEOUT_S = 5
_VERIFY_TIMEOUT_S = 5


# ---------------------------------------------------------------------------
# Box extraction
# ---------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


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


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, stripped.

    Braces are balanced (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``). The brace-less
    form ``\\boxed 5`` (also ``\\boxed5``) gives the text up to the next whitespace or
    ``$``. Returns None when there is no box or the last one is not closed
    (truncated generation).
    """
    matches = list(_BOX_RE.finditer(text))
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
# Gold answers
# ---------------------------------------------------------------------------


def _gsm8k_reference(reference: str) -> str:
    return reference.strip()


def _math_reference(reference: str) -> str:
    answer = extract_boxed(reference)
    if answer is None:
        raise ValueError("math reference solution has no complete \\boxed{...}")
    return answer


DATASET_TYPES: dict[str, Callable[[str], str]] = {
    "gsm8k": _gsm8k_reference,
    "math": _math_reference,
}


def reference_answer(reference: str, dataset_type: str) -> str:
    """Gold answer string: gsm8k -> ``reference`` stripped (it is the record's
    ``answer``); math -> last box of ``reference`` (the record's ``solution``).

    Raises ValueError for an unknown ``dataset_type`` or a math solution without box.
    """
    return choose("dataset_type", dataset_type, DATASET_TYPES)(reference)


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

    Used only by the ``symbolic`` matcher (on gold and prediction alike):

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


@lru_cache(maxsize=8192)
def _parse(answer: str, parsing_timeout: int | None) -> tuple[Any, ...]:
    """Math-Verify parse of ``$answer$`` (cached: majority voting re-parses a lot)."""
    try:
        return tuple(parse(f"${answer}$", parsing_timeout=parsing_timeout))
    except Exception:  # noqa: BLE001 - a parse failure means "cannot match"
        return ()


def _strict_equiv(gold: str, pred: str) -> bool:
    return gold.strip() != "" and gold.strip() == pred.strip()  # an empty answer matches nothing


def _symbolic_equiv(gold: str, pred: str) -> bool:
    parse_timeout, verify_timeout = _timeouts()
    gold_parsed = _parse(normalize_answer(gold), parse_timeout)
    pred_parsed = _parse(normalize_answer(pred), parse_timeout)
    if not gold_parsed or not pred_parsed:
        return False
    try:
        return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=verify_timeout))
    except Exception:  # noqa: BLE001 - includes Math-Verify's TimeoutException
        return False


MATCH_FNS: dict[str, Callable[[str, str], bool]] = {
    "strict": _strict_equiv,
    "symbolic": _symbolic_equiv,
}


def is_equiv(gold: str, pred: str, match_fn_type: str = "symbolic") -> bool:
    """Whether ``pred`` matches ``gold`` under the matcher ``match_fn_type``.

    Never raises for odd answers (they compare unequal); raises ValueError for an
    unknown ``match_fn_type``.
    """
    return choose("match_fn_type", match_fn_type, MATCH_FNS)(gold, pred)


# ---------------------------------------------------------------------------
# Grading
# ---------------------------------------------------------------------------


def _prediction(response: str) -> str | None:
    """The answer of a response: its last box, None when there is none or it is empty
    (an empty box neither matches, not even an empty gold box, nor votes)."""
    return extract_boxed(response) or None


def grade(response: str, reference: str, dataset_type: str, match_fn_type: str = "symbolic") -> bool:
    """Whether the last box of ``response`` (non-empty) matches the gold answer of ``reference``."""
    match_fn = choose("match_fn_type", match_fn_type, MATCH_FNS)
    gold = reference_answer(reference, dataset_type)
    pred = _prediction(response)
    return pred is not None and match_fn(gold, pred)


def majority_vote(
    responses: list[str],
    reference: str,
    dataset_type: str,
    match_fn_type: str = "symbolic",
    rng: random.Random | None = None,
) -> bool:
    """maj@k correctness of ``responses``.

    Boxed answers are grouped into equivalence classes under ``match_fn_type`` (an
    answer joins the first class whose representative, its first member, matches
    it); unboxed responses do not vote. The largest class wins, ties broken with
    ``rng`` (default ``random.Random(0)``); returns whether its representative
    matches the gold answer. False when no response has a box.
    """
    match_fn = choose("match_fn_type", match_fn_type, MATCH_FNS)
    gold = reference_answer(reference, dataset_type)
    classes: list[list[Any]] = []  # [representative, count]
    for response in responses:
        pred = _prediction(response)
        if pred is None:
            continue
        for cls in classes:
            if match_fn(cls[0], pred):
                cls[1] += 1
                break
        else:
            classes.append([pred, 1])
    if not classes:
        return False
    top = max(count for _, count in classes)
    tied = [rep for rep, count in classes if count == top]
    winner = (rng if rng is not None else random.Random(0)).choice(tied)
    return match_fn(gold, winner)


def pass_at_k(
    responses: list[str], reference: str, dataset_type: str, match_fn_type: str = "symbolic"
) -> bool:
    """pass@k: whether any response is graded correct."""
    choose("match_fn_type", match_fn_type, MATCH_FNS)
    reference_answer(reference, dataset_type)
    return any(grade(r, reference, dataset_type, match_fn_type) for r in responses)
