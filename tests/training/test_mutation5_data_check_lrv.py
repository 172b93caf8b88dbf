"""Mutation round 5: ``emma-mamba data check`` and ``emma-mamba data lrv``, against hand counts of files written
here: --write-clean with --val and onto the data file itself; a single file
taken ``repeat`` times; the length percentiles (against numpy's nearest rank) and the packed fill; the
small-image boundary; LRV's --prefix, symlinked release folders, whitespace-only fields, skip counts and the ids
of several questions about one chart."""

from __future__ import annotations

import json
import math
import os
import posixpath
import random
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image

from emma_mamba.cli import main
from emma_mamba.data.lrv import LrvError, convert
from emma_mamba.training.config import run_config_to_dict
from tests.training.conftest import make_cfg, subset
from tests.training.test_data_check import _write_run
from tests.training.test_lrv import _release

Q = [{"from": "human", "value": "<image>\nWhat is there?"}, {"from": "gpt", "value": "Shapes."}]
BAD_ROLE = {"id": "role", "conversations": [{"from": "user", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}


def test_write_clean_with_val_keeps_the_training_files_usable_records_only(shapes, tmp_path):
    """Guards against the val file's usable record numbers being merged into the training file's clean copy."""
    good = json.loads(subset(shapes, tmp_path, 4).read_text())
    data = tmp_path / "train.json"
    data.write_text(json.dumps(good + [BAD_ROLE]))  # record 4 is skipped
    val = subset(shapes, tmp_path, 6, name="val.json")  # records 0..5 all usable
    cleaned = tmp_path / "clean.json"
    assert main(["data", "check", "--config", str(_write_run(shapes, tmp_path, data)), "--no-images", "--val",
                 "--val.json", str(val), "--val.image_folder", str(shapes / "images"),
                 "--write-clean", str(cleaned)]) == 1
    assert json.loads(cleaned.read_text()) == good


def test_write_clean_refuses_the_data_file_itself(shapes, tmp_path, capsys):
    """Guards against --write-clean overwriting the data file it reads."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(json.loads(subset(shapes, tmp_path, 3).read_text()) + [BAD_ROLE]))
    before = data.read_bytes()
    assert main(["data", "check", "--config", str(_write_run(shapes, tmp_path, data)), "--no-images",
                 "--write-clean", str(data)]) == 2
    assert "that is the data file itself" in capsys.readouterr().err
    assert data.read_bytes() == before


def test_one_file_taken_twice_is_reported_as_a_mixture(shapes, tmp_path):
    """Guards against a single data.sources file with repeat 2 being reported as one pass over it."""
    a = subset(shapes, tmp_path, 5)
    cfg = make_cfg(shapes, tmp_path / "run", data={"json": None, "sources": [
        {"json": str(a), "image_folder": str(shapes / "images"), "repeat": 2}]},
        train={"global_batch_size": 4, "micro_batch_size": 2})
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(run_config_to_dict(cfg)))
    report = tmp_path / "report.json"
    assert main(["data", "check", "--config", str(run), "--no-images", "--report", str(report)]) == 0
    m = json.loads(report.read_text())["mixture"]
    assert m["samples_per_epoch"] == 10 and m["rows_per_epoch"] == 10  # 5 records x 2, one per row
    assert m["steps_per_epoch"] == math.ceil(10 / 4)


def test_length_percentiles_are_nearest_rank():
    """Guards against an off-by-one in the nearest-rank percentile (numpy's inverted_cdf is the oracle)."""
    from emma_mamba.data.cli_check import _percentiles

    rng = random.Random(0)
    for n in (1, 2, 3, 7, 10, 11, 99, 101, 250):
        values = [rng.randint(1, 500) for _ in range(n)]
        got = _percentiles(values)
        for key, q in (("p50", 50), ("p90", 90), ("p99", 99)):
            assert got[key] == int(np.percentile(values, q, method="inverted_cdf")), (n, key)
        assert (got["min"], got["max"]) == (min(values), max(values))


def test_packed_fill_is_positions_used_over_row_positions():
    """Guards against the fill dividing by the samples instead of the rows: four 4-position samples pack into two
    full rows of 8 (whatever the order), every position used."""
    from emma_mamba.data.cli_check import _epoch

    cfg = SimpleNamespace(train=SimpleNamespace(seed=0, global_batch_size=1))
    r = _epoch(cfg, SimpleNamespace(packing=True, max_length=8), [4, 4, 4, 4])
    assert (r["rows_per_epoch"], r["fill"], r["steps_per_epoch"]) == (2, 1.0, 2)
    r = _epoch(cfg, SimpleNamespace(packing=True, max_length=8), [2, 2, 2])  # one row, 6 of its 8 positions
    assert (r["rows_per_epoch"], r["fill"]) == (1, 0.75)


def test_padded_fill_counts_micro_batches_as_training_forms_them():
    """Padding: real positions over each micro-batch's rows x its longest, the step's samples sorted longest first
    with data.group_by_length (two 8s, then two 2s: nothing padded), in the shuffled order without."""
    from emma_mamba.data.cli_check import _epoch
    from emma_mamba.data.llava import plan_rows

    cfg = SimpleNamespace(train=SimpleNamespace(seed=0, global_batch_size=4, micro_batch_size=2))
    lengths = [2, 8, 2, 8]
    r = _epoch(cfg, SimpleNamespace(packing=False, max_length=8, group_by_length=True), lengths)
    assert (r["rows_per_epoch"], r["fill"], r["steps_per_epoch"], r["samples_per_step"]) == (4, 1.0, 1, 4.0)
    order = [lengths[row[0]] for row in plan_rows(lengths, 0, 0, False, 8)]
    want = 20 / sum(2 * max(order[k:k + 2]) for k in (0, 2))
    r = _epoch(cfg, SimpleNamespace(packing=False, max_length=8, group_by_length=False), lengths)
    assert r["fill"] == pytest.approx(want)
    r = _epoch(cfg, SimpleNamespace(packing=True, max_length=10), lengths)  # 2 + 8 per row: 2 samples a row
    assert r["samples_per_step"] == 8.0


def test_an_image_upscaled_exactly_8x_is_not_noted(shapes, tmp_path):
    """Guards against the small-image note's boundary: noted only when upscaled *more* than 8x to the tiny
    encoder's 32 px (a 4 px side is exactly 8x, a 3 px side more)."""
    images = tmp_path / "images"
    shutil.copytree(shapes / "images", images)
    Image.new("RGB", (4, 40), (200, 10, 10)).save(images / "four.png")
    Image.new("RGB", (40, 3), (10, 200, 10)).save(images / "three.png")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "four", "image": "four.png", "conversations": Q},
                                {"id": "three", "image": "three.png", "conversations": Q}]))
    report = tmp_path / "r.json"
    assert main(["data", "check", "--config", str(_write_run(shapes, tmp_path, data)), "--data.image_folder",
                 str(images), "--workers", "1", "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["notes"] == {"small_image": 1} and "three.png is 40x3 pixels" in r["note_examples"]["small_image"][0]


def test_answer_tokens_are_the_targets_training_averages_over(shapes, tmp_path):
    """Guards against answer_tokens counting every position (prompt included) rather than the LM loss's
    targets: the oracle is training's own collate (num_label_tokens) over the file's samples."""
    import torch

    from emma_mamba.data.llava import LlavaDataset, collate
    from emma_mamba.models.vlm import EmmaMamba
    from emma_mamba.training.config import load_run_config

    data = tmp_path / "text.json"
    data.write_text(json.dumps([{"id": f"t{k}", "conversations": [
        {"from": "human", "value": "Name a colour. " * (k + 1)},
        {"from": "gpt", "value": "Red and blue. " * k + "Red."},
        {"from": "human", "value": "Another?"}, {"from": "gpt", "value": "Green."}]} for k in range(4)]))
    run = _write_run(shapes, tmp_path, data)
    report = tmp_path / "r.json"
    assert main(["data", "check", "--config", str(run), "--no-images", "--report", str(report)]) == 0
    cfg = load_run_config(str(run))
    model = EmmaMamba(cfg.model, for_training=False, device=torch.device("meta"))
    ds = LlavaDataset.for_model(cfg.data, model)
    batch = collate([[(s, None)] for s in ds.samples], model.tokenizer.pad_token_id, False, model.vision.num_tokens)
    assert len(ds.samples) == 4 and batch["num_label_tokens"] > 0
    assert json.loads(report.read_text())["answer_tokens"] == batch["num_label_tokens"]


def test_the_statistics_describe_the_usable_records_only(shapes, tmp_path):
    """A record whose image fails to decode is not usable: the lengths, answer tokens and text-only count describe
    the usable records (they counted it too: a file's figures then differed from its --write-clean copy's); the
    epoch's rows still count it, as training plans it until the image fails to load."""
    images = tmp_path / "images"
    shutil.copytree(shapes / "images", images)
    (images / "broken.png").write_bytes(b"not a png")
    good = "train/" + sorted(p.name for p in (shapes / "images" / "train").iterdir())[0]
    Q = lambda k: [{"from": "human", "value": "<image>\n" + "What is it? " * k},  # noqa: E731
                   {"from": "gpt", "value": "A shape. " * k}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "ok", "image": good, "conversations": Q(1)},
                                {"id": "bad", "image": "broken.png", "conversations": Q(5)},
                                {"id": "text", "conversations": [{"from": "human", "value": "Hi"},
                                                                 {"from": "gpt", "value": "Hello."}]}]))
    run = _write_run(shapes, tmp_path, data)
    report, clean = tmp_path / "r.json", tmp_path / "clean.json"
    args = ["data", "check", "--config", str(run), "--data.image_folder", str(images), "--workers", "1"]
    assert main(args + ["--report", str(report), "--write-clean", str(clean)]) == 1
    r = json.loads(report.read_text())
    assert main(["data", "check", "--config", str(run), "--data.image_folder", str(images), "--data.json",
                 str(clean), "--workers", "1", "--report", str(tmp_path / "rc.json")]) == 0
    rc = json.loads((tmp_path / "rc.json").read_text())
    assert r["usable"] == rc["usable"] == 2
    for key in ("positions_per_sample", "images_per_sample", "answer_tokens", "text_only_samples"):
        assert r[key] == rc[key], key
    assert r["rows_per_epoch"] == 3 and rc["rows_per_epoch"] == 2


