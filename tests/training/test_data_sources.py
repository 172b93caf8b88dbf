"""Several training files in one run (``data.sources``): each sample is what the one-file data set of its file
builds, ``repeat`` takes a file's samples that many times (a fractional part: a fixed seeded subset), errors
name the file they come from, a run trains on the mixture and resumes on it, and ``data check`` reports each
file and the mixture's epoch."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import yaml

from emma_mamba.cli import main
from emma_mamba.config import ConfigError
from emma_mamba.data.llava import DataError, LlavaDataset, repeat_indices
from emma_mamba.models.vlm import EmmaMamba
from emma_mamba.training.config import run_config_to_dict
from emma_mamba.training.trainer import Trainer
from tests.training.conftest import make_cfg


def _files(shapes, tmp_path):
    """a.json: records 0-5 (images in the ShapesWorld folder); b.jsonl: records 6-15 with their images moved to
    another folder (so b's image_folder matters)."""
    recs = json.loads((shapes / "train" / "stage2_instruct.json").read_text())
    a = tmp_path / "a.json"
    a.write_text(json.dumps(recs[:6]))
    other = tmp_path / "other_images"
    other.mkdir()
    for r in recs[6:16]:
        shutil.copy(shapes / "images" / r["image"], other / r["image"].replace("/", "_"))
        r["image"] = r["image"].replace("/", "_")
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps(r) + "\n" for r in recs[6:16]))
    return a, b, other


def _sources(shapes, a, b, other, ra=2, rb=0.5):
    return [{"json": str(a), "image_folder": str(shapes / "images"), "repeat": ra},
            {"json": str(b), "image_folder": str(other), "repeat": rb}]


@pytest.fixture(scope="module")
def meta_model():
    import torch

    from emma_mamba.config import get_preset

    return EmmaMamba(get_preset("tiny"), for_training=False, device=torch.device("meta"))


def test_mixture_samples_equal_each_files_own(shapes, tmp_path, meta_model):
    a, b, other = _files(shapes, tmp_path)
    cfg = make_cfg(shapes, tmp_path / "run", data={"json": None, "sources": _sources(shapes, a, b, other)}).data
    ds = LlavaDataset.for_model(cfg, meta_model)
    alone_a = LlavaDataset.for_model(make_cfg(shapes, tmp_path / "r", a).data, meta_model)
    alone_b = LlavaDataset.for_model(make_cfg(shapes, tmp_path / "r", b, data={"image_folder": str(other)}).data,
                                     meta_model)
    half = repeat_indices(10, 0.5, 1)
    assert len(half) == 5 and half == sorted(set(half)) and half == repeat_indices(10, 0.5, 1)  # fixed
    want = [alone_a.samples[i] for i in list(range(6)) * 2] + [alone_b.samples[i] for i in half]
    assert len(ds) == 6 * 2 + 5
    for got, w in zip(ds.samples, want):
        assert (got.index, got.id, got.input_ids, got.labels, got.images, got.length) == \
               (w.index, w.id, w.input_ids, w.labels, w.images, w.length)
    assert [s.source for s in ds.samples] == [0] * 12 + [1] * 5
    assert all(str(s.images[0]).startswith(str(other)) for s in ds.samples[12:])
    rep = ds.report
    assert (rep.records, rep.samples, rep.epoch_samples) == (16, 16, 17)
    assert [m["epoch_samples"] for m in rep.mixture] == [12, 5] and "b.jsonl: 10 x 0.5 = 5" in rep.summary()
    # one file given as data.sources is the data.json data set (the fingerprint of older checkpoints holds)
    one = make_cfg(shapes, tmp_path / "r", data={"json": None, "sources": [{"json": str(a)}]}).data  # data.image_folder
    assert LlavaDataset.for_model(one, meta_model).fingerprint() == alone_a.fingerprint()
    assert ds.fingerprint() != LlavaDataset.for_model(
        make_cfg(shapes, tmp_path / "r", data={"json": None, "sources": _sources(shapes, a, b, other, rb=0.6)}).data,
        meta_model).fingerprint()


def test_errors_name_the_file_they_come_from(shapes, tmp_path, meta_model):
    a, b, other = _files(shapes, tmp_path)
    lines = b.read_text().splitlines()
    bad = json.loads(lines[3])
    bad["conversations"][0]["from"] = "user"
    lines[3] = json.dumps(bad)
    b.write_text("\n".join(lines) + "\n")
    cfg = make_cfg(shapes, tmp_path / "run", data={"json": None, "sources": _sources(shapes, a, b, other)}).data
    with pytest.raises(DataError, match=rf"{re.escape(str(b))}: line 4 .*'user'"):
        LlavaDataset.for_model(cfg, meta_model)
    # a missing image at load time names b and its record as the load-time checks do (a JSONL line, 1-based)
    b.write_text("\n".join(x for i, x in enumerate(lines) if i != 3) + "\n")
    ds = LlavaDataset.for_model(cfg, meta_model)
    first_b = ds.samples[12]
    first_b.images[0].unlink()
    with pytest.raises(DataError, match=rf"{re.escape(str(b))}: line {first_b.index + 1} \(id .*\): image "
                                        rf"{re.escape(str(first_b.images[0]))}"):
        ds.load_images(first_b)


