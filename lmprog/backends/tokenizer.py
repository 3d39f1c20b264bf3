"""Exact tokenizers, built with the ``tokenizers`` library from GGUF metadata or ``tokenizer.json``.

Besides ``encode``/``decode`` a :class:`Tokenizer` carries the *token -> bytes table* that the constraint
compiler needs: ``token_bytes[i]`` is the exact byte string token ``i`` contributes to the text. For
byte-level BPE (GPT-2 style) tokens are strings over a printable alias of the 256 byte values; for
SentencePiece-style vocabularies ``▁`` stands for a space and ``<0xXX>`` tokens for raw bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split patterns of the BPE families llama.cpp names in `tokenizer.ggml.pre`.
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_GPT2_PRE = {"default", "gpt2", "gpt-2", "olmo", "jais", "poro-chat", "viking"}
_DIGITS_THEN_GPT2_PRE = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r"}
_LLAMA3_PRE = {"llama-bpe", "llama3", "llama-v3", "falcon3", "dbrx", "smaug-bpe", "pixtral"}
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan"}
KNOWN_BPE_PRE_TOKENIZERS = sorted(_GPT2_PRE | _DIGITS_THEN_GPT2_PRE | _LLAMA3_PRE | _QWEN2_PRE)


class TokenizerError(ValueError):
    """A tokenizer could not be built from the given metadata."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to code points 256, 257, ...
    in byte order. Byte-level BPE vocabularies are written in this alphabet.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}


def _byte_level_token_bytes(token: str) -> bytes:
    if all(c in _BYTE_DECODER for c in token):
        return bytes(_BYTE_DECODER[c] for c in token)
    return token.encode("utf-8")  # added tokens are written in plain text