# ---------------------------------------------------------------------------------------------- data lrv

@pytest.mark.parametrize("prefix", ["data/lrv/", "data/lrv", ""])
def test_prefix_gives_normal_paths_to_the_images(tmp_path, prefix):
    """Guards against --prefix with a trailing slash writing 'data/lrv//lrv-vg/...', and an empty prefix an
    absolute '/lrv-vg/...': each path, relative and normal, names the image under the folder the prefix means."""
    lrv = _release(tmp_path)
    records, _ = convert(lrv, prefix=prefix)
    top = tmp_path / "top"
    (top / prefix).mkdir(parents=True, exist_ok=True)
    os.symlink(lrv / "lrv-vg", top / prefix / "lrv-vg")
    os.symlink(lrv / "lrv-chart", top / prefix / "lrv-chart")
    for rec in records:
        assert not rec["image"].startswith("/") and rec["image"] == posixpath.normpath(rec["image"]), rec["image"]
        assert (top / rec["image"]).is_file(), rec["image"]


def test_a_symlinked_release_folder_keeps_the_name_it_has_under_the_image_folder(tmp_path):
    """Guards against the default prefix resolving symlinks: images/lrv -> LRV-release-v2 writes 'lrv/...'."""
    real = _release(tmp_path / "download").rename(tmp_path / "LRV-release-v2")
    images = tmp_path / "images"
    images.mkdir()
    os.symlink(real, images / "lrv")
    records, _ = convert(images / "lrv")
    assert records and all(r["image"].startswith("lrv/") for r in records)
    assert all((images / r["image"]).is_file() for r in records)


