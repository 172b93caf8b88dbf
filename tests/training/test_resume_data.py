"""A resumed run must train on the data its checkpoint trained on: every token, label and image of every sample
(an answer changed at the end of a long record used to pass: the check hashed each sample's first 64 tokens).
Checkpoints of earlier versions, which carry only that 64-token fingerprint, still resume."""

from __future__ import annotations

import json

import pytest
import torch

from emma_mamba.config import ConfigError
from emma_mamba.training.trainer import Trainer
from tests.training.conftest import make_cfg

LONG = ("Describe every shape in the picture, its colour, its size and where it lies relative to the others, "
        "in full sentences please.")


def _records(shapes, last_word: str) -> list[dict]:
    """Four ShapesWorld records, each with a second, long turn whose answer ends in ``last_word``."""
    recs = json.loads((shapes / "train" / "stage2_instruct.json").read_text())[:4]
    for r in recs:
        r["conversations"] += [{"from": "human", "value": LONG},
                               {"from": "gpt", "value": f"There is a shape and it is {last_word}"}]
    return recs


def _cfg(shapes, tmp_path, out, last_word):
    path = tmp_path / f"data_{last_word}.json"
    path.write_text(json.dumps(_records(shapes, last_word)))
    return make_cfg(shapes, tmp_path / out, path, data={"max_length": 256},
                    train={"max_steps": 2, "global_batch_size": 2}, checkpoint={"every_steps": 1})


def test_an_answer_changed_late_in_a_record_is_refused_on_resume(shapes, tmp_path):
    Trainer(_cfg(shapes, tmp_path, "run", "red")).fit(stop_after=1)
    step1 = tmp_path / "run" / "checkpoints" / "step_00000001"
    other = Trainer(_cfg(shapes, tmp_path, "other", "blue"))  # another answer, the same number of tokens
    same = Trainer(_cfg(shapes, tmp_path, "same", "red"))
    a, b = same.dataset.samples, other.dataset.samples
    assert [s.length for s in a] == [s.length for s in b]
    first_diff = min(next(i for i, (x, y) in enumerate(zip(s.input_ids, t.input_ids)) if x != y)
                     for s, t in zip(a, b))
    assert first_diff >= 64  # beyond what the fingerprint of earlier versions saw: it cannot tell them apart
    assert same.dataset.fingerprint() == other.dataset.fingerprint()
    with pytest.raises(ConfigError, match=r"--resume .*step_00000001: the training data differ from the "
                                          r"checkpoint's \(4 samples, some with other tokens, labels or images"):
        Trainer(_cfg(shapes, tmp_path, "run", "blue"), resume=str(step1))
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(_records(shapes, "red")[:3]))
    cfg = make_cfg(shapes, tmp_path / "run", fewer, data={"max_length": 256},
                   train={"max_steps": 2, "global_batch_size": 2}, checkpoint={"every_steps": 1})
    with pytest.raises(ConfigError, match=r"\(4 samples then, 3 now;"):
        Trainer(cfg, resume=str(step1))
    # the same data resumes, and continues as the uninterrupted run does
    full = Trainer(_cfg(shapes, tmp_path, "full", "red")).fit()
    rest = Trainer(_cfg(shapes, tmp_path, "run", "red"), resume=str(step1)).fit()
    assert [m["loss"] for m in rest] == [m["loss"] for m in full[1:]]


def test_a_checkpoint_of_an_earlier_version_is_checked_with_its_fingerprint(shapes, tmp_path, caplog):
    Trainer(_cfg(shapes, tmp_path, "run", "red")).fit(stop_after=1)
    step1 = tmp_path / "run" / "checkpoints" / "step_00000001"
    state = torch.load(step1 / "trainer_state.pt", weights_only=True)
    assert "data_hash" in state and state["samples"] == 4
    del state["data_hash"], state["samples"]  # as earlier versions wrote it
    torch.save(state, step1 / "trainer_state.pt")
    with caplog.at_level("INFO", logger="emma_mamba.training.trainer"):
        rest = Trainer(_cfg(shapes, tmp_path, "run", "red"), resume=str(step1)).fit()
    assert len(rest) == 1 and "its data check covers each sample's first 64 tokens" in caplog.text
    first = json.loads((shapes / "train" / "stage2_instruct.json").read_text())[:4]
    first[0]["conversations"][1]["value"] = "7"  # a change within the first 64 tokens: the old check sees it
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps([dict(r, conversations=r["conversations"] + _records(shapes, "red")[0]
                                        ["conversations"][2:]) for r in first]))
    cfg = make_cfg(shapes, tmp_path / "run", changed, data={"max_length": 256},
                   train={"max_steps": 2, "global_batch_size": 2}, checkpoint={"every_steps": 1})
    with pytest.raises(ConfigError, match=r"the training data differ from the checkpoint's \(4 samples now; hash"):
        Trainer(cfg, resume=str(step1))
