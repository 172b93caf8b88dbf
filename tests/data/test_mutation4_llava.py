"""Mutation round 4 (emma_mamba.data.llava): the answer tokens a truncation cut off are counted exactly (a cut inside
the answer), hoisted placeholders take their own line break before them, and capitalised LLaVA roles get the
lower-case hint."""

from __future__ import annotations

import pytest

from emma_mamba.data.llava import IGNORE_INDEX, DataError, hoist_images
from tests.data.test_llava import folder, make, rec, tok  # noqa: F401 (fixtures)

ANSWER = "Hello there, how are you today?"


def test_a_cut_inside_the_answer_counts_the_answer_tokens_lost(folder, tok):  # noqa: F811
    t, _ = tok
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ANSWER}]
    full = make(folder, tok, [rec(0, image=None, conv=conv)]).samples[0]
    # oracle: the trained piece is the answer and its turn end, tokenised on their own (the chat template)
    trained = t.encode(ANSWER + "<|endoftext|>")
    assert len(trained) > 4
    first = len(full.input_ids) - len(trained)  # text only: one position per token, the answer last
    assert list(full.input_ids[first:]) == trained and full.labels[first - 1] == IGNORE_INDEX
    ds = make(folder, tok, [rec(0, image=None, conv=conv)], max_length=first + 2)  # two answer tokens kept
    s, rep = ds.samples[0], ds.report
    assert s.input_ids == full.input_ids[:first + 2] and list(s.labels[first:]) == trained[:2]
    assert (rep.truncated, rep.truncated_tokens, rep.dropped_images) == (1, len(trained) - 2, 0)
    assert rep.truncated_answer_tokens == len(trained) - 2


def test_hoisting_takes_the_placeholders_own_line_breaks_and_keeps_the_questions():
    assert hoist_images("Look:\n<image> here", "<image>") == ("<image>", "Look: here")
    assert hoist_images("<image>\nLine one\nLine two", "<image>") == ("<image>", "Line one\nLine two")
    assert hoist_images("A\n<image>\nB", "<image>") == ("<image>", "A\nB")  # one line break goes with it


@pytest.mark.parametrize("role", ["GPT", "Human", "model", "bot"])
def test_a_role_in_the_wrong_case_or_another_name_gets_the_rename_hint(folder, tok, role):  # noqa: F811
    conv = [{"from": "human", "value": "Q"}, {"from": role, "value": "A"}]
    with pytest.raises(DataError, match=rf"turn 1 has role '{role}'; expected 'human' or 'gpt' \(LLaVA's format "
                                        rf"names the user's turns 'human' and the model's 'gpt', in lower case: "
                                        rf"rename the roles\)") as e:
        make(folder, tok, [{"id": "x", "conversations": conv}])
    assert e.value.reason == "bad_role"
