"""lmprog: a small probabilistic programming language for steering language models, compiled to JAX."""

__version__ = "0.1.0"

__all__ = ["__version__", "compile", "load"]


def __getattr__(name):
    # The front end pulls in lark and the checker; keep `import lmprog` cheap for tools that only need backends.
    if name in ("compile", "load", "Program"):
        from lmprog import program

        return getattr(program, name)
    raise AttributeError(f"module 'lmprog' has no attribute {name!r}")
