"""Cut before you tokenize (``services/runtime/rendering.py``, its module docstring).

A long item's tokenizer calls see only a tail window of it, and what the renderer keeps (ids,
``truncated``, ``prompt_tokens``, ``token_type_ids``) is what tokenizing everything and then cutting
gave. The oracle is that old rule, copied unchanged into ``scripts/check_truncation_parity.py``
(``reference_encode``); a :class:`RecordingTokenizer` remembers the longest string any tokenizer
call was given. The tiny models cover every path (template, text, role lines, sentence pair);
the slow tests run SmolLM2 (the default model) on HH-RLHF rows and on hostile strings.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from tokenizers import Regex, pre_tokenizers
from transformers import AutoTokenizer

from services.common.errors import ServiceError
from services.runtime.chat import ChatMessage
from services.runtime.items import EncodedItem, RewardInput
from services.runtime.rendering import Renderer
from tests.support.parity import text_of
from tests.support.paths import ROOT, SHARED_DATA
from tests.support.tiny_models import CORPUS, bpe_tokenizer

SCRIPT = ROOT / "scripts" / "check_truncation_parity.py"
HH_DIR = SHARED_DATA / "hh-rlhf"
LLAMA_MAX, BERT_MAX = 96, 64

# SmolLM2-135M-Instruct's template: a default system turn when the first message is not one, so
# a conversation without its earlier turns renders a different head.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def two_windows(need: int) -> int:
    """The most characters a call sees when the first window is accepted: the second window
    (check), moved back to a word end."""
    return 2 * 6 * (need + 32) + 1 + 64


def largest_window(need: int) -> int:
    return 16 * 6 * (need + 32) + 4 + 64


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_truncation_parity", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def llama_tok(tiny_llama_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def smol_template_tok(tiny_llama_dir: Path) -> Any:
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = SMOLLM2_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def bert_tok(tiny_bert_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_bert_dir)


def encode(script: ModuleType, tok: Any, max_length: int, items: list[RewardInput]) -> tuple[list[EncodedItem], int]:
    """The renderer's items and the longest string its tokenizer calls saw."""
    recording = script.RecordingTokenizer(tok)
    got = Renderer(recording, max_length).encode(items)
    return got, recording.longest


def oracle(script: ModuleType, tok: Any, max_length: int, items: list[RewardInput]) -> list[EncodedItem]:
    tok.truncation_side = "left"
    return [script.reference_encode(tok, max_length, x) for x in items]


def turns(n: int, words: int, *, first: str = "user") -> tuple[ChatMessage, ...]:
    roles = ("user", "assistant") if first == "user" else ("assistant", "user")
    return tuple(ChatMessage(roles[i % 2], f"turn {i}: {text_of(words + i % 7)}") for i in range(n))


# -- the tiny models: every path ------------------------------------------------------------------


def test_a_long_text_is_tokenized_only_near_its_end(script: ModuleType, llama_tok: Any) -> None:
    items = [RewardInput(text=text_of(30_000))]  # 165 KB
    got, longest = encode(script, llama_tok, LLAMA_MAX, items)
    assert got == oracle(script, llama_tok, LLAMA_MAX, items)
    assert got[0].truncated and got[0].num_tokens == LLAMA_MAX
    assert len(items[0].text or "") == 164_805 and longest <= two_windows(LLAMA_MAX) == 1601


def test_long_conversations_keep_the_template_head_and_the_prompt_boundary(
    script: ModuleType, smol_template_tok: Any
) -> None:
    # 60 turns of ~30 words: the kept tokens start deep inside the conversation, the template's
    # default system turn is far outside the window, and the prompt boundary moves with the
    # maximum: inside the kept tokens, before them (response only), or the response cut too.
    long_prompt = turns(59, 30)
    items = [
        RewardInput(messages=turns(60, 30)),
        RewardInput(messages=(ChatMessage("system", "Be brief."), *turns(60, 30))),
        RewardInput(messages=turns(61, 30, first="assistant")),
        RewardInput(prompt=long_prompt, response="Paris is the capital of France."),
        RewardInput(prompt=long_prompt, response=text_of(60)),
        RewardInput(prompt=text_of(3_000), response=text_of(8)),
        RewardInput(prompt="the dog", response=text_of(3_000)),
        RewardInput(prompt=long_prompt, response="short"),  # shares its prompt rendering with item 3
    ]
    prompt_tokens = set()
    for max_length in (17, 40, 64, LLAMA_MAX):
        got, longest = encode(script, smol_template_tok, max_length, items)
        want = oracle(script, smol_template_tok, max_length, items)
        assert got == want, max_length
        assert all(e.truncated for e in got)
        assert longest <= two_windows(max_length)
        prompt_tokens |= {e.prompt_tokens for e in got}
    assert 0 in prompt_tokens and len(prompt_tokens) > 10  # boundaries at many places, checked exactly


