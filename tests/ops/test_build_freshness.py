"""The source digest recorded in emma_mamba._C at build time (setup.py) against the checkout's csrc/: a build
from other sources than the checkout holds (a pull or a kernel edit without rebuilding) is said once by the ops
and by `emma-mamba env`. The digest is checked against hand-made changes of a copy of csrc/."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from emma_mamba import envinfo, ops
from emma_mamba._csrc_digest import csrc_digest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"


@pytest.fixture
def copy(tmp_path):
    dst = tmp_path / "csrc"
    shutil.copytree(CSRC, dst)
    return dst


def test_the_digest_follows_the_compiled_sources_only(copy):
    base = csrc_digest(CSRC)
    assert csrc_digest(copy) == base  # paths are taken relative to csrc/: the same sources elsewhere agree
    cu = copy / "cuda" / "selective_scan.cu"
    cu.write_bytes(cu.read_bytes() + b" ")  # one byte more in a CUDA source
    assert csrc_digest(copy) != base
    cu.write_bytes(cu.read_bytes()[:-1])
    assert csrc_digest(copy) == base
    (copy / "emu" / "extra.cpp").write_text("// the emulator is built at run time, not into _C\n")
    (copy / "cpu" / "notes.txt").write_text("not a source\n")
    assert csrc_digest(copy) == base
    (copy / "cpu" / "common.h").rename(copy / "cpu" / "common2.h")  # same bytes, another name
    assert csrc_digest(copy) != base
    (copy / "cpu" / "common2.h").rename(copy / "cpu" / "common.h")
    (copy / "cpu" / "new.h").write_text("")  # an empty header added
    assert csrc_digest(copy) != base


def test_the_build_in_this_checkout_is_of_its_sources():
    from emma_mamba import _C

    # CI builds the extension from this tree before the tests: a mismatch here means a stale local build
    assert _C.csrc_digest == csrc_digest(CSRC), "emma_mamba._C is stale: rebuild (python setup.py build_ext --inplace)"
    assert ops.build_freshness(_C) == (True, f"built from {CSRC} as it is now (digest {_C.csrc_digest})")


def test_a_stale_build_is_named_with_the_rebuild(copy, caplog, monkeypatch):
    from emma_mamba import _C

    cu = copy / "cuda" / "state_update.cu"
    cu.write_text(cu.read_text() + "// edited\n")
    fresh, why = ops.build_freshness(_C, copy)
    assert fresh is False
    assert _C.csrc_digest in why and csrc_digest(copy) in why and "pip install --no-build-isolation -e ." in why
    assert ops.build_freshness(SimpleNamespace(), copy)[0] is None  # an older build records no digest
    # said once per process, as a warning of the ops' logger, when the compiled backends load
    stale = SimpleNamespace(csrc_digest="0" * 16)
    monkeypatch.setattr(ops, "_stale_checked", False)
    with caplog.at_level(logging.WARNING, logger="emma_mamba.ops"):
        ops.warn_if_stale(stale)
        ops.warn_if_stale(stale)
    msgs = [r.getMessage() for r in caplog.records if "built from other sources" in r.getMessage()]
    assert len(msgs) == 1 and "0" * 16 in msgs[0]
    # and by `emma-mamba env`, in its warnings
    monkeypatch.setattr(ops, "build_freshness", lambda ext, csrc=None: (False, "STALE: rebuild"))
    r = envinfo.collect()
    assert r["extension"]["built_from_these_sources"] is False and "STALE: rebuild" in r["warnings"]
    assert "CHANGED since the build" in envinfo.format_text(r)
