"""Step-wise arithmetic for ``arith_steps.lmp`` and ``benchmarks/bench_scaling.py``: a problem generator and an
exact process reward (``import "arith_steps.py" as a``).

A problem is a chain ``n0 op1 n1 op2 n2 ...`` of additions and subtractions, evaluated left to right; its
reference solution has one line per operation, ``"<running value> <op> <next number> = <new value>"``. The
step checker compares a generated step with the reference step of the same index: a step is correct iff it
is exactly that line (same running value, same operator and operand, the right result). So a step that
correctly continues an earlier *mistake* is still wrong: the reward judges the trajectory, not the local
arithmetic alone.
"""

from __future__ import annotations

import random
import re

__all__ = ["STEP", "answer", "make_problems", "parse", "reference_steps", "solved", "step_correct",
           "step_logreward"]

#: The form of one step line (the .lmp hole's regex is the same language).
STEP = re.compile(r"(-?[0-9]+) ([-+]) ([0-9]+) = (-?[0-9]+)")
_TOKEN = re.compile(r"[0-9]+|[-+]")


def parse(question: str) -> tuple[list[int], list[str]]:
    """``"7 + 5 - 3"`` -> ``([7, 5, 3], ["+", "-"])``."""
    parts = _TOKEN.findall(question)
    return [int(p) for p in parts[0::2]], parts[1::2]


def reference_steps(question: str) -> list[str]:
    """The correct step lines of ``question``, in order."""
    nums, ops = parse(question)
    value, steps = nums[0], []
    for op, n in zip(ops, nums[1:]):
        new = value + n if op == "+" else value - n
        steps.append(f"{value} {op} {n} = {new}")
        value = new
    return steps


def step_correct(question: str, i: int, step: str) -> bool:
    """Whether ``step`` is the correct ``i``-th step (0-based) of ``question``."""
    ref = reference_steps(question)
    return 0 <= int(i) < len(ref) and " ".join(str(step).split()) == ref[int(i)]


def step_logreward(question: str, i: int, step: str, penalty: float = 4.0) -> float:
    """The exact process reward of step ``i``, in log space: ``0`` for a correct step, ``-penalty`` otherwise
    (a step reward ``r = 1`` or ``exp(-penalty)``)."""
    return 0.0 if step_correct(question, i, step) else -float(penalty)


def answer(steps) -> str:
    """The final answer: the result of the last step line (``""`` when it is not a step)."""
    last = steps[-1] if isinstance(steps, (list, tuple)) else steps
    m = STEP.fullmatch(" ".join(str(last).split()))
    return m.group(4) if m else ""


def solved(question: str, value) -> bool:
    """Whether ``value`` (an answer string) is the correct final result."""
    return str(value).strip() == reference_steps(question)[-1].split(" = ")[1]


def make_problems(count: int, seed: int = 0, ops: int = 3, low: int = 2, high: int = 20) -> list[dict]:
    """``count`` distinct problems with ``ops`` operations on numbers in ``[low, high]``, every running value
    in ``[0, 40]`` (the model's easy range), fixed by ``seed``: ``{"question", "answer", "steps"}``."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < count:
        nums = [rng.randint(low, high) for _ in range(ops + 1)]
        signs = [rng.choice("+-") for _ in range(ops)]
        value, ok = nums[0], True
        for op, n in zip(signs, nums[1:]):
            value = value + n if op == "+" else value - n
            ok &= 0 <= value <= 40
        q = " ".join([str(nums[0])] + [f"{op} {n}" for op, n in zip(signs, nums[1:])])
        if ok and q not in seen:
            seen.add(q)
            steps = reference_steps(q)
            out.append({"question": q, "answer": steps[-1].split(" = ")[1], "steps": steps})
    return out
