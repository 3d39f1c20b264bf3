"""Language models and tokenizers: the protocol, the JAX Llama-family model, loaders and the registry."""

from lmprog.backends.base import LanguageModel, Prefix
from lmprog.backends.registry import (
    DEFAULT_MODEL,
    ModelNotFoundError,
    available_models,
    load_model,
    load_tokenizer,
    resolve_model,
)
from lmprog.backends.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_MODEL",
    "LanguageModel",
    "ModelNotFoundError",
    "Prefix",
    "Tokenizer",
    "available_models",
    "load_model",
    "load_tokenizer",
    "resolve_model",
]
