"""Chat templates: a model's own Jinja template, rendered as Hugging Face ``transformers`` renders it.

A model's chat template (``tokenizer.chat_template`` in GGUF metadata, ``chat_template`` in a Hugging Face
folder's ``tokenizer_config.json`` or its ``chat_template.jinja``) is untrusted code from a model file. It is
compiled in jinja2's :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` with the settings and helpers that
``transformers``' ``apply_chat_template`` gives templates, so the same messages render to the same text:

* ``trim_blocks=True, lstrip_blocks=True`` and the ``loopcontrols`` extension (``{% break %}``);
* ``raise_exception(message)`` (a template's way to reject a conversation), ``strftime_now(format)``
  (today's date, used by some templates for a default system message), a ``tojson`` filter that does not
  HTML-escape and takes ``indent``/``separators``/``sort_keys``, ``dict(...)`` and ``namespace(...)``;
* the tokenizer's special tokens (``bos_token``, ``eos_token``, ...) as variables, and
  ``add_generation_prompt``.

The rendered text is tokenized like any prompt (special-token markup such as ``<|im_start|>`` becomes the
special token; no BOS is added for it: a template that wants one writes ``{{ bos_token }}``), as
transformers tokenizes it with ``add_special_tokens=False``.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

__all__ = ["CHATML", "ChatTemplate", "ChatTemplateError", "compile_chat_template", "special_tokens_map"]

#: A ChatML template with a default system message (SmolLM2-Instruct's, verbatim): for tests and tiny models.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """A chat template that does not compile, or that rejects a conversation (``raise_exception``)."""


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson HTML-escapes <, >, & and ' (for HTML pages): chat templates want plain JSON
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _template_dict(*args, **kwargs):
    return dict(*args, **kwargs)


@lru_cache(maxsize=1)
def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Namespace(jinja2.utils.Namespace):
        """``namespace(...)`` that refuses underscore-prefixed names (no reaching into Python internals)."""

        def __init__(*args, **kwargs):  # noqa: N805 - jinja's Namespace takes self positionally too
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                _Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set the attribute {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _template_dict
    env.globals["namespace"] = _Namespace
    return env


class ChatTemplate:
    """A compiled chat template plus the special-token variables it is rendered with.

    Args:
        source: the Jinja source.
        special_tokens: ``bos_token``, ``eos_token``, ... -> their text (as transformers passes its
            ``special_tokens_map``).
    """

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None):
        import jinja2

        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from None

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False, **kwargs) -> str:
        """The text of ``messages`` (``[{"role": ..., "content": ...}, ...]``), as ``apply_chat_template``
        renders it with ``tokenize=False``."""
        import jinja2

        variables = {**self.special_tokens, **kwargs}
        try:
            return self._template.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template rejects this conversation: {exc}") from None
        except Exception as exc:  # a template bug (e.g. indexing an empty list): never a traceback
            raise ChatTemplateError(f"the model's chat template failed: {type(exc).__name__}: {exc}") from None


@lru_cache(maxsize=16)
def _compiled(source: str, special: tuple) -> ChatTemplate:
    return ChatTemplate(source, dict(special))


def compile_chat_template(tokenizer) -> ChatTemplate | None:
    """The :class:`ChatTemplate` of a tokenizer (``tokenizer.chat_template``), or None when it has none."""
    source = getattr(tokenizer, "chat_template", None)
    if not source:
        return None
    return _compiled(source, tuple(sorted(special_tokens_map(tokenizer).items())))


def special_tokens_map(tokenizer) -> dict[str, str]:
    """``bos_token`` / ``eos_token`` (and ``unk_token``/``pad_token`` where known) as text, for templates."""
    out = dict(getattr(tokenizer, "chat_tokens", None) or {})
    table = tokenizer.token_bytes
    if "bos_token" not in out and tokenizer.bos_id is not None:
        out["bos_token"] = table[tokenizer.bos_id].decode("utf-8", "replace")
    if "eos_token" not in out and tokenizer.eos_ids:
        out["eos_token"] = table[tokenizer.eos_ids[0]].decode("utf-8", "replace")
    return out
