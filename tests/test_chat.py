"""Chat turns (``system`` / ``user`` / ``assistant``): rendering with the model's own chat template, exactly as
transformers' ``apply_chat_template`` (a fixture made with transformers, ``scripts/make_chat_fixture.py``),
and the target of holes in assistant turns, checked by enumeration on a toy LM with a chat template.

Statistical test: a chi-square goodness of fit at ``ALPHA = 1e-3`` (fixed seeds, so deterministic) of
sampling-importance-resampling draws, one per independent group of weighted particles, against the exact
posterior.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import lmprog
from lmprog.backends.chat_template import CHATML, ChatTemplate, ChatTemplateError, compile_chat_template
from lmprog.backends.tokenizer import Tokenizer, byte_tokenizer, tokenizer_from_hf_folder
from lmprog.backends.toy import ToyLM
from lmprog.compiler.errors import LoweringError
from lmprog.compiler.lower import Lowering
from lmprog.inference import Hole, Importance, Text, run
from lmprog.inference.exact import enumerate_program

from _inference_cases import ALPHA, sir_draws

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "chat_reference.json").read_text(encoding="utf-8"))
CASES = FIXTURE["cases"]

# ------------------------------------------------------------------------------------------------ toy chat LM

#: A toy vocabulary with chat markers: <s> starts a turn, <e> ends one (the end-of-turn token, not EOS).
VOCAB = ("<bos>", "<eos>", "<s>", "<e>", "a", "b", "c", " ", "\n", "u", "s", "x", "?")
BOS, EOS, START, END = 0, 1, 2, 3
TOY_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<s>s\nx<e>\n{% endif %}"
    "<s>{{ m['role'][0] }}\n{{ m['content'] }}<e>\n{% endfor %}{% if add_generation_prompt %}<s>a\n{% endif %}"
)


def with_template(tok: Tokenizer, template) -> Tokenizer:
    return Tokenizer(tok.hf, tok.token_bytes, tok.special_ids, tok.bos_id, tok.eos_ids, tok.add_bos,
                     chat_template=template)


def toy_chat_lm(seed=1, template=TOY_TEMPLATE) -> ToyLM:
    lm = ToyLM.random(VOCAB, context=2, positions=48, seed=seed, scale=1.5, name="toy-chat")
    lm.tokenizer = with_template(lm.tokenizer, template)
    return lm


def seq_logprob(lm, history, ids) -> float:
    """log p(ids | history) under the toy LM (exact, host side, float64)."""
    h, lp = list(history), 0.0
    for t in ids:
        logits = lm.host_logits(h).astype(np.float64)
        lp += logits[t] - np.logaddexp.reduce(logits)
        h.append(t)
    return lp


def lowering(src, tok, inputs=None):
    """The lowering visitor after lowering ``src`` (its compiled holes) and the Lowered program."""
    prog = lmprog.compile(src, "t.lmp")
    low = Lowering(prog, tok, dict(inputs or {}), 0, 256)
    return low, low.run()


def quote(text: str) -> str:
    """``text`` as the body of a .lmp template literal (no interpolation, no holes)."""
    for a, b in (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\t", "\\t"), ("{", "{{"), ("}", "}}"),
                 ("[", "[["), ("]", "]]")):
        text = text.replace(a, b)
    return text


def chat_program(messages, interpolate: bool) -> tuple[str, dict]:
    """A program of one turn per message (contents literal, or interpolated from inputs), and its inputs."""
    lines, inputs = [], {}
    for i, m in enumerate(messages):
        if interpolate:
            lines.insert(0, f"input m{i}: str")
            inputs[f"m{i}"] = m["content"]
            lines.append(f'{m["role"]} "{{m{i}}}"')
        else:
            lines.append(f'{m["role"]} "{quote(m["content"])}"')
    return "\n".join(lines) + "\n", inputs


def static_tokens(segments) -> list[int]:
    out = []
    for s in segments:
        assert isinstance(s, Text) and s.tokens is not None, s
        out.extend(s.tokens)
    return out


# ---------------------------------------------------------------------------- rendering (transformers fixture)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_template_renders_as_transformers(case, default_tokenizer):
    template = compile_chat_template(default_tokenizer)
    assert template.source == FIXTURE["chat_template"]
    text = template.render(case["messages"], add_generation_prompt=case["add_generation_prompt"])
    assert text == case["text"]
    assert default_tokenizer.encode(text, add_bos=False) == case["ids"]


@pytest.mark.parametrize("interpolate", [False, True], ids=["literal", "interpolated"])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_program_tokens_equal_apply_chat_template(case, interpolate, default_tokenizer):
    """A program of the same turns gives exactly the fixture's token ids: the whole conversation, or (with the
    generation prompt) the prompt before the assistant's hole."""
    tok = default_tokenizer
    src, inputs = chat_program(case["messages"], interpolate)
    if case["add_generation_prompt"]:
        src += 'assistant "[x]" where x in ["Paris", "Tokyo"]\n'
        low, lowered = lowering(src, tok, inputs)
        segs = lowered.program.segments
        k = next(i for i, s in enumerate(segs) if isinstance(s, Hole))
        assert static_tokens(segs[:k]) == case["ids"]
        assert static_tokens(segs[k + 1:]) == tok.encode("\n", add_bos=False)  # after <|im_end|>
    else:
        _, lowered = lowering(src, tok, inputs)
        assert static_tokens(lowered.program.segments) == case["ids"]