def test_a_whitespace_only_field_is_an_error(tmp_path):
    """Guards against a question of blanks passing the non-empty check (it would train an empty prompt)."""
    lrv = _release(tmp_path)
    (lrv / "filter_cap_more1.json").write_text(json.dumps([{"image_id": "2345", "question": " \n\t ",
                                                            "answer": "x"}]))
    with pytest.raises(LrvError, match="filter_cap_more1.json: record 0: 'question' must be a non-empty string"):
        convert(lrv)


def test_skip_missing_counts_each_file_and_each_skipped_record(tmp_path):
    """Guards against the per-file counts including skipped records, or the skipped count stopping at one."""
    lrv = _release(tmp_path)
    (lrv / "lrv-vg" / "77.jpg").unlink()
    recs = json.loads((lrv / "filter_cap1.json").read_text())
    recs.append({"image_id": "77", "question": "Again?", "answer": "Yes."})
    (lrv / "filter_cap1.json").write_text(json.dumps(recs))
    records, counts = convert(lrv, skip_missing=True)
    # by hand: filter_cap1.json's 3 records, two about the missing 77.jpg; the other two files' one each
    assert counts == {"filter_cap1.json": 1, "filter_cap_more1.json": 1, "chart_release_update.json": 1,
                      "missing_images_skipped": 2}
    assert len(records) == 3


def test_several_questions_about_one_chart_get_distinct_ids(tmp_path):
    """Guards against the per-image question number being kept for Visual Genome only (chart ids repeating)."""
    lrv = _release(tmp_path)
    (lrv / "chart_release_update.json").write_text(json.dumps([
        {"image_id": "sales_2019.png", "question": f"Question {k}?", "answer": "2019."} for k in range(3)]))
    records, _ = convert(lrv)
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids), ids
    assert [i for i in ids if i.startswith("chart/")] == [f"chart/sales_2019_q{k}" for k in range(3)]