def test_short_items_are_tokenized_whole_and_untouched(script: ModuleType, smol_template_tok: Any) -> None:
    items = [
        RewardInput(messages=(ChatMessage("system", "Be brief."), *turns(3, 3))),
        RewardInput(prompt=(ChatMessage("system", "Be brief."), ChatMessage("user", "the dog")), response="a fox"),
        RewardInput(text=text_of(20)),
    ]
    got, _ = encode(script, smol_template_tok, LLAMA_MAX, items)
    assert got == oracle(script, smol_template_tok, LLAMA_MAX, items)
    assert not any(e.truncated for e in got)


def test_encoder_pairs_cut_the_prompt_or_the_response_through_a_window(script: ModuleType, bert_tok: Any) -> None:
    fill = " ".join(["fox"] * (BERT_MAX - 3))  # exactly the room a pair leaves: 61 word pieces
    items = [
        RewardInput(prompt=text_of(5_000), response="jumps over the lazy dog"),  # prompt cut from the left
        RewardInput(prompt="the dog", response=text_of(5_000)),  # prompt gone, response's end kept
        RewardInput(prompt=text_of(5_000), response=text_of(5_000)),
        RewardInput(prompt=text_of(5_000), response=fill),  # no room for any prompt token
        RewardInput(prompt=text_of(5_000), response=" ".join(["fox"] * (BERT_MAX - 4))),  # room for one
        RewardInput(prompt=turns(80, 20), response="a fox"),  # prompt messages as role lines
        RewardInput(prompt="", response=fill),  # fits exactly: not truncated
    ]
    got, longest = encode(script, bert_tok, BERT_MAX, items)
    want = oracle(script, bert_tok, BERT_MAX, items)
    assert got == want
    assert [e.prompt_tokens for e in got] == [BERT_MAX - 3 - 5, 0, 0, 0, 1, BERT_MAX - 3 - 2, 0]
    assert [e.truncated for e in got] == [True] * 6 + [False]
    assert all(e.token_type_ids is not None for e in got)
    assert longest <= two_windows(BERT_MAX - 3) == 1181


def test_encoder_role_lines_lose_the_earliest_turns_through_a_window(script: ModuleType, bert_tok: Any) -> None:
    # At 64 the kept tokens reach back into the prompt turns; at 16 only the last turn is left.
    items = [
        RewardInput(messages=turns(80, 20)),
        RewardInput(messages=(*turns(80, 20), ChatMessage("assistant", text_of(200)))),  # response alone too long
    ]
    for max_length in (16, BERT_MAX):
        got, longest = encode(script, bert_tok, max_length, items)
        assert got == oracle(script, bert_tok, max_length, items)
        assert got[1].prompt_tokens == 0 and all(e.truncated for e in got)
        assert longest <= two_windows(max_length - 2)
    assert got[0].prompt_tokens == 28


def test_a_cut_inside_a_run_that_splits_by_its_start_is_noticed(script: ModuleType) -> None:
    # Digits in threes (as Llama 3 splits them): where a run of digits starts decides every split
    # in it. Window 0 (6 × (40 + 32) = 432 characters) starts inside the run, out of phase with
    # the whole text; window 1 (865) starts before the run and disagrees with it, so window 1
    # becomes the candidate, and window 2 (1,730) confirms it. The text (3,753 characters) is
    # never tokenized whole.
    tok = bpe_tokenizer(CORPUS + ["1111 111 11 1 11111111"] * 20, eos="<|endoftext|>", bos="<|endoftext|>", pad="<pad>")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\d{1,3}"), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    text = text_of(800)[:3001] + "1" * 700 + " " + text_of(10)
    naive = tok(text[-432:], add_special_tokens=False)["input_ids"]
    (want,) = oracle(script, tok, 40, [RewardInput(text=text)])
    assert naive[-40:] != list(want.input_ids)  # window 0 alone would be wrong
    got, longest = encode(script, tok, 40, [RewardInput(text=text)])
    assert got == [want]
    assert len(text) == 3753 and 1730 <= longest < 1730 + 64


