"""``prepare.CopyCheck``: the per-query validity check of prepared copies, remembered while three stats show no
change, agrees with the full check (``valid_copies``) after every kind of change, and reads no manifest otherwise."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_prepare import _config, _write_data

from dpgateway import Gateway, prepare


@pytest.fixture
def gateway(tmp_path: Path):
    _write_data(tmp_path / "data-v1.csv")
    _write_data(tmp_path / "data-v2.csv", seed=9)
    os.symlink(tmp_path / "data-v1.csv", tmp_path / "t.csv")  # the policy's source is a link
    _config(tmp_path)
    with Gateway.from_config(tmp_path / "dpgateway.yaml") as gw:
        yield gw


def agree(gw: Gateway) -> tuple[prepare.PreparedCopy, ...]:
    remembered = gw._copies.valid()
    assert remembered == prepare.valid_copies(gw.config, gw._ctx.seed)
    assert gw._copies.valid() == remembered  # asked again: the same
    return remembered


def test_copy_check_follows_every_change_the_full_check_sees(gateway: Gateway, tmp_path: Path) -> None:
    gw = gateway
    assert agree(gw) == ()
    gw.prepare("t")
    assert len(agree(gw)) == 1
    source = tmp_path / "data-v1.csv"
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched only (mtime and ctime)
    assert agree(gw) == ()
    gw.prepare("t")
    assert len(agree(gw)) == 1
    (tmp_path / "t.csv").unlink()
    os.symlink(tmp_path / "data-v2.csv", tmp_path / "t.csv")  # the link re-pointed at another file
    assert agree(gw) == ()
    (tmp_path / "t.csv").unlink()
    os.symlink(source, tmp_path / "t.csv")  # back: the copy matches its source again
    assert len(agree(gw)) == 1
    table = gw.config.table("t")
    assert table is not None
    manifest = prepare.manifest_path(gw.config.cache_folder, table)
    document = json.loads(manifest.read_text())
    # edited in place (another size: two same-size writes within one tick of the file clock look alike to a stat)
    manifest.write_text(json.dumps({**document, "policy": "0" * 64, "edited": True}))
    assert agree(gw) == ()
    manifest.write_text(json.dumps(document))
    assert len(agree(gw)) == 1
    copy = Path(agree(gw)[0].path)
    copy.unlink()  # the copy removed, manifest and source unchanged
    assert agree(gw) == ()
    gw.prepare("t")
    assert len(agree(gw)) == 1
    manifest.unlink()
    assert agree(gw) == ()


def test_copy_check_reads_no_manifest_while_nothing_changed(
    gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = gateway
    gw.prepare("t")
    reads = []
    full = prepare._valid_copy
    monkeypatch.setattr(prepare, "_valid_copy", lambda *args: reads.append(args) or full(*args))
    for _ in range(5):
        assert len(gw._copies.valid()) == 1
    before = len(reads)
    assert before <= 1  # at most the first (the copy was just written)
    _write_data(tmp_path / "data-v1.csv", seed=4)  # rewritten
    assert gw._copies.valid() == ()
    assert len(reads) == before + 1
