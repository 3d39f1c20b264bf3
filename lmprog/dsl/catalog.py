"""What the language knows by name: keywords, input types, built-in functions, constraints and distributions,
with their parameters (the inference strategies and their parameters are in :mod:`lmprog.catalog`).

These tables are the single source of truth for the parser (keywords), the checker (names, arity, argument
types, did-you-mean suggestions) and the lowering (defaults of strategy and distribution parameters), and are
documented in ``docs/language.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmprog.catalog import Param

#: Words that cannot be used as names (statement keywords, operators, literals).
KEYWORDS = frozenset({
    "model", "infer", "input", "import", "as", "let", "sample", "condition", "factor", "observe", "return",
    "gen", "where", "if", "elif", "else", "for", "in", "and", "or", "not", "matches", "true", "false",
})

#: Statement keywords, for "did you mean" on a misspelt statement.
STATEMENT_KEYWORDS = ("model", "infer", "input", "import", "let", "sample", "condition", "factor", "observe",
                      "return", "gen", "if", "for", "system", "user", "assistant")

#: Types an ``input`` may declare.
INPUT_TYPES = ("str", "int", "float", "bool", "list")

#: Python spellings a user may reach for, and the .lmp spelling.
PYTHON_SPELLINGS = {"True": "true", "False": "false", "None": None}

#: Shorthand regexes of ``is_int`` / ``is_float`` (the constraint compiler and host checks use these).
IS_INT_REGEX = r"-?[0-9]+"
IS_FLOAT_REGEX = r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"

#: Comparison operators a count bound may use (``!=`` is not a bound).
COUNT_OPS = ("<", "<=", "==", ">=", ">")
#: Count functions usable in constraints (``tokens(X) <= N``) and in expressions.
COUNTERS = ("tokens", "len", "words")



@dataclass(frozen=True)
class Builtin:
    """A built-in function: parameter names (``required`` of them mandatory), or any number if ``varargs``."""

    name: str
    params: tuple[str, ...]
    required: int
    returns: str  # 'str', 'int', 'float', 'bool', 'list', 'any', or 'same' (the type of the first argument)
    varargs: bool = False
    doc: str = ""


BUILTINS: dict[str, Builtin] = {b.name: b for b in (
    Builtin("len", ("x",), 1, "int", doc="length of a string (characters) or a list"),
    Builtin("tokens", ("s",), 1, "int", doc="number of tokens of a string under the model's tokenizer"),
    Builtin("words", ("s",), 1, "int", doc="number of whitespace-separated words"),
    Builtin("int", ("x",), 1, "int", doc="int(x) as in Python"),
    Builtin("float", ("x",), 1, "float", doc="float(x) as in Python"),
    Builtin("str", ("x",), 1, "str", doc="str(x) as in Python"),
    Builtin("lower", ("s",), 1, "str", doc="s.lower()"),
    Builtin("upper", ("s",), 1, "str", doc="s.upper()"),
    Builtin("strip", ("s", "chars"), 1, "str", doc="s.strip(chars)"),
    Builtin("split", ("s", "sep"), 1, "list", doc="s.split(sep)"),
    Builtin("join", ("items", "sep"), 1, "str", doc='sep.join(items); sep defaults to ""'),
    Builtin("contains", ("s", "sub"), 2, "bool", doc="sub in s"),
    Builtin("startswith", ("s", "prefix"), 2, "bool", doc="s.startswith(prefix)"),
    Builtin("endswith", ("s", "suffix"), 2, "bool", doc="s.endswith(suffix)"),
    Builtin("count", ("s", "sub"), 2, "int", doc="s.count(sub) (strings and lists)"),
    Builtin("min", (), 1, "any", varargs=True, doc="min(list) or min(a, b, ...)"),
    Builtin("max", (), 1, "any", varargs=True, doc="max(list) or max(a, b, ...)"),
    Builtin("abs", ("x",), 1, "same", doc="abs(x)"),
    Builtin("log", ("x", "base"), 1, "float", doc="natural log (or log to base)"),
    Builtin("exp", ("x",), 1, "float", doc="e ** x"),
    Builtin("logprob", ("hole",), 1, "float", doc="LM log-probability of a hole as generated"),
    Builtin("logprob_of", ("text", "given"), 2, "float",
            doc="log-probability of text after the context given= under the program's model (M.logprob_of: "
                "under the model declared as M)"),
)}

#: Names of the constraint forms written as calls (``matches`` and ``in`` are operators).
CONSTRAINT_CALLS = ("stop_at", "stop_before", "is_int", "is_float", "contains", "startswith", "endswith",
                    "grammar", "json")
#: Every constraint spelling, for did-you-mean.
CONSTRAINT_WORDS = ("matches", "in", *CONSTRAINT_CALLS, *COUNTERS)
CONSTRAINT_HELP = ('a constraint is one of: X matches r"...", X in ["a", ...], stop_at(X, "S"), '
                   'stop_before(X, "S"),\ntokens(X) <= N, len(X) <= N, words(X) <= N, is_int(X), is_float(X), '
                   'contains(X, "S"),\nstartswith(X, "S"), endswith(X, "S"), grammar(X, "f.lark"), '
                   'json(X, schema="f.json"), h.pred(X)')


@dataclass(frozen=True)
class Distribution:
    name: str
    params: tuple[Param, ...]
    returns: str  # value type: 'int', 'float', 'bool', or 'element' (of the choice list)


DISTRIBUTIONS: dict[str, Distribution] = {d.name: d for d in (
    Distribution("choice", (Param("items", "list", required=True), Param("probs", "list")), "element"),
    Distribution("uniform_int", (Param("lo", "int", required=True), Param("hi", "int", required=True)), "int"),
    Distribution("bernoulli", (Param("p", "float", required=True, low=0, high=1),), "bool"),
    Distribution("poisson", (Param("rate", "float", required=True, low=0, open_low=True),), "int"),
    Distribution("categorical", (Param("probs", "list", required=True),), "int"),
    Distribution("normal", (Param("mu", "float", required=True),
                            Param("sigma", "float", required=True, low=0, open_low=True)), "float"),
    Distribution("beta", (Param("a", "float", required=True, low=0, open_low=True),
                          Param("b", "float", required=True, low=0, open_low=True)), "float"),
)}

DEFAULT_MODEL = "smollm2-135m"
