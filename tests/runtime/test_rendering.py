"""Rendering, tokenization and truncation (``services/runtime/rendering.py``) on the tiny models.

The contract of DESIGN.md ("Precise contract"), with the expected ids written out from the
tokenizer itself: ``text`` items tokenized verbatim without special tokens; ``prompt``+``response``
and ``messages`` through the chat template, its output tokenized without special tokens; encoders
without a template get a sentence pair and ``role: content`` lines. Over the maximum a ``text``
keeps its last tokens; the other forms lose prompt tokens from the left first, then the response's
beginning; ``truncated`` and ``prompt_tokens`` say what happened. And ``model_max_length``:
``--max-length``, else min(real tokenizer maximum, ``max_position_embeddings``). Items long
enough to be cut before tokenizing (a tail window) are tested in ``test_rendering_cut.py``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tokenizers import processors
from transformers import AutoConfig, AutoTokenizer

from services.common.errors import ErrorCode, ServiceError
from services.runtime.chat import ChatMessage
from services.runtime.items import EncodedItem, RewardInput
from services.runtime.rendering import Renderer, model_max_length
from tests.support.parity import text_of

LLAMA_MAX = 96  # the tiny Llama's positions (tests/conftest.py)
BERT_MAX = 64
SYSTEM = ChatMessage("system", "Be brief.")


@pytest.fixture(scope="module")
def llama_tok(tiny_llama_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def bert_tok(tiny_bert_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_bert_dir)


@pytest.fixture(scope="module")
def llama(llama_tok: Any) -> Renderer:
    return Renderer(llama_tok, LLAMA_MAX)


@pytest.fixture(scope="module")
def bert(bert_tok: Any) -> Renderer:
    return Renderer(bert_tok, BERT_MAX)


@pytest.fixture
def llama_with_bos(tiny_llama_dir: Path) -> Any:
    """The tiny Llama tokenizer made to add a BOS token by default (as many real ones do)."""
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.eos_token_id)]
    )
    assert tok("a fox")["input_ids"][0] == tok.eos_token_id  # the default call now adds it
    return tok


def ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def chat(tok: Any, messages: list[ChatMessage], *, generation_prompt: bool = False) -> str:
    rendered = tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )
    return str(rendered)


def one(renderer: Renderer, item: RewardInput) -> EncodedItem:
    (enc,) = renderer.encode([item])
    return enc


# -- text items ------------------------------------------------------------------------------------


def test_text_is_tokenized_verbatim_without_special_tokens(llama: Renderer, bert: Renderer, llama_tok: Any) -> None:
    text = "  leading and trailing spaces stay  \n"
    enc = one(llama, RewardInput(text=text))
    assert list(enc.input_ids) == ids(llama_tok, text)
    assert ids(llama_tok, text) != ids(llama_tok, text.strip())  # the spaces are really there
    assert (enc.truncated, enc.prompt_tokens, enc.token_type_ids) == (False, 0, None)
    enc = one(bert, RewardInput(text="the quick brown fox"))
    assert list(enc.input_ids) == ids(bert.tokenizer, "the quick brown fox")
    assert len(enc.input_ids) == 4  # four vocabulary words, no [CLS] / [SEP]
    assert (enc.truncated, enc.prompt_tokens) == (False, 0)


def test_text_adds_no_bos_even_when_the_tokenizer_would(llama_with_bos: Any) -> None:
    renderer = Renderer(llama_with_bos, LLAMA_MAX)
    enc = one(renderer, RewardInput(text="a fox"))
    assert list(enc.input_ids) == ids(llama_with_bos, "a fox")
    assert enc.input_ids[0] != llama_with_bos.eos_token_id


def test_text_over_the_maximum_keeps_its_last_tokens(llama: Renderer, bert: Renderer) -> None:
    for renderer, limit in ((llama, LLAMA_MAX), (bert, BERT_MAX)):
        text = text_of(150)
        full = ids(renderer.tokenizer, text)
        assert len(full) > limit
        enc = one(renderer, RewardInput(text=text))
        assert list(enc.input_ids) == full[-limit:]
        assert enc.truncated and enc.num_tokens == limit


def test_text_exactly_at_the_maximum_is_not_truncated(llama_tok: Any) -> None:
    text = text_of(30)
    n = len(ids(llama_tok, text))
    enc = one(Renderer(llama_tok, n), RewardInput(text=text))
    assert not enc.truncated and enc.num_tokens == n
    enc = one(Renderer(llama_tok, n - 1), RewardInput(text=text))
    assert enc.truncated and list(enc.input_ids) == ids(llama_tok, text)[1:]


# -- chat template ----------------------------------------------------------------------------------


def test_prompt_and_response_go_through_the_chat_template(llama: Renderer, llama_tok: Any) -> None:
    user = ChatMessage("user", "What is the capital of France?")
    enc = one(llama, RewardInput(prompt=user.content, response="Paris is the capital of France."))
    conversation = [user, ChatMessage("assistant", "Paris is the capital of France.")]
    assert list(enc.input_ids) == ids(llama_tok, chat(llama_tok, conversation))
    head = ids(llama_tok, chat(llama_tok, [user], generation_prompt=True))
    assert enc.prompt_tokens == len(head)
    assert list(enc.input_ids[: enc.prompt_tokens]) == head
    assert not enc.truncated and enc.token_type_ids is None


def test_a_prompt_of_messages_is_the_conversation_before_the_response(llama: Renderer, llama_tok: Any) -> None:
    prompt = (SYSTEM, ChatMessage("user", "How do I bake bread?"))
    enc = one(llama, RewardInput(prompt=prompt, response="Mix flour, water, salt and yeast."))
    rendered = chat(llama_tok, [*prompt, ChatMessage("assistant", "Mix flour, water, salt and yeast.")])
    assert list(enc.input_ids) == ids(llama_tok, rendered)
    assert enc.prompt_tokens == len(ids(llama_tok, chat(llama_tok, list(prompt), generation_prompt=True)))


def test_messages_render_with_the_template(llama: Renderer, llama_tok: Any) -> None:
    msgs = (SYSTEM, ChatMessage("user", "hi"), ChatMessage("assistant", "hello there"))
    enc = one(llama, RewardInput(messages=msgs))
    assert list(enc.input_ids) == ids(llama_tok, chat(llama_tok, list(msgs)))
    # The last turn is the assistant's: the prompt part ends with the generation prompt.
    assert enc.prompt_tokens == len(ids(llama_tok, chat(llama_tok, list(msgs[:2]), generation_prompt=True)))
    # A conversation ending on a user turn: its prompt part is the earlier turns as they are.
    msgs = (ChatMessage("user", "hi"), ChatMessage("assistant", "hello"), ChatMessage("user", "and?"))
    enc = one(llama, RewardInput(messages=msgs))
    assert list(enc.input_ids) == ids(llama_tok, chat(llama_tok, list(msgs)))
    assert enc.prompt_tokens == len(ids(llama_tok, chat(llama_tok, list(msgs[:2]))))
    # One message: no prompt at all.
    assert one(llama, RewardInput(messages=(ChatMessage("assistant", "alone"),))).prompt_tokens == 0


def test_template_output_gets_no_special_tokens(llama_with_bos: Any) -> None:
    renderer = Renderer(llama_with_bos, LLAMA_MAX)
    enc = one(renderer, RewardInput(prompt="hi", response="hello"))
    rendered = chat(llama_with_bos, [ChatMessage("user", "hi"), ChatMessage("assistant", "hello")])
    assert list(enc.input_ids) == ids(llama_with_bos, rendered)
    assert enc.input_ids[0] != llama_with_bos.eos_token_id


def test_a_template_that_rewrites_earlier_turns_makes_the_item_prompt_less(tiny_llama_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    # The first line counts the messages: the prompt's own rendering is no prefix of the whole.
    tok.chat_template = (
        "{{ messages|length }}\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    enc = one(Renderer(tok, LLAMA_MAX), RewardInput(prompt="the dog", response="a fox"))
    assert list(enc.input_ids) == ids(tok, "2\nuser: the dog\nassistant: a fox\n")
    assert enc.prompt_tokens == 0


# -- encoders without a chat template ---------------------------------------------------------------


def test_encoder_prompt_and_response_are_a_sentence_pair(bert: Renderer, bert_tok: Any) -> None:
    assert not bert.has_template
    enc = one(bert, RewardInput(prompt="the quick brown fox", response="jumps over the lazy dog"))
    pair = bert_tok("the quick brown fox", "jumps over the lazy dog")
    assert list(enc.input_ids) == pair["input_ids"]
    assert list(enc.token_type_ids or ()) == pair["token_type_ids"]
    assert enc.input_ids[0] == bert_tok.cls_token_id and enc.input_ids[-1] == bert_tok.sep_token_id
    assert set(enc.token_type_ids or ()) == {0, 1}
    assert enc.prompt_tokens == 4  # the prompt's own word pieces
    assert not enc.truncated


def test_encoder_messages_are_role_content_lines(bert: Renderer, bert_tok: Any) -> None:
    msgs = (ChatMessage("user", "the dog"), ChatMessage("assistant", "a fox"))
    enc = one(bert, RewardInput(messages=msgs))
    single = bert_tok("user: the dog\nassistant: a fox\n")
    assert list(enc.input_ids) == single["input_ids"]
    assert list(enc.token_type_ids or ()) == single["token_type_ids"]
    assert enc.prompt_tokens == len(ids(bert_tok, "user: the dog\n"))


def test_encoder_prompt_messages_are_lines_in_a_sentence_pair(bert: Renderer, bert_tok: Any) -> None:
    prompt = (ChatMessage("system", "be brief"), ChatMessage("user", "the dog"))
    enc = one(bert, RewardInput(prompt=prompt, response="a fox"))
    assert list(enc.input_ids) == bert_tok("system: be brief\nuser: the dog\n", "a fox")["input_ids"]


# -- truncation of prompt + response and messages --------------------------------------------------


def test_decoder_prompt_loses_tokens_from_the_left_first(llama: Renderer, llama_tok: Any) -> None:
    prompt, response = text_of(120), "Paris is the capital of France."
    enc = one(llama, RewardInput(prompt=prompt, response=response))
    full = ids(llama_tok, chat(llama_tok, [ChatMessage("user", prompt), ChatMessage("assistant", response)]))
    head = ids(llama_tok, chat(llama_tok, [ChatMessage("user", prompt)], generation_prompt=True))
    excess = len(full) - LLAMA_MAX
    assert 0 < excess < len(head)
    assert list(enc.input_ids) == full[excess:]
    assert enc.truncated and enc.num_tokens == LLAMA_MAX
    assert enc.prompt_tokens == len(head) - excess
    assert list(enc.input_ids[enc.prompt_tokens :]) == full[len(head) :]  # the response is whole


def test_decoder_response_alone_too_long_loses_its_beginning(llama: Renderer, llama_tok: Any) -> None:
    prompt, response = "the dog", text_of(150)
    enc = one(llama, RewardInput(prompt=prompt, response=response))
    full = ids(llama_tok, chat(llama_tok, [ChatMessage("user", prompt), ChatMessage("assistant", response)]))
    assert list(enc.input_ids) == full[-LLAMA_MAX:]
    assert enc.truncated and enc.prompt_tokens == 0
    assert list(enc.input_ids[-3:]) == full[-3:]  # the end (where a decoder reads its score) is kept


def test_decoder_messages_lose_the_earliest_turns_first(llama: Renderer, llama_tok: Any) -> None:
    msgs = (ChatMessage("user", text_of(80)), ChatMessage("assistant", "ok"), ChatMessage("user", "thanks"))
    enc = one(llama, RewardInput(messages=msgs))
    full = ids(llama_tok, chat(llama_tok, list(msgs)))
    head = ids(llama_tok, chat(llama_tok, list(msgs[:2])))
    excess = len(full) - LLAMA_MAX
    assert excess > 0
    assert list(enc.input_ids) == full[excess:]
    assert enc.truncated and enc.prompt_tokens == len(head) - excess


def test_encoder_pair_prompt_is_cut_from_the_left(bert: Renderer, bert_tok: Any) -> None:
    prompt, response = text_of(100), "jumps over the lazy dog"
    p, r = ids(bert_tok, prompt), ids(bert_tok, response)
    keep = BERT_MAX - 3 - len(r)  # [CLS] prompt [SEP] response [SEP]
    enc = one(bert, RewardInput(prompt=prompt, response=response))
    cls, sep = bert_tok.cls_token_id, bert_tok.sep_token_id
    assert list(enc.input_ids) == [cls, *p[-keep:], sep, *r, sep]
    assert list(enc.token_type_ids or ()) == [0] * (keep + 2) + [1] * (len(r) + 1)
    assert enc.truncated and enc.prompt_tokens == keep


def test_encoder_pair_response_alone_too_long_loses_its_beginning(bert: Renderer, bert_tok: Any) -> None:
    response = text_of(100)
    r = ids(bert_tok, response)
    enc = one(bert, RewardInput(prompt="the dog", response=response))
    cls, sep = bert_tok.cls_token_id, bert_tok.sep_token_id
    assert list(enc.input_ids) == [cls, sep, *r[-(BERT_MAX - 3) :], sep]
    assert enc.truncated and enc.prompt_tokens == 0


def test_encoder_pair_whose_response_fills_the_maximum_exactly(bert: Renderer, bert_tok: Any) -> None:
    response = " ".join(["fox"] * (BERT_MAX - 3))
    enc = one(bert, RewardInput(prompt="the dog", response=response))
    cls, sep = bert_tok.cls_token_id, bert_tok.sep_token_id
    assert list(enc.input_ids) == [cls, sep, *ids(bert_tok, response), sep]
    assert enc.truncated and enc.prompt_tokens == 0


def test_encoder_lines_lose_the_earliest_turns_and_keep_the_special_tokens(bert: Renderer, bert_tok: Any) -> None:
    msgs = (ChatMessage("user", text_of(80)), ChatMessage("assistant", "a fox"))
    body = ids(bert_tok, f"user: {text_of(80)}\nassistant: a fox\n")
    prefix = len(ids(bert_tok, f"user: {text_of(80)}\n"))
    enc = one(bert, RewardInput(messages=msgs))
    cls, sep = bert_tok.cls_token_id, bert_tok.sep_token_id
    kept = body[-(BERT_MAX - 2) :]
    assert list(enc.input_ids) == [cls, *kept, sep]
    assert enc.truncated and enc.prompt_tokens == prefix - (len(body) - len(kept))


# -- requests --------------------------------------------------------------------------------------


def test_a_mixed_request_encodes_each_item_as_if_alone(llama: Renderer, bert: Renderer) -> None:
    items = [
        RewardInput(text="the dog"),
        RewardInput(prompt="the dog", response="a fox"),
        RewardInput(text=text_of(150)),
        RewardInput(messages=(ChatMessage("user", "hi"), ChatMessage("assistant", "hello"))),
        RewardInput(prompt=(SYSTEM, ChatMessage("user", "hi")), response=text_of(150)),
        RewardInput(prompt="the dog", response="a cat"),  # same prompt as item 1
    ]
    for renderer in (llama, bert):
        assert renderer.encode(items) == [one(renderer, x) for x in items]


def test_an_item_with_no_tokens_is_rejected_with_its_index(bert: Renderer) -> None:
    with pytest.raises(ServiceError) as info:
        bert.encode([RewardInput(text="the dog"), RewardInput(text=" ")])  # no special tokens: nothing left
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert (info.value.message, info.value.item) == ("item renders to zero tokens", 1)


def test_a_slow_tokenizer_is_refused() -> None:
    with pytest.raises(ValueError, match="fast"):
        Renderer(SimpleNamespace(is_fast=False), 10)


def test_the_renderer_sets_left_truncation(tiny_bert_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    tok.truncation_side = "right"
    Renderer(tok, BERT_MAX)
    assert tok.truncation_side == "left"


# -- model_max_length --------------------------------------------------------------------------------


def test_model_max_length_of_the_tiny_models(tiny_llama_dir: Path, tiny_bert_dir: Path) -> None:
    for folder, want in ((tiny_llama_dir, LLAMA_MAX), (tiny_bert_dir, BERT_MAX)):
        tok, config = AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)
        assert model_max_length(tok, config, None) == want
        assert model_max_length(tok, config, 16) == 16


@pytest.mark.parametrize(
    ("tokenizer_max", "config", "override", "want"),
    [
        pytest.param(512, {"max_position_embeddings": 2048}, 100, 100, id="override below"),
        pytest.param(512, {"max_position_embeddings": 2048}, 4096, 4096, id="override above"),
        pytest.param(512, {"max_position_embeddings": 2048}, None, 512, id="tokenizer smaller"),
        pytest.param(4096, {"max_position_embeddings": 2048}, None, 2048, id="config smaller"),
        pytest.param(int(1e30), {"max_position_embeddings": 2048}, None, 2048, id="tokenizer sentinel"),
        pytest.param(None, {"max_position_embeddings": 2048}, None, 2048, id="no tokenizer maximum"),
        pytest.param(512.0, {"max_position_embeddings": 2048}, None, 512, id="float tokenizer maximum"),
        pytest.param(4096, {"n_positions": 1024}, None, 1024, id="gpt2 n_positions"),
        pytest.param(300, {}, None, 300, id="tokenizer only"),
    ],
)
def test_model_max_length_rule(tokenizer_max: Any, config: dict[str, int], override: int | None, want: int) -> None:
    tok = SimpleNamespace(model_max_length=tokenizer_max)
    assert model_max_length(tok, SimpleNamespace(**config), override) == want


def test_model_max_length_unknown_asks_for_the_flag() -> None:
    with pytest.raises(ValueError, match="pass --max-length"):
        model_max_length(SimpleNamespace(model_max_length=int(1e30)), SimpleNamespace(), None)


# -- vLLM's pooling input forms: text with the tokenizer's special tokens, token ids -----------------


@pytest.mark.parametrize("length", [5, 40, 300, 5000])
def test_text_with_special_tokens_is_exactly_the_default_tokenizer_call(
    llama_with_bos: Any, bert_tok: Any, length: int
) -> None:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "12", "times"]
    text = " ".join(words[i % len(words)] for i in range(length))
    for tok, max_length in ((llama_with_bos, LLAMA_MAX), (bert_tok, BERT_MAX)):
        full = list(tok(text)["input_ids"])  # BOS first (Llama-style) or [CLS] ... [SEP] (BERT)
        assert full != ids(tok, text)
        (item,) = Renderer(tok, max_length).encode([RewardInput(text=text, add_special_tokens=True)])
        assert list(item.input_ids) == full[-max_length:]
        assert item.truncated == (len(full) > max_length)


def test_token_ids_are_kept_as_given_and_checked_against_the_vocabulary(llama: Renderer, llama_tok: Any) -> None:
    given = tuple(ids(llama_tok, "a fox and a dog"))
    (item,) = llama.encode([RewardInput(token_ids=given)])
    assert item.input_ids == given and not item.truncated
    long = tuple(range(3, 3 + LLAMA_MAX + 10))
    (cut,) = llama.encode([RewardInput(token_ids=long)])
    assert cut.input_ids == long[-LLAMA_MAX:] and cut.truncated
    with pytest.raises(ServiceError) as err:
        llama.encode([RewardInput(text="ok"), RewardInput(token_ids=(1, len(llama_tok)))])
    assert err.value.code == ErrorCode.INVALID_ARGUMENT and err.value.item == 1
    assert "outside the vocabulary" in err.value.message