@pytest.mark.parametrize("case", [c for c in CASES if c["messages"][-1]["role"] == "assistant"],
                         ids=lambda c: c["name"])
def test_hole_ending_an_assistant_turn_is_terminated_by_the_end_of_turn_token(case, default_tokenizer):
    """The last assistant content as a hole: the prompt before it, the hole's tokens (the content and the
    end-of-turn token <|im_end|>, a special token, not its text re-tokenized) and the text after it are the
    fixture's ids."""
    tok = default_tokenizer
    *before, last = case["messages"]
    src, _ = chat_program(before, interpolate=False)
    src += f'assistant "[x]" where x in ["{quote(last["content"])}"]\n'
    low, lowered = lowering(src, tok)
    segs = lowered.program.segments
    k = next(i for i, s in enumerate(segs) if isinstance(s, Hole))
    prompt, after = static_tokens(segs[:k]), static_tokens(segs[k + 1:])
    end = tok.encode("<|im_end|>", add_bos=False)
    assert end == [2] and tok.token_bytes[2] == b"<|im_end|>"
    hole_ids = case["ids"][len(prompt):len(case["ids"]) - len(after)]
    assert prompt + hole_ids + after == case["ids"]
    assert hole_ids == tok.encode(last["content"], add_bos=False) + end
    compiled = low.compiled[0]
    assert compiled.terminator.kind == "eos" and compiled.terminator.ids == (2,)
    assert compiled.complete(hole_ids)
    assert not compiled.completable(tok.encode(last["content"] + "<|im_end|>", add_bos=False)[:-1] +
                                    tok.encode("<|", add_bos=False))  # the marker's text is not the marker


def test_default_system_message_only_when_the_first_turn_is_not_system(default_tokenizer):
    _, with_sys = lowering('system "Be brief."\nuser "Hi"\n', default_tokenizer)
    _, without = lowering('user "Hi"\n', default_tokenizer)
    text = lambda low: default_tokenizer.decode(static_tokens(low.program.segments))  # noqa: E731
    assert "SmolLM" not in text(with_sys) and text(with_sys).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text(without).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_raw_text_is_appended_as_is_between_turns(default_tokenizer):
    _, low = lowering('"PREFIX\\n"\nuser "Hi"\n"between"\nassistant "Hello"\n', default_tokenizer)
    text = default_tokenizer.decode(static_tokens(low.program.segments))
    assert text.startswith("PREFIX\n<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\nbetween<|im_start|>assistant\nHello<|im_end|>\n")


# ------------------------------------------------------------------------------------- exactness on a toy LM


def test_toy_template_matches_the_sentinel_split():
    lm = toy_chat_lm()
    text = ChatTemplate(TOY_TEMPLATE).render([{"role": "user", "content": "a b?"}], add_generation_prompt=True)
    assert text == "<s>s\nx<e>\n<s>u\na b?<e>\n<s>a\n"
    _, low = lowering('user "a b?"\nassistant "[x]" where x in ["a"]\n', lm.tokenizer)
    segs = low.program.segments
    assert segs[0].tokens == tuple([BOS] + lm.tokenizer.encode(text, add_bos=False))
    assert segs[2].tokens == tuple(lm.tokenizer.encode("\n", add_bos=False))


