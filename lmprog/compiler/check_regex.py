"""Validation of constraint regexes: syntax, the supported dialect, and emptiness.

A ``where X matches R`` regex is compiled later to a token automaton by outlines-core (Rust ``regex`` syntax),
while ``matches`` in an expression runs on the host with Python's ``re``. A constraint regex must therefore be
valid for both, and finite-automaton friendly. :func:`regex_problem` checks, in order:

1. Python ``re`` compiles it, with warnings as errors (e.g. ``[[:alpha:]]`` means different things in the two
   dialects and Python warns about it);
2. no construct a finite automaton cannot express or that the hole semantics make meaningless: lookahead /
   lookbehind, backreferences and conditionals, atomic groups and possessive quantifiers, anchors
   (``^ $ \\A \\Z``: the regex always matches the whole hole) and word boundaries (``\\b \\B``);
3. the constraint compiler's own regex -> byte DFA (:func:`lmprog.compiler.bytedfa.regex_dfa`, the one door
   through which regexes become automata) accepts it: this is the real compiler's dialect check, and an empty
   DFA means the regex matches no string at all. The checker takes the DFA unminimised (same language, much
   cheaper), and skips this step, as too slow for a check, for large bounded repetitions (of Unicode word
   classes beyond 8, of anything beyond 500 in all) and patterns over 1000 characters: the compiler then has the
   final word when the hole is compiled.

:func:`fullmatch` walks the same DFA, so the checker's emptiness tests agree with what the compiler generates.
Results are cached per pattern.
"""

from __future__ import annotations

import functools
import re
import warnings
from typing import Optional

from lmprog.compiler.bytedfa import ByteDFA, RegexError, regex_dfa

try:  # the private parser module is the only way to see the structure Python compiled
    import re._constants as _C
    import re._parser as _P
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_constants as _C  # type: ignore[no-redef]
    import sre_parse as _P  # type: ignore[no-redef]

FSA_HELP = "constraint regexes compile to a finite automaton over tokens"


