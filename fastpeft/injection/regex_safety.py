"""User regular expressions matched against module names, refused when they can backtrack catastrophically.

PEFT's ``target_modules`` (a str), ``exclude_modules``, ``layers_pattern``,
``modules_to_save`` and the keys of ``rank_pattern`` / ``alpha_pattern`` are
regular expressions run by Python's backtracking ``re``. A pattern such as
``(a+)+b`` or ``(.*a){20}`` takes exponential time on a name that almost
matches, and PEFT hangs on it. Module names are short, so the only danger is
that exponential shape: a quantified group whose body can match one piece of
text in more than one way, i.e. a repeat (``*``, ``+``, ``{m,n}`` with n > 1)
nested in another, or an alternation inside a repeat whose alternatives can
start with the same character. ``check_regex`` refuses those with a
ValueError naming the argument, before anything is matched; every other
pattern compiles as before.
"""
from __future__ import annotations

import re
from re import _constants as sre
from re import _parser as sre_parse

_REPEATS = (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT)


def check_regex(what: str, pattern: str) -> re.Pattern:
    """``re.compile(pattern)``; ValueError naming ``what`` when it is invalid or can backtrack exponentially."""
    try:
        compiled = re.compile(pattern)
        parsed = sre_parse.parse(pattern)
    except re.error as exc:
        raise ValueError(f"{what} is not a valid regular expression: {exc}") from None
    problem = _ambiguity(list(parsed), inside_repeat=False)
    if problem is not None:
        raise ValueError(f"{what} {pattern!r} can take exponential time to match ({problem}); "
                         "rewrite it without nested quantifiers, e.g. a list of module names")
    return compiled


def _ambiguity(items, inside_repeat: bool):
    """A description of the first exponential shape in a parsed pattern, or None."""
    for op, av in items:
        if op in _REPEATS:
            _, high, body = av
            repeats = high is sre.MAXREPEAT or high > 1
            if repeats and inside_repeat and _can_match_text(body):
                return "a quantifier inside a quantified group"
            found = _ambiguity(list(body), inside_repeat or repeats)
        elif op is sre.SUBPATTERN or op is sre.ATOMIC_GROUP:
            found = _ambiguity(list(av[-1] if op is sre.SUBPATTERN else av), inside_repeat)
        elif op is sre.BRANCH:
            if inside_repeat and _alternatives_overlap(av[1]):
                return "an alternation whose alternatives may start alike, inside a quantified group"
            found = next((f for alt in av[1] if (f := _ambiguity(list(alt), inside_repeat))), None)
        elif op in (sre.ASSERT, sre.ASSERT_NOT):
            found = _ambiguity(list(av[1]), inside_repeat)
        elif op is sre.GROUPREF_EXISTS:
            found = next((f for alt in av[1:] if alt is not None and (f := _ambiguity(list(alt), inside_repeat))),
                         None)
        else:
            found = None
        if found is not None:
            return found
    return None


def _can_match_text(body) -> bool:
    """True when a repeat's body is more than empty/zero-width (``(a*)*`` matters, ``(\\b)*`` does not)."""
    low, high = body.getwidth()
    return high > 0


def _alternatives_overlap(alternatives) -> bool:
    """True when two alternatives may start with the same character (or one can match nothing)."""
    firsts = []
    for alt in alternatives:
        alt = list(alt)
        if not alt or alt[0][0] is not sre.LITERAL:
            return True  # empty, or not a plain character: cannot tell cheaply, so treated as overlapping
        firsts.append(alt[0][1])
    return len(set(firsts)) != len(firsts)
