"""Shared fixtures of the training tests: a small ShapesWorld data set and run configs for the tiny preset."""

from __future__ import annotations

import json

import pytest

from emma_mamba.data.shapes import ShapesConfig, generate
from emma_mamba.training.config import run_config_from_dict


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """ShapesWorld with 24 training images (96 px, resized to the tiny ViT's 32 px)."""
    out = tmp_path_factory.mktemp("shapes")
    generate(ShapesConfig(seed=0, n_train=24, n_heldout=2, image_size=96, max_turns=2), out)
    return out


def subset(shapes, tmp_path, n: int, stage: int = 2, name: str = "data.json"):
    """The first n records of a ShapesWorld training file, as a new JSON file."""
    src = shapes / "train" / ("stage2_instruct.json" if stage == 2 else "stage1_captions.json")
    path = tmp_path / name
    path.write_text(json.dumps(json.loads(src.read_text())[:n]))
    return path


def make_cfg(shapes, out, json_path=None, **sections):
    """A tiny-preset RunConfig; ``sections`` are nested overrides, e.g. train={'lr': 1e-3}."""
    d = {"stage": "finetune", "output_dir": str(out), "model": "tiny",
         "data": {"json": str(json_path or shapes / "train" / "stage2_instruct.json"),
                  "image_folder": str(shapes / "images"), "max_length": 96},
         "train": {"global_batch_size": 2, "micro_batch_size": 1, "max_steps": 2, "warmup_steps": 1, "lr": 1e-3,
                   "weight_decay": 0.1},
         "log": {"progress_bar": False}}
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(d.get(k, {}), dict):
            d.setdefault(k, {}).update(v)
        else:
            d[k] = v
    return run_config_from_dict(d, source="test")
