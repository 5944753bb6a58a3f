"""Atomic writes: a file or a folder on disk is the old one or the whole new one, never a part.

Every file ``siss``, its command line and the examples write (JSON summaries, safetensors,
figures, ``save_pretrained`` folders, checkpoints) goes through this module, so a run killed at
any moment, or a second process reading while the first writes, never sees a half-written file.
The recipe is the usual one: write a temporary sibling (same folder, so the same file system),
flush it to disk (``os.fsync``), ``os.replace`` it over the target, then fsync the folder so the
rename itself survives a power cut. The temporary names start with a dot (``.name-XXXXXXXX``):
globs such as ``step-*`` never match them, and only a process killed mid-write leaves one behind.

Modes are those of a plain ``open(path, "w")`` / ``mkdir``: ``0o666`` (``0o777`` for a folder)
less the umask, not ``mkstemp``'s private ``0o600``; a file or folder that is replaced keeps its
mode. The standard library only (``siss.sequential`` depends on nothing else).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_folder",
    "atomic_path",
    "replace_folder",
    "write_atomically",
    "write_json_atomically",
]


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux: ``/proc``)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o077)  # no read-only query elsewhere; a racing thread gets a private file
    os.umask(mask)
    return mask


def _mode(path: Path, default: int, *, folder: bool) -> int:
    """The permission bits of what is at ``path`` if it is a folder (``folder``) or a file (not
    ``folder``); else (nothing there, or the other kind) ``default`` less the umask."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return default & ~_umask()
    if stat.S_ISDIR(status.st_mode) != folder:
        return default & ~_umask()
    return stat.S_IMODE(status.st_mode)


def _fsync_file(path: str | os.PathLike[str]) -> None:
    """Flushes a file's data to disk (``os.fsync`` needs a writable handle on Windows)."""
    handle = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _fsync_folder(path: str | os.PathLike[str]) -> None:
    """Flushes a folder's entries (a rename in it) to disk. A folder that cannot be opened or
    synced (Windows, some network file systems) is skipped: the rename is as durable as the OS
    makes it."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(handle)
    finally:
        os.close(handle)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary file beside ``path`` to write by any means; moved onto ``path`` on success.

    The temporary file exists (empty) and keeps ``path``'s suffix, so writers that pick the
    format from the name (``fig.savefig``, ``PIL.Image.save``) work unchanged. When the block
    ends without an exception it is given ``path``'s mode (or the umask's, for a new file),
    fsynced, and ``os.replace``d over ``path``; the folder is then fsynced. When the block raises
    (``KeyboardInterrupt`` included) it is removed and ``path`` is left as it was. Missing
    parent folders are created. A symbolic link at ``path`` is written through: its target is
    replaced and the link stays.

    Args:
        path: the file to (re)write.

    Yields:
        The temporary file's path, in ``path``'s folder.

    Examples:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with atomic_path(folder / "weights.safetensors") as tmp:
        ...     _ = tmp.write_bytes(b"new")  # e.g. safetensors.torch.save_file(tensors, tmp)
        >>> (folder / "weights.safetensors").read_bytes(), [p.name for p in folder.iterdir()]
        (b'new', ['weights.safetensors'])
    """
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(
        prefix=f".{target.name}-", suffix=target.suffix, dir=target.parent
    )
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, _mode(target, 0o666, folder=False))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)


def write_atomically(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Writes ``data`` (``str``: as UTF-8) to ``path`` atomically (see :func:`atomic_path`).

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "table.md"
        >>> write_atomically(path, "| a |\\n")
        >>> path.read_text()
        '| a |\\n'
    """
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def write_json_atomically(
    path: str | os.PathLike[str],
    payload: Any,
    *,
    default: Callable[[Any], Any] | None = None,
) -> None:
    """Writes ``payload`` as JSON (indented by 2, a final newline) to ``path`` atomically.

    Args:
        path: the file to (re)write.
        payload: anything ``json.dumps`` takes (NaN is written as ``NaN``).
        default: ``json.dumps``'s fallback for other objects (e.g. ``str``); ``None`` raises
            ``TypeError`` on them, and ``path`` is left as it was.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "metrics.json"
        >>> write_json_atomically(path, {"rate": 0.5, "where": path.parent}, default=str)
        >>> json.loads(path.read_text())["rate"]
        0.5
    """
    text = json.dumps(payload, indent=2, default=default) + "\n"  # raises before any file exists
    write_atomically(path, text)


def replace_folder(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Moves the finished folder ``source`` onto ``path``, replacing whatever is there.

    For folders that several processes fill (``accelerator.save_state``), which need a name they
    agree on; otherwise use :func:`atomic_folder`. ``source`` must be in ``path``'s folder (one
    file system). Every file and folder in ``source`` is fsynced first, and ``source`` is given
    the mode of the folder it replaces (else ``0o777`` less the umask, as ``mkdir`` would).

    What is guaranteed: ``path`` is never a partly written folder. A folder cannot be swapped
    for another in one portable step, so an existing ``path`` is first renamed aside (to
    ``.name-old-XXXXXXXX`` beside it), then ``source`` is renamed to ``path``, then the old one is
    deleted: between those two renames (microseconds) ``path`` is absent, and a process killed
    right then leaves the old folder, whole, under the hidden name. If the second rename fails,
    the old folder is put back and the error raised, with ``source`` left as it was.

    Args:
        source: the complete new folder.
        path: the folder to replace or create.

    Examples:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "model").mkdir()
        >>> _ = (root / "model" / "old.txt").write_text("old")
        >>> (root / ".staging").mkdir()
        >>> _ = (root / ".staging" / "new.txt").write_text("new")
        >>> replace_folder(root / ".staging", root / "model")
        >>> [p.name for p in root.iterdir()], [p.name for p in (root / "model").iterdir()]
        (['model'], ['new.txt'])
    """
    source, path = Path(source), Path(path)
    os.chmod(source, _mode(path, 0o777, folder=True))
    for folder, _, files in os.walk(source, topdown=False):
        for name in files:
            file = os.path.join(folder, name)
            if not os.path.islink(file):
                _fsync_file(file)
        _fsync_folder(folder)
    aside = None
    if os.path.lexists(path):
        aside = path.with_name(f".{path.name}-old-{uuid.uuid4().hex[:8]}")
        os.replace(path, aside)
    try:
        os.replace(source, path)
    except BaseException:
        if aside is not None:
            os.replace(aside, path)
        raise
    _fsync_folder(path.parent)
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside)
        else:
            aside.unlink()


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill by any means; swapped in for ``path`` on success.

    For ``model.save_pretrained(tmp)``, a checkpoint of several files, any folder that is only
    valid whole. When the block ends without an exception the folder replaces ``path`` (and
    whatever was there) through :func:`replace_folder`, whose docstring says what is
    guaranteed; when the block raises, the temporary folder is deleted and ``path`` is left as it
    was. Missing parent folders are created.

    Args:
        path: the folder to (re)write.

    Yields:
        The temporary folder's path, empty, in ``path``'s parent folder.

    Examples:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> with atomic_folder(root / "checkpoint") as tmp:
        ...     _ = (tmp / "state.json").write_text("{}")  # e.g. unet.save_pretrained(tmp)
        >>> [p.name for p in root.iterdir()], [p.name for p in (root / "checkpoint").iterdir()]
        (['checkpoint'], ['state.json'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield tmp
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
