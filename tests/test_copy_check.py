"""``prepare.CopyCheck``: the per-query validity check of prepared copies, remembered while three stats show no
change, agrees with the full check (``valid_copies``) after every kind of change, and reads no manifest otherwise."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_prepare import _config, _write_data

from dpgateway import Gateway, prepare
from dpgateway.policies.loader import load_config


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


@pytest.fixture
def folder_source(tmp_path: Path):
    """Table ``t`` read (as a connector would) from a folder of files, one in a subfolder, one through a
    linked subfolder, with a copy folder and a manifest taken of the folder's state now (``retake``)."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for path in (data / "a.csv", data / "sub" / "b.csv", tmp_path / "elsewhere" / "c.csv"):
        path.write_text("pid\n1\n")
    os.symlink(tmp_path / "elsewhere", data / "linked")
    _config(tmp_path)
    config = load_config(tmp_path / "dpgateway.yaml")
    table = config.table("t")
    assert table is not None
    sources = {"t": str(data)}
    seed = b"seed"
    cache = prepare.private_folder(config.cache_folder)

    def retake() -> None:
        copy = cache / "t-0123456789abcdef-0123456789ab.parquet"
        copy.mkdir(exist_ok=True)
        state = prepare.source_state(table, sources)
        assert state is not None and "files" in state
        prepare.write_manifest(cache, table, file=copy, source=state, policy=prepare.policy_digest(table, seed), rows=1)

    retake()
    return data, prepare.CopyCheck(config, seed, sources), lambda: prepare.valid_copies(config, seed, sources), retake


def test_a_folder_source_is_checked_entry_by_entry(folder_source, tmp_path: Path) -> None:
    """Every change to a file or folder under the source, at any depth, makes the copy invalid for the full
    check and for the remembered one alike; a copy of the new state is valid again."""
    data, check, full, retake = folder_source

    def moved_aside(path: Path) -> None:  # the same name, size and content, another inode (replaced by rename)
        os.replace(path, path.with_suffix(".old"))
        path.write_bytes(path.with_suffix(".old").read_bytes())
        path.with_suffix(".old").unlink()

    def touched(path: Path) -> None:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime restored: only the ctime moves

    def relinked() -> None:
        (tmp_path / "elsewhere2").mkdir()
        (tmp_path / "elsewhere2" / "c.csv").write_text("pid\n1\n")
        (data / "linked").unlink()
        os.symlink(tmp_path / "elsewhere2", data / "linked")

    changes = [
        lambda: (data / "sub" / "new.csv").write_text("pid\n2\n"),  # added in a subfolder
        lambda: (data / "a.csv").write_text("pid\n12\n"),  # rewritten in place, another size
        lambda: moved_aside(data / "sub" / "b.csv"),
        lambda: touched(data / "a.csv"),
        lambda: (data / "sub" / "new.csv").unlink(),  # removed
        lambda: os.rename(data / "a.csv", data / "a2.csv"),  # renamed: same inode, another name
        lambda: (data / "empty").mkdir(),  # a folder added
        lambda: (tmp_path / "elsewhere" / "c.csv").write_text("pid\n3\n"),  # rewritten through the link
        relinked,  # the linked folder re-pointed
        lambda: (data / ".hidden").write_text("x"),  # a file Spark skips: still a change (conservative)
    ]
    for change in changes:
        retake()
        assert len(check.valid()) == 1 and full() == check.valid()
        change()
        assert check.valid() == () == full()
    retake()
    assert len(check.valid()) == 1
    os.rmdir(Path(check.valid()[0].path))  # the copy folder removed
    assert check.valid() == () == full()


def test_a_folder_that_cannot_be_read_has_no_state(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text("x\n")
    assert prepare.path_state(str(data)) is not None
    os.symlink(tmp_path / "missing", data / "dangling")  # Spark would fail to read it too
    assert prepare.path_state(str(data)) is None
    assert prepare.path_state(str(tmp_path / "absent")) is None


def test_a_written_folder_is_made_private_and_moved_to_a_new_name(tmp_path: Path) -> None:
    """Whatever modes the engine gave the files, the installed copy is 0700 folders and 0600 files; older
    copy folders of the table are removed, the previous one and other tables' copies are kept."""
    cache = prepare.private_folder(tmp_path / "cache")
    written = tmp_path / "cache" / ".prepare-x" / "t-0123456789abcdef.parquet"
    (written / "sub").mkdir(parents=True, mode=0o777)
    for name in ("part-0.parquet", ".part-0.parquet.crc", "_SUCCESS", "sub/x"):
        (written / name).write_text("rows")
        os.chmod(written / name, 0o666)
    os.chmod(written, 0o777)
    target = prepare.install_copy(written, cache / "t-0123456789abcdef.parquet")
    assert target.parent == cache and target.name.startswith("t-0123456789abcdef-") and target.is_dir()
    modes = {(p.is_dir(), p.stat().st_mode & 0o777) for p in [target, *target.rglob("*")]}
    assert modes == {(True, 0o700), (False, 0o600)}
    _config(tmp_path)
    config = load_config(tmp_path / "dpgateway.yaml")
    table = config.table("t")
    assert table is not None
    older = [cache / f"t-{'0' * 16}-{i:012x}.parquet" for i in range(3)]
    other = cache / f"t-x-{'0' * 16}-{0:012x}.parquet"  # another table's ("t-x") copy
    for path in [*older, other]:
        (path / "part").mkdir(parents=True)
    prepare.prune_copies(cache, table, keep={target.name, older[0].name})
    assert sorted(p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")) == sorted(
        [target.name, older[0].name, other.name]
    )
