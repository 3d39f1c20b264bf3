"""Chat turns (``system`` / ``user`` / ``assistant`` statements) as prompt text, with the model's own template.

A program's turns form one conversation. Turn ``k`` is lowered to three pieces of text:

    header_k  content_k  tail_k

where the content is the statement's template (interpolations, and holes in assistant turns) and the header
and tail come from the model's chat template (:mod:`lmprog.backends.chat_template`). They are found by the
common sentinel technique: render the roles so far with a unique placeholder as each message's content,

    R_k = render([(role_1, S_1), ..., (role_k, S_k)])

and split ``R_k`` at ``S_k``: ``header_k`` is the text between the end of ``R_{k-1}`` and ``S_k`` (the end of
the previous turn is already in ``tail_{k-1}``; the first header includes the template's default system
message when the first turn is not ``system``), and ``tail_k`` is everything after ``S_k`` (the end-of-turn
marker, e.g. ``<|im_end|>\\n``). With the contents in place of the sentinels the pieces concatenate to exactly
``apply_chat_template(messages)``. This needs a template that renders earlier turns the same whatever
follows (``R_{k-1}`` a prefix of ``R_k``), which is what chat serving relies on; one that does not is a
located error.

For an assistant turn, the prompt before its content is what the template's generation prompt gives
(``render(turns before, add_generation_prompt=True)``); :meth:`Conversation.turn` checks that the two agree.

The end of a turn: when ``tail_k`` starts with a special token (``<|im_end|>``), that token is the turn's
*end-of-turn token*; a hole that ends an assistant turn is terminated by it (the model chooses to end its
turn there, and that probability is part of the target), exactly like a hole that ends at EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lmprog.backends.chat_template import ChatTemplateError, compile_chat_template

__all__ = ["ChatError", "Conversation", "TurnText"]

_SENTINEL = "LMPROGTURN{}X9Q7Z"  # letters and digits only: survives |trim, |escape and the like


class ChatError(Exception):
    """A turn that cannot be rendered; ``message`` and ``help`` become a located diagnostic."""

    def __init__(self, message: str, help: Optional[str] = None):
        super().__init__(message)
        self.message, self.help = message, help


@dataclass(frozen=True)
class TurnText:
    """The template text around one turn's content (see the module docstring).

    ``end_token`` / ``end_text``: the special token ``tail`` starts with (the end-of-turn marker) and its
    text, or None / ``""`` when the tail does not start with a special token."""

    role: str
    header: str
    tail: str
    end_token: Optional[int] = None
    end_text: str = ""


@dataclass
class Conversation:
    """The turns of one program so far, for one tokenizer (one per lowering)."""

    tokenizer: object
    roles: list = field(default_factory=list)
    rendered: str = ""  # R_{k-1}, with sentinels

    def __post_init__(self):
        self._template = None

    def template(self):
        if self._template is None:
            try:
                self._template = compile_chat_template(self.tokenizer)
            except ChatTemplateError as exc:
                raise ChatError(str(exc)) from None
            if self._template is None:
                raise ChatError(
                    "the model has no chat template (no tokenizer.chat_template in its metadata), so it cannot "
                    "render chat turns",
                    "use a chat model, or write the prompt as template text (e.g. \"Q: {question}\\nA: [answer]\")")
        return self._template

    def _render(self, roles, add_generation_prompt=False) -> str:
        messages = [{"role": r, "content": _SENTINEL.format(i)} for i, r in enumerate(roles)]
        try:
            return self.template().render(messages, add_generation_prompt=add_generation_prompt)
        except ChatTemplateError as exc:
            raise ChatError(str(exc), "the model's chat template decides which sequences of roles it accepts "
                                      "(many want strictly alternating user and assistant turns)") from None

    def turn(self, role: str) -> TurnText:
        """The header and tail of the next turn, of ``role``; raises :class:`ChatError`."""
        roles = [*self.roles, role]
        k = len(roles) - 1
        text = self._render(roles)
        sentinel = _SENTINEL.format(k)
        pos = text.find(sentinel)
        if pos < 0 or text.find(sentinel, pos + 1) >= 0 or any(_SENTINEL.format(i) not in text for i in range(k)):
            raise ChatError(f"the model's chat template does not show the content of this {role} turn as given "
                            "(it drops, repeats or rewrites messages)")
        if not text.startswith(self.rendered) or len(self.rendered) > pos:
            raise ChatError("the model's chat template renders the earlier turns differently once this turn "
                            "follows them, so the conversation cannot be built turn by turn")
        header, tail = text[len(self.rendered):pos], text[pos + len(sentinel):]
        if role == "assistant":
            prompt = self._render(self.roles, add_generation_prompt=True) if self.roles else None
            if prompt is not None and prompt != text[:pos]:
                raise ChatError("the model's chat template's generation prompt differs from how it renders an "
                                "assistant turn, so the generated turn would not be the conversation's text")
        if not self.roles and getattr(self.tokenizer, "add_bos", False) and self.tokenizer.bos_id is not None:
            # the program's prompt gets BOS anyway (as transformers' add_special_tokens=False would not add it):
            # a template that writes {{ bos_token }} itself must not give a second one
            bos = self.tokenizer.token_bytes[self.tokenizer.bos_id].decode("utf-8", "replace")
            if header.startswith(bos):
                header = header[len(bos):]
        end_token, end_text = self._end_token(tail)
        self.roles, self.rendered = roles, text
        return TurnText(role, header, tail, end_token, end_text)

    def _end_token(self, tail: str) -> tuple[Optional[int], str]:
        tok = self.tokenizer
        if not tail:
            return None, ""
        ids = tok.encode(tail, add_bos=False)
        if not ids or int(ids[0]) not in tok.special_ids:
            return None, ""
        end = int(ids[0])
        text = tok.token_bytes[end].decode("utf-8", "replace")
        if not tail.startswith(text):
            return None, ""
        return end, text