def test_hostile_strings_stay_bounded(script: ModuleType, llama_tok: Any, bert_tok: Any) -> None:
    # 200,000 characters each; SmolLM2's exactness on them is measured in the slow test below.
    for name, text in script.hostile_strings(200_000).items():
        for tok, max_length in ((llama_tok, LLAMA_MAX), (bert_tok, BERT_MAX)):
            recording = script.RecordingTokenizer(tok)
            try:
                (got,) = Renderer(recording, max_length).encode([RewardInput(text=text)])
            except ServiceError:  # newlines make no BERT token at all, windowed or not
                assert (name, tok) == ("newlines", bert_tok)
                continue
            assert got.truncated and got.num_tokens <= max_length, name
            assert recording.longest <= largest_window(max_length), name


def test_a_renderer_copies_for_each_tokenizer_thread(llama_tok: Any) -> None:
    renderer = Renderer(llama_tok, LLAMA_MAX)
    item = RewardInput(messages=turns(60, 30))
    assert copy.deepcopy(renderer).encode([item]) == renderer.encode([item])


# -- the default model (SmolLM2) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(script: ModuleType) -> Any:
    from services.runtime.default_model import backbone_dir

    return AutoTokenizer.from_pretrained(backbone_dir())


@pytest.mark.slow  # SmolLM2's tokenizer, 4 × 1,800 items by both rules (~10 s)
@pytest.mark.skipif(not HH_DIR.is_dir(), reason="needs ../shared/data/hh-rlhf")
def test_hh_rows_keep_the_old_rule_exactly(script: ModuleType, smollm2: Any) -> None:
    # The script's check on the first 150 rows of each file (all 1,000: run the script).
    items = script.hh_items(HH_DIR, 150)
    assert len(items) == 1800
    windowed = {}
    for max_length in (16, 32, 128, 256):
        out = script.compare(smollm2, max_length, items)
        assert out.differences == [], max_length
        assert out.longest <= largest_window(max_length)
        windowed[max_length] = out.windowed
    # Items of up to 12 × (max_length + 32) + 1 characters are tokenized whole (the old rule
    # itself): the short maxima are the ones that send many HH dialogues through a window.
    assert windowed[16] > 300 and windowed[32] > 100


@pytest.mark.slow  # SmolLM2, 200 KB strings tokenized whole by the oracle (~10 s)
def test_smollm2_on_hostile_strings(script: ModuleType, smollm2: Any) -> None:
    differs = []
    for name, text in script.hostile_strings(200_000).items():
        out = script.compare(smollm2, 128, [RewardInput(text=text)])
        assert out.longest <= largest_window(128) == 15_428, name
        if out.differences:
            differs.append(name)
    # Only a run with no split point longer than every window (module docstring): BPE merges
    # "a" * 200_001 from its start, so it ends in "a", the windows in "aaaa".
    assert differs == ["a * (n+1)"]


@pytest.mark.slow  # SmolLM2, a 1 MiB conversation by both rules (~3 s)
def test_smollm2_large_conversation_and_long_tokens(script: ModuleType, smollm2: Any) -> None:
    conversation = script.huge_conversation(241, 4096)
    items = [
        RewardInput(messages=conversation),
        RewardInput(prompt=conversation[:-1], response=conversation[-1].content),
        # 63 tokens of up to 80 characters: long in characters, short in tokens, never truncated.
        RewardInput(text="#" * 4000),
    ]
    for max_length in (128, 256):
        got, longest = encode(script, smollm2, max_length, items)
        assert got == oracle(script, smollm2, max_length, items)
        assert [e.truncated for e in got] == [True, True, False] and got[2].num_tokens == 63
        assert longest <= 4000
