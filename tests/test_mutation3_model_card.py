"""Mutation round 3: the model card's numbers.

* The "total" row is every parameter of the exported model: checked against ``numel`` summed over the model's
  own parameters (the oracle), and against the sum of the part rows above it (within their rounding).
* The training section reports the last logged step and the last validation (a run record written by hand
  with several of each), not the first.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from emma_mamba.config import get_preset
from emma_mamba.export import model_card
from emma_mamba.models.vlm import EmmaMamba

_UNIT = {"B": 1e9, "M": 1e6, "K": 1e3, "": 1.0}


def _num(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)([BMK]?)", text.strip())
    assert m, text
    return float(m.group(1)) * _UNIT[m.group(2)]


@pytest.fixture(scope="module")
def tiny():
    return EmmaMamba(get_preset("tiny"), for_training=True)


def test_card_total_is_every_parameter(tmp_path, tiny):
    card = model_card(tiny, tmp_path / "ckpt", tmp_path / "out", "fp32", lm_only=False)
    rows = [line.split("|")[1:-1] for line in card.splitlines() if line.startswith("| ")]
    table = {r[0].strip(): r[2].strip() for r in rows if r[0].strip() not in ("part", "---")}
    total = _num(table.pop("total"))
    assert len(table) >= 3 and "lm" in table and "projector" in table and "align_head" in table
    want = sum(p.numel() for p in tiny.parameters())  # shared (tied) tensors counted once by parameters()
    assert want > 1e6  # shown in millions with two decimals: half of 0.01M is the rounding
    assert abs(total - want) <= 5e3
    parts = [_num(v) for v in table.values()]
    assert abs(total - sum(parts)) <= 5e3 * len(parts)


def test_card_reports_the_last_step_and_the_last_validation(tmp_path, tiny):
    ckpt = tmp_path / "run"
    ckpt.mkdir()
    (ckpt / "train_config.yaml").write_text(yaml.safe_dump({"stage": "finetune", "train": {"lr": 2e-5}}))
    recs = [{"step": 10, "loss": 3.0, "lm_loss": 2.5, "total_tokens": 1000},
            {"step": 10, "val_loss": 2.75, "val_token_acc": 0.25},
            {"step": 20, "loss": 1.5, "lm_loss": 1.25, "total_tokens": 2000},
            {"step": 20, "val_loss": 1.125, "val_token_acc": 0.625}]
    (ckpt / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    card = model_card(tiny, ckpt, tmp_path / "out", "fp32", lm_only=False)
    assert "- trained 20 steps (2000 tokens); last logged loss 1.5 (lm 1.25)" in card
    assert "- validation at step 20: loss 1.125, token accuracy 0.625" in card
    assert "loss 2.75" not in card and "loss 3 " not in card and "step 10" not in card
