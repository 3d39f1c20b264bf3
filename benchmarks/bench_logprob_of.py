"""``logprob_of`` scoring: one batched call (shared prefix prefilled once) vs one request at a time.

    python benchmarks/bench_logprob_of.py [--model smollm2-135m] [--requests 32] [--repeats 2]

The requests are what a process reward asks of a judge: ``(f"{question}\\n{step_i}\\nIs this step correct?",
" Yes")`` for ``--requests`` distinct steps after one question (the question's tokens are the shared prefix).
Modes, each timed warm (best of ``--repeats``, after one untimed pass that compiles):

* ``batched``: ``Scorer.score(all requests)``: the shared prefix prefilled once, the rows in ``[B, T]`` blocks;
* ``one by one``: ``Scorer.score([request])`` per request (what a per-particle evaluation would do);
* ``logprobs``: ``LlamaModel.logprobs(ids)`` per request, summed over the text (the model's own log-probs,
  no prefix sharing): also the reference the batched scores are compared with (max abs difference printed).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from lmprog.backends.registry import load_model
from lmprog.backends.scoring import Scorer, encode_request


def requests(n: int) -> list[tuple[str, str]]:
    question = ("A farmer has 17 sheep and buys 25 more, then sells a third of the flock at the market. "
                "How many sheep does the farmer have left at the end of the day?")
    steps = [f"Step {i + 1}: the farmer has {17 + i} sheep, so {17 + i} + 25 = {42 + i}." for i in range(n)]
    return [(f"{question}\n{s}\nIs this step correct?", " Yes") for s in steps]


def reference(lm, reqs):
    out = []
    for c, t in reqs:
        ids, n = encode_request(lm.tokenizer, c, t)
        lp = lm.logprobs(ids)
        out.append(float(sum(lp[j - 1, ids[j]] for j in range(n, len(ids)))))
    return out


def best(fn, repeats: int) -> tuple[float, object]:
    fn()  # compile
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return min(times), value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    lm = load_model(args.model)
    reqs = requests(args.requests)
    lens = [len(encode_request(lm.tokenizer, c, t).ids) for c, t in reqs]
    print(f"{platform.machine()} {platform.processor() or ''}; model {args.model}; {len(reqs)} requests of "
          f"{min(lens)}-{max(lens)} tokens")
    sc = Scorer(lm, memo=0)  # every pass scores anew
    t_batch, got = best(lambda: sc.score(reqs), args.repeats)
    shared = sc.prefix_tokens // max(1, sc.batches * (len(reqs) - 1))
    t_one, _ = best(lambda: [Scorer(lm, memo=0).score([r])[0] for r in reqs], args.repeats)
    t_ref, want = best(lambda: reference(lm, reqs), args.repeats)
    diff = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
    print(f"shared prefix: {shared} tokens; max |batched - logprobs| = {diff:.2e}")
    print(f"{'mode':<12} {'seconds':>8} {'ratio':>6}")
    for name, t in (("batched", t_batch), ("one by one", t_one), ("logprobs", t_ref)):
        print(f"{name:<12} {t:8.2f} {t / t_batch:6.1f}")


if __name__ == "__main__":
    main()
