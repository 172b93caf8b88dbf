"""`emma-mamba data lrv`: LRV-Instruct's release (Visual Genome and chart splits, {image_id, question, answer})
as LLaVA records written by hand, which `data check` then reads beside another file of the mixture with one image
folder; malformed records and missing images are named, or skipped and counted on request."""

from __future__ import annotations

import json

import yaml
from PIL import Image

from emma_mamba.cli import main
from emma_mamba.training.config import run_config_to_dict
from tests.training.conftest import make_cfg, subset


def _release(root):
    lrv = root / "lrv"
    (lrv / "lrv-vg").mkdir(parents=True)
    (lrv / "lrv-chart").mkdir()
    for name in ("2345.jpg", "77.jpg"):
        Image.new("RGB", (40, 30), "red").save(lrv / "lrv-vg" / name)
    Image.new("RGB", (40, 30), "blue").save(lrv / "lrv-chart" / "sales_2019.png")
    (lrv / "filter_cap1.json").write_text(json.dumps([
        {"image_id": "2345", "question": " Is there a dog on the bench? ", "answer": "No, there is no dog. "},
        {"image_id": 77, "question": "Describe the image.", "answer": "A red square."}]))
    (lrv / "filter_cap_more1.json").write_text(json.dumps([
        {"image_id": "2345", "question": "What colour is it?", "answer": "Red."}]))
    (lrv / "chart_release_update.json").write_text(json.dumps([
        {"image_id": "sales_2019.png", "question": "Which year sold most?", "answer": "2019."}]))
    return lrv


def test_lrv_release_becomes_llava_records_that_training_reads(shapes, tmp_path, capsys):
    images = tmp_path / "images"  # LLaVA's image folder, with the LRV release under it
    lrv = _release(images)
    out = tmp_path / "lrv_llava.json"
    assert main(["data", "lrv", "--lrv-dir", str(lrv), "--out", str(out)]) == 0
    assert "4 records (filter_cap1.json 2, filter_cap_more1.json 1, chart_release_update.json 1)" in \
        capsys.readouterr().out

    def turn(q, a):
        return [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]

    assert json.loads(out.read_text()) == [
        {"id": "vg/2345_q0", "image": "lrv/lrv-vg/2345.jpg", "conversations": turn("Is there a dog on the bench?",
                                                                              "No, there is no dog.")},
        {"id": "vg/77_q0", "image": "lrv/lrv-vg/77.jpg", "conversations": turn("Describe the image.", "A red square.")},
        {"id": "vg/2345_q1", "image": "lrv/lrv-vg/2345.jpg", "conversations": turn("What colour is it?", "Red.")},
        {"id": "chart/sales_2019_q0", "image": "lrv/lrv-chart/sales_2019.png",
         "conversations": turn("Which year sold most?", "2019.")}]
    # a mixture of a ShapesWorld file and the converted one, each with its own image folder: every record usable,
    # none noted (--strict: the ids are unique, where the image's id repeated for each of its questions was not)
    shapes_file = subset(shapes, tmp_path, 4)
    d = run_config_to_dict(make_cfg(shapes, tmp_path / "run", shapes_file))
    d["data"].pop("json")
    d["data"]["sources"] = [{"json": str(shapes_file), "image_folder": str(shapes / "images")},
                            {"json": str(out), "image_folder": str(images)}]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(d))
    assert main(["data", "check", "--config", str(tmp_path / "run.yaml"), "--workers", "1", "--strict"]) == 0
    report = capsys.readouterr().out
    assert "lrv_llava.json: 4 of 4 records usable" in report and "lrv_llava.json 4 x 1 = 4" in report


