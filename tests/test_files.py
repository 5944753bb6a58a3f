"""``siss._files``: atomic writes of files and folders.

What every writer in the tree relies on: the target is the old content or the whole new one
(never a part, never nothing after an error), the data reaches the disk before the rename
(``os.fsync`` on the very file that ends up in place), modes are a plain ``open``'s (the umask's,
not ``mkstemp``'s 0600; a replaced file keeps its own), and nothing is left beside the target.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from siss import _files
from siss._files import (
    atomic_folder,
    atomic_path,
    replace_folder,
    write_atomically,
    write_json_atomically,
)

posix_modes = pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """A umask other than the usual 0o022, so a hard-coded 0o644 would show."""
    previous = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(previous)


@pytest.fixture
def synced(monkeypatch) -> list[int]:
    """The inodes ``os.fsync`` was called on, in order (the real fsync still runs)."""
    inodes: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        inodes.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return inodes


class Boom(Exception):
    pass


# ------------------------------------------------------------------------------------ files


@posix_modes
def test_a_new_file_gets_the_umask_mode_not_mkstemps(tmp_path, umask):
    assert _files._umask() == umask
    write_atomically(tmp_path / "a.txt", "x")
    assert mode(tmp_path / "a.txt") == 0o666 & ~umask == 0o640


@posix_modes
def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    path = tmp_path / "a.txt"
    path.write_text("old")
    path.chmod(0o604)
    write_atomically(path, "new")
    assert path.read_text() == "new" and mode(path) == 0o604


def test_the_file_in_place_was_fsynced_before_the_rename(tmp_path, synced):
    path = tmp_path / "a.bin"
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"data")
        written = tmp.stat().st_ino
    assert path.stat().st_ino == written  # renamed, not copied
    assert synced[0] == written
    assert tmp_path.stat().st_ino in synced[1:]  # the folder, for the rename itself


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_a_failing_writer_leaves_the_old_file_and_nothing_else(tmp_path, error):
    path = tmp_path / "a.json"
    path.write_text("old")
    with pytest.raises(error), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise error
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failing_writer_creates_no_file(tmp_path):
    with pytest.raises(Boom), atomic_path(tmp_path / "a.png"):
        raise Boom
    assert list(tmp_path.iterdir()) == []


def test_the_temporary_file_is_a_hidden_sibling_with_the_suffix(tmp_path):
    # savefig and PIL pick the format from the name
    with atomic_path(tmp_path / "deep" / "figure.png") as tmp:
        assert tmp.parent == tmp_path / "deep"  # missing folders created
        assert tmp.name.startswith(".figure.png-") and tmp.suffix == ".png"
        assert tmp.exists()
        tmp.write_bytes(b"\x89PNG")
    assert (tmp_path / "deep" / "figure.png").read_bytes() == b"\x89PNG"


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="symbolic links")
def test_a_symbolic_link_is_written_through(tmp_path):
    target, link = tmp_path / "target.txt", tmp_path / "link.txt"
    target.write_text("old")
    link.symlink_to(target)
    write_atomically(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_write_atomically_takes_bytes_and_utf8_text(tmp_path):
    write_atomically(tmp_path / "a.bin", b"\x00\xff")
    write_atomically(tmp_path / "a.md", "λ = 0.5\n")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\xff"
    assert (tmp_path / "a.md").read_bytes() == "λ = 0.5\n".encode()


def test_write_json_atomically_indents_and_ends_with_a_newline(tmp_path):
    path = tmp_path / "a.json"
    write_json_atomically(path, {"a": [1, 2], "nan": float("nan")})
    text = path.read_text()
    assert text == json.dumps({"a": [1, 2], "nan": float("nan")}, indent=2) + "\n"
    write_json_atomically(path, {"where": tmp_path}, default=str)
    assert json.loads(path.read_text()) == {"where": str(tmp_path)}


def test_an_unserialisable_payload_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("{}\n")
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json_atomically(path, {"where": tmp_path})
    assert path.read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


# ---------------------------------------------------------------------------------- folders


def make_folder(path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)


def contents(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in path.rglob("*") if p.is_file()}


def test_atomic_folder_swaps_the_whole_folder_in(tmp_path):
    path = tmp_path / "model"
    make_folder(path, {"old.bin": "old", "sub/old.json": "{}"})
    with atomic_folder(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model-")
        assert list(tmp.iterdir()) == []
        make_folder(tmp, {"new.bin": "new", "sub/config.json": "[]"})
        assert contents(path) == {"old.bin": "old", "sub/old.json": "{}"}  # old until the end
    assert contents(path) == {"new.bin": "new", "sub/config.json": "[]"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary, no old copy


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_a_failing_folder_writer_leaves_the_old_folder(tmp_path, error):
    path = tmp_path / "model"
    make_folder(path, {"old.bin": "old"})
    with pytest.raises(error), atomic_folder(path) as tmp:
        make_folder(tmp, {"half.bin": "half"})
        raise error
    assert contents(path) == {"old.bin": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@posix_modes
def test_folder_modes_are_the_umasks_or_the_replaced_folders(tmp_path, umask):
    with atomic_folder(tmp_path / "new") as tmp:
        make_folder(tmp, {"a": "a"})
    assert mode(tmp_path / "new") == 0o777 & ~umask == 0o750  # not mkdtemp's 0o700
    (tmp_path / "new").chmod(0o705)
    with atomic_folder(tmp_path / "new") as tmp:
        make_folder(tmp, {"b": "b"})
    assert mode(tmp_path / "new") == 0o705 and contents(tmp_path / "new") == {"b": "b"}


def test_every_file_and_folder_is_fsynced_before_the_swap(tmp_path, synced):
    with atomic_folder(tmp_path / "model") as tmp:
        make_folder(tmp, {"a.bin": "a", "sub/b.json": "b"})
        expected = {p.stat().st_ino for p in [tmp, tmp / "a.bin", tmp / "sub", tmp / "sub/b.json"]}
    assert expected <= set(synced)
    assert synced[-1] == tmp_path.stat().st_ino  # the parent, after the rename


def test_replace_folder_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    path, source = tmp_path / "model", tmp_path / ".staging"
    make_folder(path, {"old.bin": "old"})
    make_folder(source, {"new.bin": "new"})
    real = os.replace

    def replace(src, dst):
        if Path(src) == source:
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        replace_folder(source, path)
    assert contents(path) == {"old.bin": "old"} and contents(source) == {"new.bin": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staging", "model"]


def test_replace_folder_creates_a_missing_folder_and_replaces_a_file(tmp_path):
    source = tmp_path / ".staging"
    make_folder(source, {"a": "a"})
    replace_folder(source, tmp_path / "model")
    assert contents(tmp_path / "model") == {"a": "a"} and not source.exists()
    (tmp_path / "plain").write_text("a file where the folder goes")
    make_folder(source, {"b": "b"})
    replace_folder(source, tmp_path / "plain")
    assert contents(tmp_path / "plain") == {"b": "b"}
    if os.name != "nt":  # a folder's mode, not the replaced file's 0o644
        assert mode(tmp_path / "plain") == mode(tmp_path / "model") == 0o777 & ~_files._umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "plain"]
