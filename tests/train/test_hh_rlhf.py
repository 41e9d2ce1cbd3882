"""The one HH-RLHF parser (rlhf_train.hh_rlhf): every rule on literal HH strings, with the
training rules (default: ``train rm`` and the benchmarks) and judge-eval's (``chat_form=False,
single_turn=True``), including the rows where the two parsers it replaces disagreed."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from rlhf_train.eval.judge_eval import load_dataset
from rlhf_train.hh_rlhf import HH_FILES, HHPair, Malformed, load_pairs, parse_dialogue, parse_pair
from services.runtime.chat import ChatMessage

U, A = "user", "assistant"
PROMPT = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Help me?"


def judge(chosen: str, rejected: str) -> HHPair:
    return parse_pair(chosen, rejected, chat_form=False, single_turn=True)


def reason(fn: Any, *args: str) -> str:
    with pytest.raises(Malformed) as info:
        fn(*args)
    return str(info.value)


def test_prompt_is_the_shared_dialogue_and_the_responses_follow_the_last_assistant_tag() -> None:
    pair = parse_pair(PROMPT + "\n\nAssistant: Sure.", PROMPT + "\n\nAssistant: No.")
    assert pair == HHPair(
        (ChatMessage(U, "Hi there"), ChatMessage(A, "Hello!"), ChatMessage(U, "Help me?")), "Sure.", "No."
    )
    prompt, chosen, rejected = pair  # unpacks like the tuple the old parsers returned
    assert (len(prompt), chosen, rejected) == (3, "Sure.", "No.")
    assert judge(PROMPT + "\n\nAssistant: Sure.", PROMPT + "\n\nAssistant: No.") == pair


def test_only_the_one_separator_space_is_dropped_the_rest_is_verbatim() -> None:
    chosen = "\n\nHuman:  two spaces \n\nAssistant:  keep one\n"
    rejected = "\n\nHuman:  two spaces \n\nAssistant:no space"
    for parse in (parse_pair, judge):
        assert parse(chosen, rejected) == HHPair((ChatMessage(U, " two spaces "),), " keep one\n", "no space")
    assert parse_dialogue("\n\nHuman: a\n\nAssistant:  two spaces") == (
        ChatMessage(U, "a"),
        ChatMessage(A, " two spaces"),
    )


@pytest.mark.parametrize("parse", [parse_pair, judge])
def test_rules_every_caller_gets(parse: Any) -> None:
    assert reason(parse, "\n\nHuman: hi", "\n\nHuman: hi") == "no Assistant turn"
    # The rejected dialogue differs before the final Assistant tag of the chosen one.
    assert (
        reason(parse, "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d", "\n\nHuman: a\n\nAssistant: x")
        == "chosen and rejected do not share the prompt"
    )
    # Text before the first turn: the old judge-eval parser glued it onto the first message.
    assert reason(parse, "Hi\n\nAssistant: x", "Hi\n\nAssistant: y") == "does not start with Human"
    assert reason(parse, "\n\nAssistant: x", "\n\nAssistant: y") == "does not start with Human"  # empty prompt
    assert reason(parse, PROMPT + "\n\nAssistant: same", PROMPT + "\n\nAssistant:same") == "chosen == rejected"


def test_turns_that_do_not_alternate_training_rejects_judge_eval_keeps() -> None:
    prompt = "\n\nHuman: q\n\nAssistant: part one\n\nAssistant: part two\n\nHuman: and?"
    chosen, rejected = prompt + "\n\nAssistant: yes", prompt + "\n\nAssistant: no"
    assert reason(parse_pair, chosen, rejected) == "turns do not alternate"
    assert judge(chosen, rejected).prompt == (
        ChatMessage(U, "q"),
        ChatMessage(A, "part one"),
        ChatMessage(A, "part two"),
        ChatMessage(U, "and?"),
    )


def test_prompt_ending_with_an_assistant_turn_training_rejects_judge_eval_keeps() -> None:
    chosen = "\n\nHuman: q\n\nAssistant: a\n\nAssistant: b"
    rejected = "\n\nHuman: q\n\nAssistant: a\n\nAssistant: c"
    assert reason(parse_pair, chosen, rejected) == "prompt does not end with a Human turn"
    assert judge(chosen, rejected) == HHPair((ChatMessage(U, "q"), ChatMessage(A, "a")), "b", "c")


def test_empty_turns_and_responses_training_rejects_judge_eval_keeps() -> None:
    empty_turn = "\n\nHuman: q\n\nAssistant:\n\nHuman: again?"
    assert reason(parse_pair, empty_turn + "\n\nAssistant: x", empty_turn + "\n\nAssistant: y") == "empty turn"
    assert judge(empty_turn + "\n\nAssistant: x", empty_turn + "\n\nAssistant: y").prompt[1] == ChatMessage(A, "")

    # harmless-base has rows whose human-chosen answer is the empty one; the judge judges it.
    chosen, rejected = "\n\nHuman: Their address?\n\nAssistant:", "\n\nHuman: Their address?\n\nAssistant: It is ..."
    assert reason(parse_pair, chosen, rejected) == "empty response"
    assert reason(parse_pair, rejected, chosen) == "empty response"
    assert judge(chosen, rejected) == HHPair((ChatMessage(U, "Their address?"),), "", "It is ...")


def test_responses_that_run_on_into_further_turns_training_keeps_judge_eval_rejects() -> None:
    # The committed default head was trained on rows like these, so training must keep them.
    rejected = PROMPT + "\n\nAssistant: Hermes.\n\nAssistant: Shall I read more?"
    assert parse_pair(PROMPT + "\n\nAssistant: Zeus.", rejected).rejected == "Hermes.\n\nAssistant: Shall I read more?"
    assert reason(judge, PROMPT + "\n\nAssistant: Zeus.", rejected) == "a response runs on into further turns"

    chosen = PROMPT + "\n\nAssistant: Zeus.\n\nHuman: thanks"
    assert parse_pair(chosen, PROMPT + "\n\nAssistant: Hermes.").chosen == "Zeus.\n\nHuman: thanks"
    assert reason(judge, chosen, PROMPT + "\n\nAssistant: Hermes.") == "a response runs on into further turns"


def test_checks_run_in_a_fixed_order() -> None:
    # Both non-alternating and with an empty response: counted under the first rule that fails.
    prompt = "\n\nHuman: q\n\nHuman: q again"
    assert reason(parse_pair, prompt + "\n\nAssistant:", prompt + "\n\nAssistant: a") == "turns do not alternate"
    assert judge(prompt + "\n\nAssistant:", prompt + "\n\nAssistant: a").chosen == ""


def _write_hh(folder: Path, name: str, lines: list[str]) -> None:
    with gzip.open(folder / f"{name}.test.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(line + "\n" for line in lines)


def test_load_pairs_reads_both_files_in_order_and_counts_skipped_rows(tmp_path: Path) -> None:
    def row(chosen: str, rejected: str) -> str:
        return json.dumps({"chosen": chosen, "rejected": rejected})

    good = row(PROMPT + "\n\nAssistant: Sure.", PROMPT + "\n\nAssistant: No.")
    _write_hh(
        tmp_path,
        "helpful-base",
        [good, row(PROMPT + "\n\nAssistant: x", PROMPT + "\n\nAssistant: x"), "not json", json.dumps({"chosen": 1})],
    )
    _write_hh(tmp_path, "harmless-base", [row("\n\nHuman: q\n\nAssistant:", "\n\nHuman: q\n\nAssistant: a"), good])
    pairs, skipped = load_pairs(tmp_path)
    assert HH_FILES == ("helpful-base", "harmless-base")
    assert [(p.source, p.index, p.chosen, p.rejected) for p in pairs] == [
        ("helpful-base", 0, "Sure.", "No."),
        ("harmless-base", 1, "Sure.", "No."),
    ]
    assert pairs[0].prompt[-1] == ChatMessage(U, "Help me?")
    assert skipped == {
        "helpful-base": {"chosen == rejected": 1, "not a {chosen, rejected} JSON row": 2},
        "harmless-base": {"empty response": 1},
    }

    (tmp_path / "harmless-base.test.jsonl.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"harmless-base\.test\.jsonl\.gz is missing"):
        load_pairs(tmp_path)


def test_judge_eval_loader_uses_the_judge_rules(tmp_path: Path) -> None:
    rows = [
        {
            "chosen": "\n\nHuman: Their address?\n\nAssistant:",
            "rejected": "\n\nHuman: Their address?\n\nAssistant: 1 Main St",
        },
        {"chosen": PROMPT + "\n\nAssistant: Zeus.", "rejected": PROMPT + "\n\nAssistant: Hermes.\n\nAssistant: More?"},
    ]
    f = tmp_path / "hh.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ds = load_dataset(f, "hh-rlhf")
    assert [(e.prompt, sorted([e.response_a, e.response_b])) for e in ds.examples] == [
        ([{"role": "user", "content": "Their address?"}], ["", "1 Main St"])
    ]
    assert ds.skipped == {"a response runs on into further turns": 1}