def test_a_mistyped_path_is_named_by_its_key_before_the_model_is_built(shapes, tmp_path, monkeypatch, capsys):
    """A mistyped data.image_folder made every image record "missing": with on_error skip (the 2.8B recipes')
    a run trained on the text-only records alone and exited 0; with raise it named the first record's image, not
    the setting. Each path is now checked by its key, before the model is built (model building patched to fail)."""
    import emma_mamba.models.vlm as vlm

    def no_model(*a, **k):
        raise AssertionError("the model was built before the paths were checked")

    monkeypatch.setattr(vlm, "EmmaMamba", no_model)
    a, b, other = _files(shapes, tmp_path)
    typo = str(shapes / "imagess")
    cases = [
        (dict(data={"image_folder": typo, "on_error": "skip"}), rf"data.image_folder: {re.escape(typo)} is not a "
                                                                rf"folder \(not found\): the images of .* are looked"),
        (dict(data={"image_folder": str(a)}), r"data.image_folder: .* is not a folder \(a file\)"),
        (dict(data={"json": str(tmp_path / "nope.json")}), r"data.json: data file not found: .*nope.json"),
        (dict(data={"json": None, "sources": [{"json": str(a)}, {"json": str(b), "image_folder": typo}]}),
         rf"data.sources\[1\].image_folder: {re.escape(typo)} is not a folder"),
        (dict(val={"json": str(a), "image_folder": typo}), r"val.image_folder: .* is not a folder"),
        (dict(val={"json": str(tmp_path / "v.json")}), r"val.json: data file not found"),
    ]
    for kw, match in cases:
        with pytest.raises(DataError, match=match):
            Trainer(make_cfg(shapes, tmp_path / "run", **kw))
    # data check, the same way (exit 2, one line)
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(run_config_to_dict(make_cfg(shapes, tmp_path / "r2"))))
    monkeypatch.undo()
    assert main(["data", "check", "--config", str(run), "--data.image_folder", typo]) == 2
    assert f"data.image_folder: {typo} is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("data,match", [
    ({"sources": [{"json": "x.json"}]}, "give data.json .* or data.sources .*, not both"),
    ({"json": None, "sources": []}, "data.sources must list at least one"),
    ({"json": None, "sources": [{"json": "x.json", "weight": 2}]}, r"data.sources\[0\]: unknown key\(s\) \['weight'\]"),
    ({"json": None, "sources": [{"image_folder": "imgs"}]}, r"data.sources\[0\].json: the file's path is required"),
    ({"json": None, "sources": [{"json": "x.json", "repeat": 0}]}, r"data.sources\[0\].repeat: expected a number > 0"),
    ({"json": None, "sources": [{"json": "x.json", "repeat": "2"}]}, r"data.sources\[0\].repeat"),
    # a huge repeat: a config error, not a MemoryError building the epoch's index list
    ({"json": None, "sources": [{"json": "x.json", "repeat": 1e9}]}, r"data.sources\[0\].repeat: .* at most 1000"),
    ({"json": None, "sources": None}, "data.json: the training file is required"),
])
def test_bad_sources(shapes, tmp_path, data, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(shapes, tmp_path, data=data)


def test_a_run_on_sources_trains_and_resumes(shapes, tmp_path):
    a, b, other = _files(shapes, tmp_path)
    kw = dict(data={"json": None, "sources": _sources(shapes, a, b, other, ra=1, rb=1.5)},
              train={"max_steps": 4, "global_batch_size": 4, "micro_batch_size": 2}, checkpoint={"every_steps": 2})
    t = Trainer(make_cfg(shapes, tmp_path / "run", **kw))
    assert len(t.dataset) == 6 + 15
    full = t.fit()
    part = Trainer(make_cfg(shapes, tmp_path / "b", **kw))
    part.fit(stop_after=2)
    rest = Trainer(make_cfg(shapes, tmp_path / "b", **kw), resume="auto").fit()
    assert [m["loss"] for m in rest] == [m["loss"] for m in full[2:]]
    # another mixture is other data: refused on resume
    other_kw = dict(kw, data={"json": None, "sources": _sources(shapes, a, b, other, ra=1, rb=1.0)})
    with pytest.raises(ConfigError, match="the training data differ"):
        Trainer(make_cfg(shapes, tmp_path / "c", **other_kw),
                resume=str(tmp_path / "b" / "checkpoints" / "step_00000002"))


def test_data_check_reports_each_file_and_the_mixture(shapes, tmp_path, capsys):
    a, b, other = _files(shapes, tmp_path)
    cfg = make_cfg(shapes, tmp_path / "run", data={"json": None, "sources": _sources(shapes, a, b, other)},
                   train={"global_batch_size": 4, "micro_batch_size": 2})
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(run_config_to_dict(cfg)))
    report = tmp_path / "report.json"
    rc = main(["data", "check", "--config", str(run), "--workers", "1", "--report", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out
    r = json.loads(report.read_text())
    assert [x["file"] for x in r["sources"]] == [str(a), str(b)]
    assert [x["usable"] for x in r["sources"]] == [6, 10]
    assert [x["images_checked"] for x in r["sources"]] == [len({x["image"] for x in json.loads(a.read_text())}), 10]
    m = r["mixture"]
    assert [f["epoch_samples"] for f in m["files"]] == [12, 5] and m["samples_per_epoch"] == 17
    assert m["rows_per_epoch"] == 17 and m["steps_per_epoch"] == math.ceil(17 / 4)
    assert "mixture (data.sources): a.json 6 x 2 = 12, b.jsonl 10 x 0.5 = 5" in out
    # a clean copy is of one file
    assert main(["data", "check", "--config", str(run), "--no-images", "--write-clean", str(tmp_path / "c.json")]) == 2
    assert "--write-clean writes one file; this run reads 2" in capsys.readouterr().err