def test_choice_in_an_assistant_turn_is_exact():
    """P(x = s) ∝ p(s <e> | prompt): the end-of-turn token's probability is part of the target (the toy's EOS
    is a different token, so this is the end-of-turn terminator, not EOS). Enumeration against the hand-computed
    target, then SIR draws from importance sampling against enumeration (chi-square), and log Z."""
    lm = toy_chat_lm()
    tok = lm.tokenizer
    choices = ["a", "ab", "b c"]
    _, low = lowering(f'user "a b?"\nassistant "[x]" where x in {json.dumps(choices)}\nreturn x\n', tok)
    prompt = [BOS] + tok.encode("<s>s\nx<e>\n<s>u\na b?<e>\n<s>a\n", add_bos=False)
    logw = {s: seq_logprob(lm, prompt, tok.encode(s, add_bos=False) + [END]) for s in choices}
    log_z = float(np.logaddexp.reduce(list(logw.values())))
    exact = enumerate_program(lm, low.program)
    assert exact.log_z == pytest.approx(log_z, abs=1e-5)
    marginal = exact.marginal(lambda p: p.values["x"])
    for s in choices:
        assert marginal[s] == pytest.approx(math.exp(logw[s] - log_z), rel=1e-4)
    # without the end-of-turn token the target would differ measurably (the test has power)
    no_end = {s: seq_logprob(lm, prompt, tok.encode(s, add_bos=False)) for s in choices}
    assert abs(float(np.logaddexp.reduce(list(no_end.values()))) - log_z) > 0.1

    result = run(lm, low.program, Importance(particles=32), seed=3, groups=400)
    draws = sir_draws(result, seed=1)
    probs = exact.probs()
    keys = sorted(probs, key=lambda k: -probs[k])
    big = [k for k in keys if probs[k] * len(draws) >= 5]
    observed = [sum(d == k for d in draws) for k in big]
    expected = np.array([probs[k] for k in big], np.float64)
    rest = len(draws) - sum(observed)
    if rest or len(big) < len(keys):
        observed.append(rest)
        expected = np.append(expected, 1.0 - expected.sum())
    expected = expected / expected.sum() * len(draws)  # float64, summing to the number of draws
    p = stats.chisquare(np.array(observed, np.float64), expected).pvalue
    assert p > ALPHA, (observed, expected)
    z_hat = np.exp(np.asarray(result.log_z, np.float64))
    assert abs(z_hat.mean() - math.exp(log_z)) < 4 * z_hat.std(ddof=1) / math.sqrt(z_hat.size)


def test_multi_turn_holes_referenced_in_later_turns():
    """The first answer is interpolated into the next user turn: the joint target is the product of both
    turns' probabilities, each with its end-of-turn token, given the conversation so far."""
    lm = toy_chat_lm(seed=4)
    tok = lm.tokenizer
    src = ('user "a?"\nassistant "[x]" where x in ["a", "b"]\nuser "c {x}?"\n'
           'assistant "[y]" where y in ["a", "c"]\nreturn x, y\n')
    template = ChatTemplate(TOY_TEMPLATE)
    weights = {}
    for x in ("a", "b"):
        for y in ("a", "c"):
            msgs = [{"role": "user", "content": "a?"}, {"role": "assistant", "content": x},
                    {"role": "user", "content": f"c {x}?"}, {"role": "assistant", "content": y}]
            ids = [BOS] + tok.encode(template.render(msgs), add_bos=False)
            # scored: each answer and its end-of-turn token; the rest is prompt (conditioned on)
            p1 = [BOS] + tok.encode(template.render(msgs[:1], add_generation_prompt=True), add_bos=False)
            p2 = [BOS] + tok.encode(template.render(msgs[:3], add_generation_prompt=True), add_bos=False)
            assert ids[:len(p2)] == p2
            weights[(x, y)] = (seq_logprob(lm, p1, tok.encode(x, add_bos=False) + [END])
                               + seq_logprob(lm, p2, tok.encode(y, add_bos=False) + [END]))
    log_z = float(np.logaddexp.reduce(list(weights.values())))
    prog = lmprog.compile(src, "t.lmp")
    low = Lowering(prog, tok, {}, 0, 256).run()
    exact = enumerate_program(lm, low.program)
    assert exact.log_z == pytest.approx(log_z, abs=1e-5)
    marginal = exact.marginal(lambda p: (p.values["x"], p.values["y"]))
    for k, lw in weights.items():
        assert marginal[k] == pytest.approx(math.exp(lw - log_z), rel=1e-4)

    r = prog.run(lm=lm, particles=3000, seed=0, strategy="importance")
    got = {(v["x"], v["y"]): p for v, p in r.posterior}
    tv = 0.5 * sum(abs(got.get(k, 0.0) - math.exp(lw - log_z)) for k, lw in weights.items())
    assert tv < 0.04, (got, weights)
    for s in r.samples:
        x, y = s.values["x"], s.values["y"]
        assert s.messages == [{"role": "user", "content": "a?"}, {"role": "assistant", "content": x},
                              {"role": "user", "content": f"c {x}?"}, {"role": "assistant", "content": y}]
        assert s.to_dict()["messages"] == s.messages
    assert r.conversation in [s.messages for s in r.samples]


