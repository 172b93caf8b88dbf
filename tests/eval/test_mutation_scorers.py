"""VQA answer normalisation: the punctuation rule of the official evaluation, both of its "touches a space" sides.

Found by mutation testing: dropping either half of the condition ``(p + " ") in text or (" " + p) in text`` left
every other scorer test passing, since their inputs have a mark touching a space on both sides ("red - white") or
on neither ("red-white"). Here a mark touches a space on one side only and also occurs between two letters
elsewhere in the answer, which is where deleting and replacing by a space give different words.

Oracle: the rule of the official VQA evaluation (GT-Vision-Lab/VQA, ``vqaEval.py``), applied by hand: for each
punctuation mark, if the answer holds it next to a space on either side (or holds a digit-comma-digit), every copy
of the mark is deleted; otherwise every copy becomes a space. Then lower case and single spaces (these answers hold
no number words, articles, contractions or periods, so the other steps change nothing).
"""

from __future__ import annotations

import pytest

from emma_mamba.eval.vqa import normalize_answer, vqa_accuracy


@pytest.mark.parametrize("raw, by_hand", [
    ("well -known-fact", "well knownfact"),   # " -": every "-" deleted, also the one between two letters
    ("red-white- blue", "redwhite blue"),     # "- ": likewise
    ("x (y(z", "x yz"),                       # " (" only
    ("left) or right)stuff", "left or rightstuff"),  # ") " only
    ("red-white", "red white"),               # no space next to the mark: replaced by a space
])
def test_punctuation_touching_a_space_on_one_side_deletes_every_copy(raw, by_hand):
    assert normalize_answer(raw) == by_hand


def test_one_sided_punctuation_changes_the_soft_accuracy():
    # three humans wrote the official normal form of the model's answer; the other seven something else
    humans = ["well knownfact"] * 3 + ["fact"] * 7
    assert vqa_accuracy(normalize_answer("well -known-fact"), humans) == pytest.approx(0.9)  # k = 3: 0.9
    assert vqa_accuracy(normalize_answer("well known fact"), humans) == 0.0
