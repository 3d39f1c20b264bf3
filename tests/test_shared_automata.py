"""Issue 13 (resource pre-flight): holes with the same compiled constraint share one block of states in the
token table, so a loop that unrolls into N holes has a table whose size does not grow with N; results are
those of a table with one block per hole."""

from __future__ import annotations

import functools
import math

import numpy as np

import lmprog
from lmprog.compiler import lower as lower_mod
from lmprog.compiler.automaton import stack_holes
from lmprog.compiler.constraints import compile_hole
from lmprog.compiler.host_hole import stack_compiled
from lmprog.compiler.lower import lower
from lmprog.inference import Hole
from lmprog.inference.exact import enumerate_program
from test_lower import toy_lm

LOOP = '''input n: int = 3
"Q:"
for i in range(n):
    " [x]\\n" where x in ["a", "b", "ab"] and tokens(x) <= 3
return x
'''

# two constraints that repeat (x, y), one hole under a guard (z), a hole outside the loop with x's constraint
MIXED = '''"Q:"
for i in range(2):
    " [x] [y]\\n" where x in ["a", "b"] and y in ["c", "ab"]
    if i > 0:
        "Z [z]\\n" where z in ["a", "b"]
" [w]\\n" where w in ["a", "b"]
return {"x": x, "y": y, "z": z, "w": w}
'''


def _lowered(src, lm, share=True, **inputs):
    prog = lmprog.compile(src, "t.lmp")
    if share:
        return lower(prog, lm.tokenizer, inputs, default_max_tokens=8)
    orig = lower_mod.stack_compiled
    lower_mod.stack_compiled = functools.partial(stack_compiled, share=False)
    try:
        return lower(prog, lm.tokenizer, inputs, default_max_tokens=8)
    finally:
        lower_mod.stack_compiled = orig


def _starts(low):
    return [s.start for s in low.program.segments if isinstance(s, Hole)]


def test_table_of_a_loop_of_identical_holes_does_not_grow_with_the_loop():
    lm = toy_lm()
    small, big = _lowered(LOOP, lm, n=3), _lowered(LOOP, lm, n=30)
    assert small.program.table.num_states == big.program.table.num_states
    assert small.program.table.nbytes == big.program.table.nbytes
    assert big.program.table.token_class.shape[0] == 1  # one automaton for all 30 holes
    assert len(set(_starts(big))) == 1 and len(_starts(big)) == 30
    # without sharing: one block per hole
    unshared = _lowered(LOOP, lm, share=False, n=30)
    assert unshared.program.table.num_states == 30 * big.program.table.num_states
    # the structure key still names every hole's constraint (rows group as before)
    assert big.structure_key[1] == unshared.structure_key[1] and len(big.structure_key[1]) == 30


def test_distinct_constraints_keep_their_own_blocks():
    lm = toy_lm()
    a = compile_hole(None, lm.tokenizer, following_text="\n")
    b = compile_hole(None, lm.tokenizer, following_text=" ")
    a2 = compile_hole(None, lm.tokenizer, following_text="\n", cache=False)  # equal constraint, other arrays
    table, offsets = stack_holes([a, b, a2, b])
    assert offsets[0] == offsets[2] and offsets[1] == offsets[3] and offsets[0] != offsets[1]
    assert table.num_states == a.num_states + b.num_states
    alone, alone_offsets = stack_holes([a, b, a2, b], share=False)
    assert alone.num_states == 2 * (a.num_states + b.num_states)
    # the shared table behaves exactly as the unshared one from every hole's start
    for i, h in enumerate([a, b, a2, b]):
        s0, s1 = offsets[i] + h.automaton.start, alone_offsets[i] + h.automaton.start
        d0, d1 = table.dense()[s0], alone.dense()[s1]
        assert np.array_equal(d0 >= 0, d1 >= 0)
        assert np.array_equal(np.where(d0 >= 0, d0 - offsets[i], -1), np.where(d1 >= 0, d1 - alone_offsets[i], -1))


def test_shared_table_gives_the_exact_posterior_of_the_unshared_one():
    lm = toy_lm()
    shared, unshared = _lowered(MIXED, lm), _lowered(MIXED, lm, share=False)
    assert shared.program.table.num_states < unshared.program.table.num_states
    keys = shared.structure_key[1]  # every hole's constraint key: x, y, z per iteration, then w (= z's)
    assert len(keys) == 7 and len(set(keys)) == 3
    assert [int(s) for s in _starts(shared) if not callable(s)] == [0, 3, 0, 3, 7]  # z's start is guarded
    e0 = enumerate_program(lm, shared.program, max_tokens=8)
    e1 = enumerate_program(lm, unshared.program, max_tokens=8)
    assert len(e0.paths) == len(e1.paths) == 2**6  # x, y twice; z once (i = 1); w
    assert math.isclose(e0.log_z, e1.log_z, rel_tol=0, abs_tol=1e-9)
    p0, p1 = e0.probs(), e1.probs()
    assert p0.keys() == p1.keys()
    assert max(abs(p0[k] - p1[k]) for k in p0) < 1e-12


def test_shared_table_gives_the_same_run(monkeypatch):
    lm = toy_lm()
    prog = lmprog.compile(MIXED, "t.lmp")
    r0 = prog.run(lm=lm, seed=5, strategy="importance", particles=64)
    monkeypatch.setattr(lower_mod, "stack_compiled", functools.partial(stack_compiled, share=False))
    r1 = prog.run(lm=lm, seed=5, strategy="importance", particles=64)
    assert [s.text for s in r0.samples] == [s.text for s in r1.samples]
    assert [s.values for s in r0.samples] == [s.values for s in r1.samples]
    assert math.isclose(r0.log_evidence, r1.log_evidence, abs_tol=1e-5)
