"""Compile cost of ``json(X, schema=...)`` on the default model's vocabulary (SmolLM2, 49152 tokens).

    python benchmarks/bench_json.py [--repeat 3] [--tokenizer smollm2-135m] [--particles 64] [--steps 30]

For a typical 8-property record schema and for ``json(X)`` (any JSON value, depth <= 3), prints the cold
in-process times (no cache) of: schema -> regex (``lmprog.compiler.structured``), regex -> minimal byte DFA,
and the whole ``compile_hole`` (token automaton over the vocabulary, terminator, counters), best of
``--repeat``. Then the record schema standalone (:func:`standalone`): lmprog's device and host paths, llguidance
alone (its own ``LLTokenizer`` from the ``tokenizers`` JSON) and outlines-core alone (``Index`` + a ``Guide`` per
particle), compile time and per-token mask / advance time at ``--particles`` random walks. Plain tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string", "format": "email"},
        "born": {"type": "string", "format": "date"},
        "country": {"type": "string", "maxLength": 40},
        "field": {"enum": ["science", "art", "politics", "sport", "music"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
        "alive": {"type": "boolean"},
    },
    "required": ["name", "age", "field"],
    "additionalProperties": False,
}


def best(fn, repeat):
    times = []
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tokenizer", default="smollm2-135m")
    ap.add_argument("--particles", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)

    from lmprog.backends.registry import load_tokenizer
    from lmprog.compiler import bytedfa, structured
    from lmprog.compiler.constraint_ir import JsonSchema
    from lmprog.compiler.constraints import compile_hole
    from lmprog.compiler.vocab_index import vocab_info

    tok = load_tokenizer(args.tokenizer)
    t0 = time.perf_counter()
    vocab_info(tok)
    print(f"tokenizer index (once per process): {time.perf_counter() - t0:.2f} s")
    rows = []
    for label, schema in (("record schema (8 properties)", SCHEMA), ("json(X): any value, depth 3", True)):
        def to_regex():
            structured._schema_regex_cached.cache_clear()
            return structured.schema_regex(schema)

        def to_dfa():
            bytedfa._minimal_regex_dfa.cache_clear()
            bytedfa._cached_build.cache_clear()
            return bytedfa.regex_dfa(structured.schema_regex(schema))

        def to_hole():
            structured._schema_regex_cached.cache_clear()
            bytedfa._minimal_regex_dfa.cache_clear()
            bytedfa._cached_build.cache_clear()
            from lmprog.compiler import constraints

            constraints._LANGUAGE_CACHE.clear()
            text = json.dumps(schema) if schema is not True else ""
            return compile_hole([JsonSchema("s.json" if text else "", text)], tok, following_text="\n", cache=False)

        t_re, regex = best(to_regex, args.repeat)
        t_dfa, dfa = best(to_dfa, args.repeat)
        t_hole, hole = best(to_hole, args.repeat)
        rows.append((label, f"{t_re * 1e3:.1f} ms", f"{t_dfa * 1e3:.0f} ms", f"{t_hole:.2f} s",
                     f"{dfa.num_states} / {hole.num_states}", f"{len(regex)}"))
    head = ("schema", "-> regex", "-> byte DFA", "compile_hole", "DFA / token states", "regex chars")
    width = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, width)))

    print()
    standalone(tok, SCHEMA, args.particles, args.steps)


def _pick(rng, packed, vocab):
    """One random allowed token per row of packed ``[P, V/32]`` int32 masks (-1: none allowed)."""
    bits = np.unpackbits(packed.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
    return np.array([rng.choice(np.flatnonzero(b)) if b.any() else -1 for b in bits])


def _outlines_vocabulary(tok):
    import outlines_core

    eos = tok.eos_ids[0]
    mapping = {}
    for i in range(len(tok.token_bytes)):
        if i == eos or i in tok.special_ids:
            continue
        b = tok.decode_bytes([i], skip_special=True)
        if b:
            mapping.setdefault(b, []).append(i)
    return outlines_core.Vocabulary(eos, mapping)


def walk(masks, advance, restart, particles, steps, vocab, seed=0):
    """``steps`` tokens of ``particles`` random walks through a constraint: ``masks()`` the packed masks of every
    particle (timed), ``advance(tokens)`` (timed), ``restart(i)`` a particle whose mask is empty or EOS-only (a
    finished value: the walk starts a new one, so every step has ``particles`` live states)."""
    rng = np.random.default_rng(seed)
    tm, ta = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        packed = masks()
        tm.append(time.perf_counter() - t0)
        toks = _pick(rng, packed, vocab)
        t0 = time.perf_counter()
        advance(toks)
        ta.append(time.perf_counter() - t0)
        for i in np.flatnonzero(toks < 0):
            restart(int(i))
    return 1e3 * float(np.median(tm)), 1e3 * float(np.median(ta))


def standalone(tok, schema, particles, steps):
    """The same schema through lmprog (device and host paths), llguidance alone (its own tokenizer from the
    ``tokenizers`` JSON, no ``transformers``; default JSON options) and outlines-core alone (regex + ``Index`` +
    one ``Guide`` per particle): compile time, first mask, per-token mask and advance time of ``particles`` states on
    the host, and lmprog's mask as the kernels call it (jitted; for the host path: callback, transfer, unpack)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_host_matcher import device_mask, host_walk

    from lmprog.automata.host import json_options
    from lmprog.compiler import bytedfa, constraints, structured

    v = len(tok.token_bytes)
    text = json.dumps(schema)
    rows = []
    structured._schema_regex_cached.cache_clear()
    bytedfa._minimal_regex_dfa.cache_clear()
    bytedfa._cached_build.cache_clear()
    constraints._LANGUAGE_CACHE.clear()
    d = device_mask(tok, schema, particles, steps)
    rows.append(("lmprog, device path (TokenTable)", d["compile_s"], None, None, None, d["jit_mask_ms"]))
    h = host_walk(tok, schema, particles, steps, restart=True)
    rows.append(("lmprog, host path (HostPool over llguidance)", h["compile_s"], None, h["mask_ms"], h["step_ms"],
                 h["jit_mask_ms"]))
    try:
        import llguidance as llg
        import llguidance.numpy as llnp

        t0 = time.perf_counter()
        lt = llg.LLTokenizer(tok.hf.to_str(), n_vocab=v, eos_token=list(tok.eos_ids))
        t_tok = time.perf_counter() - t0

        def masks(ms, buf):
            llnp.fill_next_token_bitmask_par(ex, [(m, i) for i, m in enumerate(ms)], buf)
            for e in eos:  # a finished value: restart (EOS is the end, not a walk step)
                buf.view(np.uint32)[:, e // 32] &= ~np.uint32(1 << (e % 32))
            return buf

        def advance(ms, toks):
            for m, t in zip(ms, toks):
                if t >= 0:
                    m.consume_token(int(t))

        ex = llg.LLExecutor()
        eos = set(int(e) for e in tok.eos_ids)
        for label, doc in (("default options", schema), ("lmprog's separators", dict(schema, **{
                "x-guidance": json_options()}))):
            t0 = time.perf_counter()
            proto = llg.LLMatcher(lt, llg.grammar_from("json_schema", json.dumps(doc)), log_level=0)
            t_comp = time.perf_counter() - t0
            buf = np.zeros((particles, -(-v // 32)), np.int32)
            t0 = time.perf_counter()
            llnp.fill_next_token_bitmask(proto, buf, 0)
            t_first = time.perf_counter() - t0
            ms = [proto.deep_copy() for _ in range(particles)]
            m_ms, a_ms = walk(lambda: masks(ms, buf), lambda toks: advance(ms, toks),
                              lambda i: ms.__setitem__(i, proto.deep_copy()), particles, steps, v)
            rows.append((f"llguidance alone, {label}", t_comp, 1e3 * t_first, m_ms, a_ms, None))
        print(f"llguidance's LLTokenizer from the tokenizers JSON: {t_tok:.2f} s (once per process)")
    except Exception as exc:  # not installed, or an API difference
        print(f"llguidance: skipped ({type(exc).__name__}: {exc})")
    try:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        t0 = time.perf_counter()
        ov = _outlines_vocabulary(tok)
        t_voc = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = outlines_core.Index(build_regex_from_schema(text), ov)
        t_comp = time.perf_counter() - t0
        words = -(-v // 32)
        buf = np.zeros((particles, words), np.int32)
        gs = [outlines_core.Guide(index) for _ in range(particles)]
        t0 = time.perf_counter()
        gs[0].write_mask_into(buf[0].ctypes.data, words, 4)
        t_first = time.perf_counter() - t0
        eos = tok.eos_ids[0]

        def guide_masks():
            for i, g in enumerate(gs):
                g.write_mask_into(buf[i].ctypes.data, words, 4)
            buf.view(np.uint32)[:, eos // 32] &= ~np.uint32(1 << (eos % 32))  # a finished value: restart
            return buf

        def guide_advance(toks):
            for g, t in zip(gs, toks):
                if t >= 0:
                    g.advance(int(t), return_tokens=False)

        def restart(i):
            gs[i] = outlines_core.Guide(index)

        m_ms, a_ms = walk(guide_masks, guide_advance, restart, particles, steps, v)
        rows.append(("outlines-core alone", t_comp, 1e3 * t_first, m_ms, a_ms, None))
        print(f"outlines-core's Vocabulary from the token bytes: {t_voc:.2f} s (once per process)")
    except Exception as exc:
        print(f"outlines-core: skipped ({type(exc).__name__}: {exc})")
    print(f"the record schema, {particles} particles, {steps} random-walk tokens (median per token):")
    head = ("", "compile s", "first mask ms", "mask ms", "advance ms", "jitted mask ms")
    print(f"{head[0]:50s} {head[1]:>9s} {head[2]:>13s} {head[3]:>8s} {head[4]:>10s} {head[5]:>14s}")
    for name, c, f, m, a, j in rows:
        fmt = (lambda x, w, p: f"{x:{w}.{p}f}" if x is not None else " " * (w - 1) + "-")
        print(f"{name:50s} {fmt(c, 9, 2)} {fmt(f, 13, 2)} {fmt(m, 8, 2)} {fmt(a, 10, 2)} {fmt(j, 14, 2)}")


if __name__ == "__main__":
    main()
