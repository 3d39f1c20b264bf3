"""Regenerate ``tests/fixtures/chat_reference.json``: conversations rendered by transformers' own
``apply_chat_template`` for the default model (SmolLM2-135M-Instruct), as text and token ids.

A dev-only tool: transformers is not an lmprog dependency. Run it in a throwaway virtualenv::

    python -m venv /tmp/chatfix && /tmp/chatfix/bin/pip install transformers jinja2 tokenizers gguf numpy
    /tmp/chatfix/bin/python scripts/make_chat_fixture.py \
        --gguf $(.venv/bin/python -c "from lmprog.backends.registry import registered_path as p; print(p('smollm2-135m'))")

transformers reads the tokenizer and the chat template (``tokenizer.chat_template``) from the GGUF file
itself, the same file lmprog reads them from. ``tests/test_chat.py`` checks that lmprog's rendering of
the same messages (its ``system``/``user``/``assistant`` statements) gives exactly these token ids.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Each case: messages, and whether the generation prompt is appended (a conversation that ends where the
# assistant's next turn would be generated).
CASES = [
    {"name": "user_only", "messages": [{"role": "user", "content": "What is the capital of France?"}],
     "add_generation_prompt": True},
    {"name": "system_user", "messages": [
        {"role": "system", "content": "You are a terse geography tutor. Answer with one word."},
        {"role": "user", "content": "What is the capital of Japan?"}], "add_generation_prompt": True},
    {"name": "answered", "messages": [
        {"role": "user", "content": "What is the capital of Japan?"},
        {"role": "assistant", "content": "Tokyo"}], "add_generation_prompt": False},
    {"name": "two_turns", "messages": [
        {"role": "system", "content": "You are a terse geography tutor. Answer with one word."},
        {"role": "user", "content": "What is the capital of Japan?"},
        {"role": "assistant", "content": "Tokyo"},
        {"role": "user", "content": "And its population?"},
        {"role": "assistant", "content": "14000000"}], "add_generation_prompt": False},
    {"name": "two_turns_prompt", "messages": [
        {"role": "user", "content": "What is the capital of Japan?"},
        {"role": "assistant", "content": "Tokyo"},
        {"role": "user", "content": "Name a famous dish from Tokyo."}], "add_generation_prompt": True},
    {"name": "interpolated", "messages": [
        {"role": "system", "content": "Classify the sentiment of a review as positive or negative."},
        {"role": "user", "content": "Review: The food was cold and the waiter was rude.\nSentiment?"},
        {"role": "assistant", "content": "negative"}], "add_generation_prompt": False},
    {"name": "tricky_text", "messages": [
        {"role": "user", "content": "  spaces, {braces} [brackets], naïve café 日本語 🤖\n\nand\ttabs  "},
        {"role": "assistant", "content": "A: 1. two\n2. three"}], "add_generation_prompt": False},
    {"name": "assistant_first", "messages": [{"role": "assistant", "content": "Hello! How can I help?"}],
     "add_generation_prompt": False},
]


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True, help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests/fixtures/chat_reference.json"))
    args = parser.parse_args()
    gguf = Path(args.gguf)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cases = []
    for case in CASES:
        text = tok.apply_chat_template(case["messages"], tokenize=False,
                                       add_generation_prompt=case["add_generation_prompt"])
        ids = tok.apply_chat_template(case["messages"], tokenize=True,
                                      add_generation_prompt=case["add_generation_prompt"])
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        cases.append({**case, "text": text, "ids": [int(i) for i in ids]})
    import transformers

    out = {"source": f"transformers {transformers.__version__} apply_chat_template, tokenizer and chat template "
                     f"read from {gguf.name}",
           "chat_template": tok.chat_template, "cases": cases}
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
