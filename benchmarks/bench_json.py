"""Compile cost of ``json(X, schema=...)`` on the default model's vocabulary (SmolLM2, 49152 tokens).

    python benchmarks/bench_json.py [--repeat 3] [--tokenizer smollm2-135m]

For a typical 8-property record schema and for ``json(X)`` (any JSON value, depth <= 3), prints the cold
in-process times (no cache) of: schema -> regex (``lmprog.compiler.structured``), regex -> minimal byte DFA,
and the whole ``compile_hole`` (token automaton over the vocabulary, terminator, counters), best of
``--repeat``. Then, where installed, the same schema by outlines-core alone (``build_regex_from_schema`` and
its ``Index`` over the vocabulary) and by llguidance (grammar compile + first mask). Prints a plain table.
"""

from __future__ import annotations

import argparse
import json
import time

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

    text = json.dumps(SCHEMA)
    try:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        t_re, regex = best(lambda: build_regex_from_schema(text), args.repeat)
        vocab = outlines_core.Vocabulary.from_pretrained if False else None  # (no network: built from tok)
        del vocab
        eos = tok.eos_ids[0]
        mapping = {}
        for i in range(tok.vocab_size if hasattr(tok, "vocab_size") else len(tok.vocab)):
            if i == eos:
                continue
            b = tok.decode_bytes([i], skip_special=True)
            if b:
                mapping.setdefault(b, []).append(i)
        ov = outlines_core.Vocabulary(eos, mapping)
        t_idx, _ = best(lambda: outlines_core.Index(regex, ov), 1)
        print(f"outlines-core: schema -> regex {t_re * 1e3:.1f} ms; Index over the vocabulary {t_idx:.2f} s "
              "(note: it ignores integer bounds and additionalProperties semantics differ)")
    except Exception as exc:  # not installed, or an API difference
        print(f"outlines-core: skipped ({type(exc).__name__}: {exc})")
    try:
        import llguidance
        import llguidance.hf  # noqa: F401

        print("llguidance: installed; a standalone compile needs an LLTokenizer built from a HF tokenizer "
              "(llguidance.hf.from_tokenizer), not measured here")
        del llguidance
    except Exception as exc:
        print(f"llguidance: skipped ({type(exc).__name__}: {exc})")


if __name__ == "__main__":
    main()
