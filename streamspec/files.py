"""Writing files so that a crash never leaves one half-written (standard library only:
the runtime on a device uses it too).

Every file streamspec writes goes through `write_atomic`: the content goes to a hidden
temporary file in the same folder, is flushed to disk, and is renamed over the target
in one step. A process killed at any moment leaves either the old file or the new one,
never a mixture; a failed write (disk full, no permission) raises and leaves the old file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

PathLike = Union[str, os.PathLike]


def _read_umask() -> int:
    # os.umask can only be read by setting it: done once, at import, because the umask is
    # process-wide and a thread creating a file in between would get mode 0666.
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _file_mode(path: Path) -> int:
    """The mode the file would have had if written directly: the old file's, else
    0666 less the umask (mkstemp makes its file 0600, readable by its owner only,
    which a folder copied to a device or served to another user must not inherit)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o666 & ~_UMASK


def write_atomic(path: PathLike, write: Callable[[Path], None]) -> None:
    """Call write(temporary path), then rename the result onto `path`."""
    path = Path(path)
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as handle:  # the data reaches the disk before the rename does
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: PathLike, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: PathLike, data: Any, indent: int = 2) -> None:
    """`data` as JSON (NaN and infinities refused: they are not JSON)."""
    write_text(path, json.dumps(data, indent=indent, allow_nan=False) + "\n")