@functools.lru_cache(maxsize=1024)
def python_regex_problem(pattern: str) -> Optional[tuple[str, Optional[int], Optional[str]]]:
    """(message, position in the pattern or None, help) if Python's ``re`` rejects the pattern, else None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            re.compile(pattern)
    except re.error as exc:
        return f"invalid regex: {exc.msg}", exc.pos, None
    except (Warning, RecursionError, OverflowError, ValueError, MemoryError) as exc:
        message = str(exc).split(" at position")[0] if isinstance(exc, Warning) else "too complex"
        return f"unsupported regex: {message}", None, "write the character class out, e.g. [a-zA-Z]"
    return None


@functools.lru_cache(maxsize=1024)
def regex_problem(pattern: str) -> Optional[tuple[str, Optional[int], Optional[str]]]:
    """(message, position or None, help) for a constraint regex that cannot be used, else None."""
    problem = python_regex_problem(pattern)
    if problem is not None:
        return problem
    try:
        tree = _P.parse(pattern)
    except Exception:  # compiled above, so this should not happen; do not block on it
        return None
    unsupported = _unsupported(tree, pattern)
    if unsupported is not None:
        return unsupported
    if len(pattern) > 1000 or _too_costly(tree):
        return None
    return _compiler_problem(pattern)


def _walk(tree):
    """Every (op, argument) item in a parsed pattern, without recursion."""
    stack = [tree]
    while stack:
        sub = stack.pop()
        for op, av in getattr(sub, "data", sub):
            yield op, av
            if op in (_C.MAX_REPEAT, _C.MIN_REPEAT, _C.POSSESSIVE_REPEAT):
                stack.append(av[2])
            elif op is _C.SUBPATTERN:
                stack.append(av[3])
            elif op is _C.BRANCH:
                stack.extend(av[1])
            elif op in (_C.ASSERT, _C.ASSERT_NOT):
                stack.append(av[1])
            elif op is _C.ATOMIC_GROUP:
                stack.append(av)
            elif op is _C.GROUPREF_EXISTS:
                stack.extend(x for x in av[1:] if x is not None)


def _find(pattern: str, *needles: str) -> Optional[int]:
    hits = [pattern.find(n) for n in needles if n in pattern]
    return min(hits) if hits else None


def _unsupported(tree, pattern: str) -> Optional[tuple[str, Optional[int], Optional[str]]]:
    for op, av in _walk(tree):
        if op in (_C.ASSERT, _C.ASSERT_NOT):
            return ("lookahead and lookbehind assertions are not supported in constraint regexes",
                    _find(pattern, "(?=", "(?!", "(?<=", "(?<!"),
                    f"{FSA_HELP}; use 'not', contains() or another constraint instead")
        if op in (_C.GROUPREF, _C.GROUPREF_EXISTS):
            return ("backreferences are not supported in constraint regexes",
                    _find(pattern, "(?P=", "(?(", *[f"\\{d}" for d in "123456789"]), FSA_HELP)
        if op is _C.ATOMIC_GROUP or op is _C.POSSESSIVE_REPEAT:
            return ("atomic groups and possessive quantifiers are not supported in constraint regexes",
                    _find(pattern, "(?>", "*+", "++", "?+", "}+"), "drop the '>' or the second quantifier")
        if op is _C.AT:
            if av in (_C.AT_BOUNDARY, _C.AT_NON_BOUNDARY):
                return ("word boundaries (\\b, \\B) are not supported in constraint regexes",
                        _find(pattern, "\\b", "\\B"), FSA_HELP)
            return ("anchors are not needed: a constraint regex always matches the whole hole",
                    _find(pattern, "^", "$", "\\A", "\\Z"), "remove the anchor")
    return None


_WORDISH = {_C.CATEGORY_WORD, _C.CATEGORY_NOT_WORD, _C.CATEGORY_SPACE, _C.CATEGORY_NOT_SPACE,
            _C.CATEGORY_NOT_DIGIT}


def _too_costly(tree) -> bool:
    """Whether building the byte DFA could take long (big bounded repeats, of Unicode classes above all)."""
    stack = [(tree, 1)]
    total = 0
    while stack:
        sub, mult = stack.pop()
        for op, av in getattr(sub, "data", sub):
            if op in (_C.MAX_REPEAT, _C.MIN_REPEAT):
                lo, hi, inner = av
                bound = lo if hi == _C.MAXREPEAT else hi
                inner_mult = mult * max(bound, 1)
                if inner_mult > 8 and _has_wordish(inner):
                    return True
                total += inner_mult
                stack.append((inner, inner_mult))
            elif op is _C.SUBPATTERN:
                stack.append((av[3], mult))
            elif op is _C.BRANCH:
                stack.extend((b, mult) for b in av[1])
    return total > 500


def _has_wordish(sub) -> bool:
    for op, av in _walk(sub):
        if op is _C.IN and any(o is _C.CATEGORY and a in _WORDISH for o, a in av):
            return True
        if op is _C.CATEGORY and av in _WORDISH:
            return True
    return False


def _dfa(pattern: str) -> ByteDFA:
    """The compiler's byte DFA of a pattern, unminimised (raises what :func:`regex_dfa` raises)."""
    return regex_dfa(pattern, minimal=False)


def _checkable(pattern: str) -> bool:
    """Whether building the byte DFA is cheap enough for a check (and the pattern is in the dialect)."""
    tree = _P.parse(pattern)
    return len(pattern) <= 1000 and not _too_costly(tree) and _unsupported(tree, pattern) is None


def fullmatch(pattern: str, text: str) -> Optional[bool]:
    """Whether ``text`` matches the whole constraint regex, in linear time (None when that cannot be decided).

    Walks the byte DFA the constraint compiler builds (its own dialect and semantics), so a pattern like
    ``(a|a)*b`` cannot make the checker backtrack exponentially; falls back to Python's ``re`` only for short
    strings.
    """
    try:
        dfa = _dfa(pattern) if _checkable(pattern) else None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        dfa = None
    if dfa is not None:
        return dfa.accepts(text.encode("utf-8", "surrogatepass"))
    if len(text) <= 16:  # backtracking is bounded on short strings
        try:
            return re.fullmatch(pattern, text) is not None
        except (re.error, RecursionError, OverflowError):
            return None
    return None


def _compiler_problem(pattern: str) -> Optional[tuple[str, Optional[int], Optional[str]]]:
    try:
        import outlines_core  # noqa: F401 - only to know it is there
    except ImportError:  # pragma: no cover - outlines-core is a dependency
        return None
    try:
        dfa = _dfa(pattern)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # RegexError, or a pyo3 panic (those derive from BaseException)
        text = exc.reason if isinstance(exc, RegexError) else str(exc)
        if "incompatible" in text or "no transitions" in text:
            return "this regex matches no string", None, None
        return (f"regex not supported by the constraint compiler: {text.splitlines()[0][:120]}", None,
                "constraint regexes use the common subset of Python re and Rust regex syntax")
    if not dfa.accept.any():  # every state of the unminimised DFA is reachable from the start
        return "this regex matches no string", None, None
    return None