def test_lrv_problems_are_named_or_skipped_on_request(tmp_path, capsys):
    lrv = _release(tmp_path)
    (lrv / "lrv-vg" / "77.jpg").unlink()
    out = tmp_path / "o.json"
    assert main(["data", "lrv", "--lrv-dir", str(lrv), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 records name images that are not there" in err and "filter_cap1.json: record 1" in err
    assert not out.exists()
    assert main(["data", "lrv", "--lrv-dir", str(lrv), "--out", str(out), "--skip-missing", "--no-chart"]) == 0
    assert "2 records" in capsys.readouterr().out and len(json.loads(out.read_text())) == 2
    assert main(["data", "lrv", "--lrv-dir", str(lrv), "--out", str(out)]) == 2  # nothing overwritten
    assert "exists" in capsys.readouterr().err
    (lrv / "filter_cap_more1.json").write_text(json.dumps([{"image_id": "2345", "question": "", "answer": "x"}]))
    assert main(["data", "lrv", "--lrv-dir", str(lrv), "--out", str(tmp_path / "p.json"), "--skip-missing"]) == 2
    assert "filter_cap_more1.json: record 0: 'question' must be a non-empty string" in capsys.readouterr().err
    (lrv / "filter_cap_more1.json").unlink()
    assert main(["data", "lrv", "--lrv-dir", str(lrv), "--out", str(tmp_path / "q.json")]) == 2
    assert "filter_cap_more1.json not found" in capsys.readouterr().err


def test_annotations_layout_numeric_answers_and_bad_records_skipped_on_request(tmp_path, capsys):
    """A file holding its list as {"annotations": [...]} (MiniGPT-4's filter_cap.json layout) converts as the bare
    list does; a numeric answer (a chart's value) is its text; a question holding <image> (LLaVA's loader would
    find two placeholders for one image) and an empty field are named, or with --skip-bad left out and counted."""
    lrv = _release(tmp_path)
    (lrv / "filter_cap1.json").write_text(json.dumps({"annotations": [
        {"image_id": "2345", "question": "How many dogs?", "answer": 0, "task": "counting"},
        {"image_id": 77, "question": "What is the value?", "answer": 3.5}]}))
    out = tmp_path / "o.json"
    assert main(["data", "lrv", "--lrv-dir", str(lrv), "--out", str(out), "--no-chart"]) == 0
    got = [r["conversations"][1]["value"] for r in json.loads(out.read_text())]
    assert got == ["0", "3.5", "Red."]
    (lrv / "filter_cap_more1.json").write_text(json.dumps([
        {"image_id": "2345", "question": "<image>\nWhat colour is it?", "answer": "Red."},
        {"image_id": "2345", "question": "Shape?", "answer": True},
        {"image_id": "2345", "question": "Where?", "answer": "In <image> twice."},
        {"image_id": "2345", "question": "Size?", "answer": "Small."}]))
    assert main(["data", "lrv", "--lrv-dir", str(lrv), "--out", str(tmp_path / "p.json"), "--no-chart"]) == 2
    err = capsys.readouterr().err
    assert "filter_cap_more1.json: record 0: 'question' holds the image placeholder <image>" in err
    assert "--skip-bad" in err
    assert main(["data", "lrv", "--lrv-dir", str(lrv), "--out", str(tmp_path / "q.json"), "--no-chart",
                 "--skip-bad"]) == 0
    assert "malformed_records_skipped 3" in capsys.readouterr().out
    recs = json.loads((tmp_path / "q.json").read_text())
    assert [r["conversations"][0]["value"] for r in recs][-1] == "<image>\nSize?" and len(recs) == 3
    (lrv / "filter_cap1.json").write_text(json.dumps({"images": []}))
    assert main(["data", "lrv", "--lrv-dir", str(lrv), "--out", str(tmp_path / "r.json"), "--no-chart"]) == 2
    assert "(or {\"annotations\": [...]}), got dict with keys 'images'" in capsys.readouterr().err


def test_lrv_dir_given_as_dot_or_dotdot_still_prefixes_its_own_name(tmp_path, monkeypatch):
    # the paths are relative to the folder holding DIR (the module docstring): `--lrv-dir .` from inside the
    # release used to write 'lrv-vg/2345.jpg' (Path('.').name is ''), and `lrv-vg/..` '../lrv-vg/2345.jpg'
    from emma_mamba.data.lrv import convert

    lrv = _release(tmp_path)
    want = convert(lrv)[0]
    assert want[0]["image"] == "lrv/lrv-vg/2345.jpg"
    monkeypatch.chdir(lrv)
    assert convert(".")[0] == want
    assert convert("lrv-vg/..")[0] == want
