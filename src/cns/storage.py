"""Crash-safe file primitives for the concept library: atomic writes, checksums, a lock."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import CNSError, LibraryLockedError

__all__ = ["disk_error", "write_json_atomic", "read_json", "file_sha256", "fsync_tree", "exclusive_lock", "remove_tree",
           "OWNED_MARKER", "make_owned_dir", "is_owned", "read_file_bytes", "read_text_file"]

# A folder that cns makes inside a library for its own use (a staging folder, a task, a training
# checkpoint) holds this file; cleanup removes only folders that hold it, never one by its name.
OWNED_MARKER = ".cns-owned"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data, default=None) -> None:
    """Write JSON beside ``path``, flush it to disk, then switch it in with one rename.

    The temporary file carries the process id, so processes writing the same file never
    share one; ``default`` converts objects json cannot (as in ``json.dump``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise disk_error(exc, path) from None
    _fsync_dir(path.parent)


def read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CNSError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CNSError(f"{path} is damaged: not valid JSON ({exc})") from None


def read_file_bytes(path: Path, what: str = "") -> bytes:
    """The bytes of a user's file (``what`` says which kind, for the message), or a one-line
    :class:`CNSError` naming it: missing, a folder, unreadable."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if path.is_dir():
        raise CNSError(f"{label} is a folder, not a file")
    if not path.exists():
        raise CNSError(f"{label} does not exist")
    try:
        return path.read_bytes()
    except PermissionError:
        raise CNSError(f"cannot read {label}: permission denied") from None
    except OSError as exc:
        raise CNSError(f"cannot read {label}: {exc.strerror or exc}") from None


def read_text_file(path: Path, what: str) -> str:
    """A user's UTF-8 text file (a leading BOM, as Notepad writes, is dropped), or a one-line
    :class:`CNSError` naming it; see :func:`read_file_bytes`."""
    data = read_file_bytes(path, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CNSError(f"{what} {path} is not UTF-8 text (invalid byte 0x{data[exc.start]:02x} "
                       f"at offset {exc.start})") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_fingerprint(folder: Path, suffixes: tuple[str, ...] = (".json", ".safetensors", ".bin", ".txt")) -> str:
    """sha256 over the relative names and contents of a folder's files with these suffixes: the
    same model wherever it is installed, another one when any weight or config differs."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + file_sha256(path).encode())
    return digest.hexdigest()


def fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself to disk."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(Path(folder))


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def make_owned_dir(path: Path, kind: str) -> Path:
    """Create the new folder ``path`` (it must not exist) with cns's marker in it."""
    path = Path(path)
    path.mkdir()
    (path / OWNED_MARKER).write_text(json.dumps({"made_by": "cns", "kind": kind}) + "\n", encoding="utf-8")
    return path


def is_owned(path: Path) -> bool:
    """Whether ``path`` is a folder cns made (it holds the marker)."""
    return Path(path).is_dir() and (Path(path) / OWNED_MARKER).is_file()


def disk_error(exc: OSError, path: Path) -> CNSError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CNSError(f"disk full while writing {path}; the library is unchanged")
    return CNSError(f"cannot write {path}: {exc.strerror or exc}")


@contextmanager
def exclusive_lock(folder: Path):
    """Hold the library's write lock, or refuse at once if another process holds it.

    An ``flock`` on ``folder/.lock``: the kernel releases it when the holder dies, so a killed
    run never leaves the library locked.
    """
    path = Path(folder) / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise CNSError(f"cannot write to library {folder}: {exc.strerror or exc} on {path.name} (learn, remove and "
                       "repair need write access; generate, show, check and export do not)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise LibraryLockedError(
                f"library {folder} is being written by another process (pid {holder}); try again when it has finished"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
