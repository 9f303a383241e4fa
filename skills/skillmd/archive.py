"""A skill library as files: read from a zip or a folder, written to a zip or a folder.

Every file of the archive becomes an ``Entry``, read or not: what lies inside a skill's folder
(the folder of a SKILL.md, or one below it) is read, within the size limits; what lies outside is
listed unread, so the import can say why it was left. A damaged archive is refused as a whole.
"""

from __future__ import annotations

import io
import lzma
import os
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from django.conf import settings

from base.errors import DomainError
from skills.skillmd.document import FILE_NAME

MAX_ENTRIES = 20_000
# Names of what archivers and checkouts add beside the files: never part of a skill.
_METADATA_PARTS = {"__MACOSX", ".git", ".DS_Store", "Thumbs.db"}


@dataclass
class Entry:
    """One file of an archive. ``content`` is None when it was not read: ``refusal`` says why
    it cannot be kept, ``ignored`` why it is no part of any skill."""

    path: str
    content: bytes | None = None
    executable: bool = False
    refusal: str = ""
    ignored: str = ""


def file_limit() -> int:
    return int(settings.METACLAW["SKILL_FILE_MAX_BYTES"])


def unpacked_limit() -> int:
    return 2 * int(settings.METACLAW["SKILL_IMPORT_MAX_BYTES"])


def folder_of(path: str) -> str:
    """The folder ``path`` is in ("" for the archive's top)."""
    parent = str(PurePosixPath(path).parent)
    return "" if parent == "." else parent


def skill_root(path: str, roots: set[str]) -> str | None:
    """The folder of the nearest SKILL.md at or above ``path``, of the folders in ``roots``."""
    parent = PurePosixPath(path).parent
    for folder in (parent, *parent.parents):
        key = "" if str(folder) == "." else str(folder)
        if key in roots:
            return key
    return None


def skill_roots(paths: list[str]) -> set[str]:
    """The folders holding a SKILL.md."""
    return {folder_of(p) for p in paths if PurePosixPath(p).name == FILE_NAME}


def path_refusal(path: str) -> str:
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or ".." in parts or any(ord(c) < 32 for c in path):
        return "unsafe path (absolute, '..', a backslash or a control character)"
    return ""


def _metadata(path: str) -> str:
    if any(part in _METADATA_PARTS for part in path.split("/")):
        return "archiver or version-control metadata"
    return ""


class _Budget:
    """What an archive may unpack to in all: a zip bomb is refused, not read."""

    def __init__(self) -> None:
        self.left = unpacked_limit()

    def take(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise DomainError(
                f"The skill files unpack to more than {unpacked_limit():,} bytes.", field="file"
            )


def _classified(path: str, size: int, roots: set[str], *, symlink: bool) -> Entry | None:
    """The entry for a file that will not be read, or None for one to read."""
    if reason := _metadata(path):
        return Entry(path, ignored=reason)
    if skill_root(path, roots) is None:
        return Entry(path, ignored="not inside a skill's folder (no SKILL.md above it)")
    if symlink:
        return Entry(path, refusal="a symbolic link, not a file")
    if reason := path_refusal(path):
        return Entry(path, refusal=reason)
    if size > file_limit():
        return Entry(path, refusal=f"{size:,} bytes; the limit per file is {file_limit():,}")
    return None


# --- Zip ------------------------------------------------------------------------------------

# What reading a damaged or unusual archive raises besides BadZipFile: RuntimeError (an
# encrypted entry), NotImplementedError (an unsupported compression method), zlib.error and
# EOFError (corrupt or truncated deflate data), OSError / LZMAError (bzip2 / lzma data), and
# ValueError (bad header fields).
_ZIP_READ_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    RuntimeError,
    NotImplementedError,
    zlib.error,
    EOFError,
    OSError,
    lzma.LZMAError,
    ValueError,
)


def read_zip(data: bytes) -> list[Entry]:
    """Every file in a zip archive; the damaged ones refuse the archive, all named."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except _ZIP_READ_ERRORS as exc:
        raise DomainError("The upload is not a zip archive.", field="file") from exc
    with archive:
        infos = [info for info in archive.infolist() if not info.is_dir()]
        if len(infos) > MAX_ENTRIES:
            raise DomainError(
                f"The archive holds {len(infos):,} files; at most {MAX_ENTRIES:,}.", field="file"
            )
        roots = skill_roots([info.filename for info in infos])
        budget = _Budget()
        entries: list[Entry] = []
        damaged: list[str] = []
        for info in infos:
            mode = info.external_attr >> 16 if info.create_system == 3 else 0
            entry = _classified(info.filename, info.file_size, roots, symlink=stat.S_ISLNK(mode))
            if entry is None:
                budget.take(info.file_size)
                try:
                    content = archive.read(info)
                except _ZIP_READ_ERRORS as exc:
                    # Corrupt data or CRC, an encrypted entry, an unsupported compression method.
                    damaged.append(f"{info.filename[:200]} ({type(exc).__name__})")
                    continue
                entry = Entry(info.filename, content, executable=bool(mode & 0o111))
            entries.append(entry)
    if damaged:
        raise DomainError(
            f"The archive entries {', '.join(damaged[:20])} cannot be read.", field="file"
        )
    return entries


def zip_bytes(files: dict[str, str | bytes], executable: frozenset[str] = frozenset()) -> bytes:
    """A zip of ``files`` (text as UTF-8), the same bytes for the same files."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(files):
            info = zipfile.ZipInfo(path, date_time=(2026, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = (0o100755 if path in executable else 0o100644) << 16
            content = files[path]
            archive.writestr(info, content.encode() if isinstance(content, str) else content)
    return buffer.getvalue()


# --- Folders --------------------------------------------------------------------------------


def read_folder(root: Path) -> list[Entry]:
    """Every file under ``root`` (a library, a ``skills/`` folder or a repository checkout)."""
    paths = sorted(p for p in root.rglob("*") if p.is_symlink() or p.is_file())
    if len(paths) > MAX_ENTRIES:
        raise DomainError(f"{root} holds more than {MAX_ENTRIES:,} files.", field="file")
    relative = [p.relative_to(root).as_posix() for p in paths]
    roots = skill_roots(relative)
    budget = _Budget()
    entries = []
    for path, name in zip(paths, relative, strict=True):
        symlink = path.is_symlink()
        size = 0 if symlink else path.stat().st_size
        entry = _classified(name, size, roots, symlink=symlink)
        if entry is None:
            budget.take(size)
            mode = path.stat().st_mode
            entry = Entry(name, path.read_bytes(), executable=bool(mode & 0o111))
        entries.append(entry)
    return entries


def write_folder(
    root: Path, files: dict[str, str | bytes], executable: frozenset[str] = frozenset()
) -> None:
    for relative, content in files.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
        if relative in executable:
            os.chmod(target, 0o755)
