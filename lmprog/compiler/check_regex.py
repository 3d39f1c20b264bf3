"""Validation of constraint regexes: syntax, the supported dialect, and emptiness.

A ``where X matches R`` regex is compiled later to a token automaton, and ``matches`` in an expression walks the
same byte DFA; a regex is parsed with Python's parser and its characters compiled by outlines-core (Rust
``regex`` semantics), so it must be valid for both dialects, and finite-automaton friendly.
:func:`regex_problem` checks, in order:

1. Python ``re`` compiles it, with warnings as errors (e.g. ``[[:alpha:]]`` means different things in the two
   dialects and Python warns about it);
2. no construct a finite automaton cannot express or that the hole semantics make meaningless: lookahead /
   lookbehind, backreferences and conditionals, atomic groups and possessive quantifiers, anchors
   (``^ $ \\A \\Z``: the regex always matches the whole hole) and word boundaries (``\\b \\B``);
3. the constraint compiler's own regex -> byte DFA (:func:`lmprog.compiler.bytedfa.regex_dfa`, the one door
   through which regexes become automata) accepts it, within its bounds (:mod:`lmprog.compiler.regex_compile`:
   automaton states and build time, counted while it is built): this is the real compiler's dialect check, an
   empty DFA means the regex matches no string at all, and a bound that is hit is reported with what to write
   instead. The checker takes the DFA unminimised (same language, cheaper).

:func:`fullmatch` walks the same DFA (linear time, never backtracking), so the checker's emptiness tests and
static ``matches`` agree with what the compiler generates. Results are cached per pattern.
"""

from __future__ import annotations

import functools
import re
import warnings
from typing import Optional

from lmprog.compiler.bytedfa import ByteDFA, RegexError, regex_dfa
from lmprog.compiler.regex_compile import LIMIT_HELP, RegexLimitError

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


def _dfa(pattern: str) -> ByteDFA:
    """The compiler's byte DFA of a pattern, unminimised (raises what :func:`regex_dfa` raises)."""
    return regex_dfa(pattern, minimal=False)


def fullmatch(pattern: str, text: str) -> Optional[bool]:
    """Whether ``text`` matches the whole constraint regex, in linear time (None when that cannot be decided:
    the pattern is not a constraint regex, or its automaton is past the bounds).

    Walks the byte DFA the constraint compiler builds (its own dialect and semantics), so a pattern like
    ``(((a+)+)+)+b`` cannot make the checker backtrack exponentially: there is no fallback to Python's ``re``.
    """
    try:
        if python_regex_problem(pattern) is not None:  # (also keeps Python's FutureWarnings out of the output)
            return None
        tree = _P.parse(pattern)
        if _unsupported(tree, pattern) is not None:
            return None
        dfa = _dfa(pattern)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # RegexError, a limit, a parse error, or a pyo3 panic (those derive from BaseException)
        return None
    return dfa.accepts(text.encode("utf-8", "surrogatepass"))


def _compiler_problem(pattern: str) -> Optional[tuple[str, Optional[int], Optional[str]]]:
    try:
        dfa = _dfa(pattern)
    except (KeyboardInterrupt, SystemExit):
        raise
    except RegexLimitError as exc:
        return exc.reason, None, LIMIT_HELP
    except BaseException as exc:  # RegexError, or a pyo3 panic (those derive from BaseException)
        text = exc.reason if isinstance(exc, RegexError) else str(exc)
        if "incompatible" in text or "no transitions" in text:
            return "this regex matches no string", None, None
        return (f"regex not supported by the constraint compiler: {text.splitlines()[0][:120]}", None,
                "constraint regexes use the common subset of Python re and Rust regex syntax")
    if not dfa.accept.any():  # every state of the unminimised DFA is reachable from the start
        return "this regex matches no string", None, None
    return None