def _sentencepiece_token_bytes(token: str) -> bytes:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    return token.replace("▁", " ").encode("utf-8")


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """An exact tokenizer plus the per-token byte table.

    Attributes:
        hf: the underlying ``tokenizers.Tokenizer`` (encoding is delegated to it).
        token_bytes: ``token_bytes[i]`` is the bytes token ``i`` contributes to decoded text.
        special_ids: control tokens (BOS, EOS, chat markers, ...): never part of generated text.
        bos_id / eos_ids: beginning / end of sequence tokens.
        add_bos: whether ``encode`` prepends BOS (as the model's metadata asks).
        chat_template: the model's Jinja chat template (``tokenizer.chat_template`` of a GGUF file, the
            ``chat_template`` of a Hugging Face folder), or None; rendered by
            :mod:`lmprog.backends.chat_template`.
        chat_tokens: the special tokens a chat template sees by name (``bos_token``, ``eos_token``, ...).
    """

    hf: HFTokenizer
    token_bytes: tuple[bytes, ...]
    special_ids: frozenset[int]
    bos_id: int | None
    eos_ids: tuple[int, ...]
    add_bos: bool = False
    chat_template: str | None = field(default=None, repr=False)
    chat_tokens: dict = field(default_factory=dict, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.token_bytes)

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special-token markup in the text (``<|im_start|>``) becomes the special token."""
        try:
            ids = self.hf.encode(text, add_special_tokens=False).ids
        except TypeError:
            if not isinstance(text, str):
                raise TypeError(f"encode needs a str, got {type(text).__name__}") from None
            # Lone surrogates (e.g. from a bad decode with errors="surrogateescape") have no UTF-8 bytes.
            raise ValueError("text is not valid Unicode (it contains a lone surrogate)") from None
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode_bytes(self, ids, skip_special: bool = False) -> bytes:
        """Concatenated bytes of ``ids`` (exact; may end inside a UTF-8 sequence)."""
        table = self.token_bytes
        return b"".join(
            table[i] for i in map(int, ids) if not (skip_special and i in self.special_ids)
        )

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of ``ids``. Never raises: invalid or partial UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    @cached_property
    def fingerprint(self) -> str:
        """A hash of the vocabulary bytes and special ids, for on-disk caches keyed by tokenizer."""
        h = hashlib.sha256()
        for b in self.token_bytes:
            h.update(len(b).to_bytes(4, "little"))
            h.update(b)
        h.update(repr(sorted(self.special_ids)).encode())
        h.update(repr(self.eos_ids).encode())
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# From GGUF metadata
# --------------------------------------------------------------------------------------------------


def _bpe_pre_tokenizer(pre: str):
    if pre in _DIGITS_THEN_GPT2_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pattern = _LLAMA3_PATTERN if pre in _LLAMA3_PRE else _QWEN2_PATTERN if pre in _QWEN2_PRE else None
    if pattern is None:
        raise TokenizerError(
            f"unsupported BPE pre-tokenizer {pre!r} (tokenizer.ggml.pre); "
            f"supported: {', '.join(KNOWN_BPE_PRE_TOKENIZERS)}"
        )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to a SentencePiece BPE vocabulary: every split of a token into two vocabulary
    pieces is a merge, ranked by the merged token's score (higher first), then by the pieces' ids."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                found.append((-score, vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def tokenizer_from_gguf_fields(fields: dict) -> Tokenizer:
    """Build the exact tokenizer from GGUF metadata (``tokenizer.ggml.*`` keys, values already decoded)."""
    kind = fields.get("tokenizer.ggml.model")
    tokens: list[str] = list(fields.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise TokenizerError("the GGUF file has no tokenizer.ggml.tokens")
    n = len(tokens)
    types = list(fields.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * n)
    bos = fields.get("tokenizer.ggml.bos_token_id")
    eos = fields.get("tokenizer.ggml.eos_token_id")
    eot = fields.get("tokenizer.ggml.eot_token_id")
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", kind == "llama"))

    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
        model = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
        hf = HFTokenizer(model)
        hf.pre_tokenizer = _bpe_pre_tokenizer(str(fields.get("tokenizer.ggml.pre", "default")))
        hf.decoder = decoders.ByteLevel()
        to_bytes = _byte_level_token_bytes
    elif kind == "llama":
        scores = list(fields.get("tokenizer.ggml.scores") or [0.0] * n)
        unk = fields.get("tokenizer.ggml.unknown_token_id", 0)
        model = models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=_sentencepiece_merges(tokens, scores),
            unk_token=tokens[unk],
            byte_fallback=True,
            fuse_unk=True,
        )
        hf = HFTokenizer(model)
        prefix = [] if fields.get("tokenizer.ggml.add_space_prefix") is False else [normalizers.Prepend("▁")]
        hf.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
        hf.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        to_bytes = _sentencepiece_token_bytes
    else:
        raise TokenizerError(
            f"unsupported tokenizer model {kind!r} (tokenizer.ggml.model); supported: 'gpt2' (byte-level BPE), "
            "'llama' (SentencePiece BPE)"
        )

    special = {i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN)}
    special |= {i for i in (bos, eos, eot) if i is not None}
    added = [
        AddedToken(tokens[i], special=(types[i] != TOKEN_USER_DEFINED), normalized=False)
        for i in sorted(special | {i for i, t in enumerate(types) if t == TOKEN_USER_DEFINED})
    ]
    hf.add_special_tokens([a for a in added if a.special])
    hf.add_tokens([a for a in added if not a.special])
    table = tuple(
        tokens[i].encode("utf-8") if (i in special or types[i] == TOKEN_USER_DEFINED) else to_bytes(tokens[i])
        for i in range(n)
    )
    eos_ids = tuple(dict.fromkeys(i for i in (eos, eot) if i is not None))
    chat_tokens = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(i, int) and 0 <= i < n:
            chat_tokens[name] = tokens[i]
    template = fields.get("tokenizer.chat_template")
    return Tokenizer(hf, table, frozenset(special), bos, eos_ids, add_bos and bos is not None,
                     chat_template=template if isinstance(template, str) and template else None,
                     chat_tokens=chat_tokens)


# --------------------------------------------------------------------------------------------------
# From a Hugging Face folder (tokenizer.json)
# --------------------------------------------------------------------------------------------------


def tokenizer_from_hf_folder(folder: str | Path) -> Tokenizer:
    """Build the tokenizer of a Hugging Face model folder from ``tokenizer.json`` (+ its configs)."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{folder}: no tokenizer.json")
    spec = json.loads(path.read_text(encoding="utf-8"))
    hf = HFTokenizer.from_str(json.dumps(spec))
    config = _read_json(folder / "tokenizer_config.json")
    gen_config = _read_json(folder / "generation_config.json")
    model_config = _read_json(folder / "config.json")

    vocab = hf.get_vocab(with_added_tokens=True)
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for token, i in vocab.items():
        tokens[i] = token
    decoder_types = json.dumps(spec.get("decoder") or {})
    to_bytes = _byte_level_token_bytes if "ByteLevel" in decoder_types else _sentencepiece_token_bytes
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    special = {i for i, a in added.items() if a.get("special")}

    def token_id(value):
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return vocab.get(value)
        return value

    bos = token_id(config.get("bos_token")) if config.get("bos_token") is not None else model_config.get("bos_token_id")
    eos_candidates = [token_id(config.get("eos_token")), gen_config.get("eos_token_id"), model_config.get("eos_token_id")]
    eos_ids: list[int] = []
    for c in eos_candidates:
        for i in c if isinstance(c, list) else [c]:
            if isinstance(i, int) and i not in eos_ids:
                eos_ids.append(i)
    special |= {i for i in [bos, *eos_ids] if i is not None}
    table = tuple(tokens[i].encode("utf-8") if i in added else to_bytes(tokens[i]) for i in range(n))
    add_bos = bool(config.get("add_bos_token", False))
    chat_tokens = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            chat_tokens[name] = value
    # Encoding with add_special_tokens=False leaves BOS to us, whatever the post-processor says.
    return Tokenizer(hf, table, frozenset(special), bos, tuple(eos_ids), add_bos and bos is not None,
                     chat_template=_hf_chat_template(folder, config), chat_tokens=chat_tokens)


def _hf_chat_template(folder: Path, config: dict) -> str | None:
    """A Hugging Face folder's chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template`` (a string, or a list of named templates: the one named ``default``)."""
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8") or None
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


# --------------------------------------------------------------------------------------------------
# A byte-level tokenizer (one token per byte) for tests and tiny models
# --------------------------------------------------------------------------------------------------


def byte_tokenizer(merges: list[tuple[str, str]] = (), specials: tuple[str, ...] = ("<|endoftext|>",),
                   chat_template: str | None = None) -> Tokenizer:
    """A real byte-level BPE: the 256 byte tokens, then the given merges (in GPT-2 alias alphabet),
    then special tokens; the first special is EOS. Exact and tiny: for tests and random tiny models.
    ``chat_template``: a Jinja chat template (e.g. :data:`lmprog.backends.chat_template.CHATML`, with
    ``specials=("<|im_end|>", "<|im_start|>")``)."""
    alias = bytes_to_unicode()
    tokens = [alias[b] for b in range(256)]
    for left, right in merges:
        tokens.append(left + right)
    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens + list(specials),
        "tokenizer.ggml.token_type": [TOKEN_NORMAL] * len(tokens) + [TOKEN_CONTROL] * len(specials),
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in merges],
        "tokenizer.ggml.eos_token_id": len(tokens) if specials else None,
        "tokenizer.ggml.add_bos_token": False,
    }
    if chat_template:
        fields["tokenizer.chat_template"] = chat_template
    return tokenizer_from_gguf_fields(fields)
