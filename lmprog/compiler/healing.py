"""Token healing of a trailing space: the prompt's last space moved into the hole that follows it.

``"A: [answer]"`` would force the prompt to end in a lone space token, which BPE models almost never see
before a word (they write " Paris" as one token), and distorts the answer. The text is the same if the hole
generates " " + value instead: the prompt's trailing space is dropped and the hole's constraints are
rewritten so that the hole's language is exactly " " + (the old language) (:func:`heal_constraint`); the
value is the generated text without its first byte (``ValueRule.head == 1``). docs/running.md says where the
space stays in the prompt instead, and what exactness costs.
"""

from __future__ import annotations

from typing import Optional

from lmprog.compiler import constraint_ir as IR
from lmprog.compiler.constraints import plan_hole

__all__ = ["heal_constraint", "heal_space"]


def heal_space(ir: list, parts: list, following: str = "", *,
               program_start_without_bos: bool = False) -> Optional[list]:
    """The constraints of a hole that also generates the space ending the prompt text before it.

    ``ir``: the hole's constraints; ``parts``: the prompt text pending right before the hole, in the hole's
    branch (strings and interpolations; empty: nothing to heal); ``following``: the literal template text
    after the hole; ``program_start_without_bos``: nothing has been emitted yet outside any branch and the
    model has no BOS token.

    Returns the new constraints (``StartsWith(" ")`` plus each constraint rewritten), or None where the
    rewrite does not apply (the space then stays in the prompt): the prompt does not end in exactly one space,
    the hole's terminator (the following text or a ``stop_at``/``stop_before`` string) starts with a space
    (the generated space could then begin the terminator, so the healed hole would end at a different place:
    not exact), a constraint that cannot be rewritten (``grammar``/``json``), or a program that would then
    start with no prompt at all on a model without a BOS token. The caller drops the space from the prompt
    once the new constraints compile."""
    if not parts or not isinstance(parts[-1], str) or \
            not parts[-1].endswith(" ") or parts[-1].endswith("  "):
        return None
    try:
        term = plan_hole(ir, following or None).terminator
    except IR.ConstraintError:
        return None  # reported by compile_hole, unhealed
    if term.kind == "text" and term.text.startswith(" "):
        return None
    if program_start_without_bos and all(isinstance(p, str) for p in parts) and "".join(parts) == " ":
        return None  # the prompt would be empty and there is no BOS to condition on
    out: list = [IR.StartsWith(" ")]
    for c in ir:
        h = heal_constraint(c)
        if h is None:
            return None
        out.append(h)
    return out


def heal_constraint(c):
    """The constraint on ``" " + v`` that holds iff ``c`` holds on ``v``, given that the healed hole also
    starts with a space (the lowering adds ``StartsWith(" ")``): with ``S`` the strings starting with a space,
    ``heal(c) ∩ S == " " + L(c)`` for every ``c``, so ``not``/``and``/``or`` carry over (``S`` minus
    ``heal(c)`` is ``" "`` + the complement of ``L(c)``). None: no such rewrite (grammar, JSON)."""
    from lmprog.compiler.bytedfa import escape_regex, strip_anchors

    any_text = "(?s:.*)"
    if isinstance(c, IR.Regex):
        return IR.Regex(" (?:" + strip_anchors(c.pattern) + ")", loc=c.loc)
    if isinstance(c, IR.IsInt):
        return IR.Regex(" (?:" + IR.INT_PATTERN + ")", loc=c.loc)
    if isinstance(c, IR.IsFloat):
        return IR.Regex(" (?:" + IR.FLOAT_PATTERN + ")", loc=c.loc)
    if isinstance(c, IR.Choices):
        return IR.Choices(tuple(" " + str(x) for x in c.items), loc=c.loc)
    if isinstance(c, IR.StartsWith):
        return IR.StartsWith(" " + c.s, loc=c.loc)
    if isinstance(c, IR.Contains):
        # an occurrence of s in " " + v that is not in v would start at the added space
        if not c.s.startswith(" "):
            return c
        return IR.Regex(" " + any_text + escape_regex(c.s) + any_text, loc=c.loc)
    if isinstance(c, IR.EndsWith):
        # " " + v ends with s but v does not only if s == " " + v
        if not c.s.startswith(" "):
            return c
        return IR.Regex(" " + any_text + escape_regex(c.s), loc=c.loc)
    if isinstance(c, IR.Not):
        inner = heal_constraint(c.c)
        return None if inner is None else IR.Not(inner, loc=c.loc)
    if isinstance(c, (IR.And, IR.Or)):
        items = [heal_constraint(x) for x in c.items]
        return None if any(x is None for x in items) else type(c)(tuple(items), loc=c.loc)
    if isinstance(c, IR.Count):
        # len(" " + v) == len(v) + 1; words(" " + v) == words(v); tokens: the hole's token budget
        return IR.Count("len", c.op, c.n + 1, loc=c.loc) if c.kind == "len" else c
    if isinstance(c, IR.StopAt):
        # exact when s does not start with a space (heal_space checks): its first occurrence in " " + w is
        # one byte after its first occurrence in w
        return None if c.s.startswith(" ") else c
    return None