def test_literal_text_after_a_hole_terminates_it_and_the_turn_end_is_prompt():
    """``assistant "[x]?"``: the hole ends at its literal text (as in any template); the end-of-turn marker
    after it is then forced, not scored."""
    lm = toy_chat_lm(seed=2)
    tok = lm.tokenizer
    low, lowered = lowering('user "a"\nassistant "[x]?" where x in ["a", "b"]\n', tok)
    assert low.compiled[0].terminator.kind == "text" and low.compiled[0].terminator.text == "?"
    segs = lowered.program.segments
    assert segs[-1].tokens == (END, tok.encode("\n", add_bos=False)[0])
    prompt = [BOS] + tok.encode("<s>s\nx<e>\n<s>u\na<e>\n<s>a\n", add_bos=False)
    logw = {s: seq_logprob(lm, prompt, tok.encode(s + "?", add_bos=False)) for s in ("a", "b")}
    assert enumerate_program(lm, lowered.program).log_z == pytest.approx(np.logaddexp.reduce(list(logw.values())),
                                                                        abs=1e-5)


def test_end_of_turn_that_is_not_a_special_token_terminates_as_text():
    """A template whose turns end with plain text: a hole that ends the turn is terminated by that text."""
    template = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n\n{% endfor %}"
                "{% if add_generation_prompt %}a:{% endif %}")
    lm = toy_chat_lm(template=template)
    low, lowered = lowering('user "a"\nassistant "[x]" where x in ["b", "c"]\n', lm.tokenizer)
    term = low.compiled[0].terminator
    assert term.kind == "text" and term.text == "\n\n"
    assert isinstance(lowered.program.segments[-1], Hole)  # the tail was generated by the hole


# --------------------------------------------------------------------------------------------------- errors


def test_model_without_a_chat_template_is_a_located_error():
    lm = ToyLM.random(VOCAB, context=1, positions=8, seed=0)
    assert lm.tokenizer.chat_template is None
    with pytest.raises(LoweringError) as info:
        lmprog.compile('"Q"\nuser "a?"\nassistant "[x]" where x in ["a"]\n', "t.lmp").run(lm=lm, particles=2)
    text = str(info.value)
    assert "t.lmp:2:1: the model has no chat template" in text
    assert '    user "a?"\n    ^^^^' in text


def test_template_that_rejects_the_conversation_is_a_located_error():
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}"
                "{% endif %}<s>{{ m['content'] }}<e>{% endfor %}")
    lm = toy_chat_lm(template=template)
    with pytest.raises(LoweringError, match=r"t.lmp:2:1: .*rejects this conversation: no system turns"):
        lowering('user "a"\nsystem "b"\n', lm.tokenizer)


def test_check_reports_holes_outside_assistant_turns_and_turns_in_branches():
    with pytest.raises(lmprog.program.LmpError) as info:
        lmprog.compile('user "[x]"\nif true:\n    assistant "[y]"\n', "t.lmp")
    text = str(info.value)
    assert "t.lmp:1:7: a user turn cannot contain a hole ('[x]')" in text
    assert "t.lmp:3:5: a chat turn (assistant) cannot be inside an if branch" in text
    # turns in loops are fine (unrolled), and a turn after the last assistant hole too
    lmprog.compile('for i in range(2):\n    user "q{i}"\n    assistant "[a]"\nuser "thanks"\nreturn a\n', "t.lmp")


