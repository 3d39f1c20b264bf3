"""The ``lmprog`` command line: check, models, generate, demo (run/batch arrive with the end-to-end issue).

Exit codes: 0 success, 2 bad input (program errors, bad arguments), 1 runtime failures. No command
prints a Python traceback for a user error.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_check(args) -> int:
    from lmprog.program import check_files

    return check_files(args.files, sys.stdout)


DEMO_PROMPT = "<|im_start|>user\nWrite one sentence about the sea.<|im_end|>\n<|im_start|>assistant\n"


def _cmd_models(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from lmprog.backends import available_models

    table = Table(title="registered models (any .gguf file or Hugging Face folder also works with --model)")
    for col in ("name", "location", "description"):
        table.add_column(col)
    for name, status, description in available_models():
        table.add_row(name, status, description)
    Console().print(table)
    return 0


def _generate(model: str, prompt: str, tokens: int, batch: int, seed: int, temperature: float, title: str) -> int:
    import time

    from rich.console import Console
    from rich.panel import Panel

    from lmprog.backends import load_model
    from lmprog.backends.generate import sample

    console = Console()
    t0 = time.perf_counter()
    with console.status(f"loading {model} ..."):
        lm = load_model(model)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with console.status(f"sampling {batch} x {tokens} tokens ..."):
        out = sample(lm, prompt, n_tokens=tokens, batch=batch, temperature=temperature, seed=seed)
    gen_s = time.perf_counter() - t0
    console.print(Panel(prompt, title="prompt", title_align="left"))
    for i, text in enumerate(out.texts):
        console.print(Panel(text, title=f"{title} {i + 1}  (log p = {out.logprob[i]:.2f})", title_align="left"))
    console.print(
        f"[dim]{lm!r}; load {load_s:.1f} s; sampling {gen_s:.1f} s for {batch} x {tokens} tokens "
        f"(includes compilation on the first run; later runs reuse the persistent cache)[/dim]"
    )
    return 0


def _cmd_generate(args) -> int:
    return _generate(args.model, args.prompt, args.tokens, args.batch, args.seed, args.temperature, "sample")


def _cmd_demo(args) -> int:
    return _generate(args.model, DEMO_PROMPT, 40, 3, args.seed, 0.8, "continuation")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmprog", description="Probabilistic programs over language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="parse and check .lmp files; exit 0 if all are valid, 2 otherwise")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("models", help="list the registered models and where they are installed")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("generate", help="sample continuations of a prompt (plain batched decoding)")
    p.add_argument("prompt")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=_positive_int, default=48)
    p.add_argument("--batch", type=_positive_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=_positive_float, default=1.0)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("demo", help="sample three answers to a chat prompt with the default model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from lmprog.backends.gguf_file import GGUFError
    from lmprog.backends.loaders import ModelLoadError
    from lmprog.backends.registry import ModelNotFoundError
    from lmprog.backends.tokenizer import TokenizerError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ModelNotFoundError, ModelLoadError, GGUFError, TokenizerError) as exc:
        print(f"lmprog: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad option values caught below argparse (e.g. prompt longer than the context)
        print(f"lmprog: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