def test_role_words_are_still_names_outside_statement_starts():
    p = lmprog.compile('input user: str = "a"\nlet system = user + "b"\n"{system} [x]"\nreturn x, system\n', "t.lmp")
    assert set(p.inputs) == {"user"}


# ------------------------------------------------------------------------------------------ template access


def test_sandbox_helpers_behave_as_in_transformers():
    t = ChatTemplate("{{ messages | tojson }}|{{ raise_exception is defined }}|{{ strftime_now('%Y') | length }}"
                     "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
                     "{% set ns = namespace(n=1) %}{{ ns.n }}|{{ dict(a=1).a }}")
    assert t.render([{"role": "user", "content": "<é>"}, {"role": "user", "content": "z"}]) == \
        '[{"role": "user", "content": "<é>"}, {"role": "user", "content": "z"}]|True|4<é>1|1'
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")
    with pytest.raises(ChatTemplateError):  # the sandbox: no reaching into Python internals
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])


def test_hf_folder_chat_template(tmp_path):
    tok = byte_tokenizer(specials=("<|im_end|>", "<|im_start|>"))
    (tmp_path / "tokenizer.json").write_text(tok.hf.to_str(), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": "x"}],
         "eos_token": "<|im_end|>", "bos_token": None}), encoding="utf-8")
    hf = tokenizer_from_hf_folder(tmp_path)
    assert hf.chat_template == CHATML and hf.chat_tokens == {"eos_token": "<|im_end|>"}
    (tmp_path / "chat_template.jinja").write_text("{{ eos_token }}", encoding="utf-8")
    hf = tokenizer_from_hf_folder(tmp_path)
    assert compile_chat_template(hf).render([]) == "<|im_end|>"
    assert compile_chat_template(byte_tokenizer()) is None


# ---------------------------------------------------------------------------------------- the default model


@pytest.mark.slow
def test_chat_sentiment_example_matches_the_exact_posterior_on_the_default_model(default_model):
    """examples/chat_sentiment.lmp on SmolLM2: P(label) ∝ p(label <|im_end|> | the chat prompt), the prompt
    rendered by the model's template (as transformers renders it), the end-of-turn token scored."""
    program = lmprog.load(Path(__file__).parent.parent / "examples" / "chat_sentiment.lmp")
    result = program.run(lm=default_model, particles=256, seed=0)
    tok = default_model.tokenizer
    review = program.inputs["review"].default
    messages = [{"role": "system", "content": "Classify the sentiment of the review as positive, negative or "
                                              "neutral. Answer with one word."},
                {"role": "user", "content": f"Review: {review}"}]
    prompt = tok.encode(compile_chat_template(tok).render(messages, add_generation_prompt=True), add_bos=False)
    exact = {}
    for label in ("positive", "negative", "neutral"):
        ids = prompt + tok.encode(label, add_bos=False) + [2]
        lp = np.asarray(default_model.logprobs(ids), np.float64)
        exact[label] = math.exp(sum(lp[i - 1, ids[i]] for i in range(len(prompt), len(ids))))
    z = sum(exact.values())
    tv = 0.5 * sum(abs(result.probability(label=k) - v / z) for k, v in exact.items())
    assert tv < 0.1, (result, exact)
    assert abs(result.log_evidence - math.log(z)) < 0.3
    last = result.conversation[-1]
    assert last["role"] == "assistant" and last["content"] in exact


def test_logprob_of_interpolated_in_a_turn_is_shown_in_its_message():
    """The messages show the value the run rendered into the prompt (the scorer remembers its requests), not a
    placeholder."""
    from test_logprob_of import toy_reference

    lm = toy_chat_lm(seed=3)
    src = ('user "a?"\nassistant "[x]" where x in ["a", "b"]\nuser "c {logprob_of(x, given=x):.4f}?"\n'
           'assistant "[y]" where y in ["a", "c"]\nreturn x, y\n')
    r = lmprog.compile(src, "t.lmp").run(lm=lm, particles=16, seed=0, strategy="importance", enumerate_holes=False)
    assert {s.values["x"] for s in r.samples} == {"a", "b"}  # token by token: both values among the particles
    for s in r.samples:
        x = s.values["x"]
        assert s.messages[2] == {"role": "user", "content": f"c {toy_reference(lm, x, x):.4f}?"}
