"""Safe zip extraction: no path traversal, no symlinks, no zip bombs, atomic replacement.

:func:`safe_extract` checks every member before writing anything, extracts into a temporary folder
beside ``dest`` and moves it into place only when everything succeeded, so a refused or corrupt
archive never leaves a partial ``dest`` (nor damages a previous one). Given ``members`` (base names,
e.g. ``ratings.csv`` and ``movies.csv``) it writes only those: padding members cost nothing. A
marker file records the archive's sha256 and member names; extracting the same archive again
reuses the folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Collection

from flexmf_assets.files import read_json_object, sha256_file
from flexmf_assets.errors import ArchiveError

MARKER = ".flexmf-extracted.json"
#: members smaller than this are not held to the compression-ratio limit (tiny repetitive files
#: compress very well and cannot hurt)
RATIO_FLOOR_BYTES = 2**20
_CHUNK = 2**20
_DRIVE = re.compile(r"^[A-Za-z]:")
#: folders of metadata that archivers add (never a dataset member)
_IGNORED_TOP = ("__MACOSX",)


def _member_parts(archive: Path, name: str) -> tuple[str, ...]:
    """The safe relative path components of a member name, or ArchiveError."""
    if "\0" in name:
        raise ArchiveError(f"{archive}: member {name!r} has a NUL byte in its name")
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise ArchiveError(f"{archive}: member {name!r} has an absolute path")
    parts = tuple(p for p in re.split(r"[/\\]", name) if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"{archive}: member {name!r} escapes the destination ('..')")
    return parts


def _check_members(archive: Path, infos: list[zipfile.ZipInfo], max_total_bytes: int,
                   max_members: int, max_ratio: float,
                   wanted: frozenset[str] | None) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """Check every member's name and type; size-check and plan the ones to extract.

    With ``wanted`` (base names) only those files are planned, at most one per name (``__MACOSX``
    ignored); sizes and compression ratios are checked for planned members only.
    """
    if len(infos) > max_members:
        raise ArchiveError(f"{archive}: {len(infos)} members exceed the limit of {max_members}")
    total = 0
    seen: set[tuple[str, ...]] = set()
    plan = []
    chosen: dict[str, list[str]] = {}
    for info in infos:
        parts = _member_parts(archive, info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise ArchiveError(f"{archive}: member {info.filename!r} is a symbolic link")
        if parts and parts[0] == MARKER:
            raise ArchiveError(f"{archive}: member {info.filename!r} uses the reserved name {MARKER}")
        if info.is_dir():
            if wanted is None:
                plan.append((info, parts))
            continue
        if not parts:
            raise ArchiveError(f"{archive}: member {info.filename!r} has an empty path")
        if parts in seen:
            raise ArchiveError(f"{archive}: member {info.filename!r} appears twice")
        seen.add(parts)
        if wanted is not None:
            if parts[-1] not in wanted or parts[0] in _IGNORED_TOP:
                continue  # not needed: never written, never counted
            chosen.setdefault(parts[-1], []).append(PurePosixPath(*parts).as_posix())
        total += info.file_size
        if total > max_total_bytes:
            raise ArchiveError(f"{archive}: member {info.filename!r} brings the declared uncompressed "
                               f"size to {total} bytes, over the limit of {max_total_bytes}")
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_FLOOR_BYTES and ratio > max_ratio:
            raise ArchiveError(f"{archive}: member {info.filename!r} compression ratio {ratio:.0f} "
                               f"exceeds {max_ratio:g} (zip bomb?)")
        plan.append((info, parts))
    for base, paths in chosen.items():
        if len(paths) > 1:
            raise ArchiveError(f"{archive}: {len(paths)} files named {base} ({', '.join(paths)}); "
                               f"expected one")
    return plan


def _file_members(infos: list[zipfile.ZipInfo]) -> list[str]:
    """The archive's file member names (for messages about a missing member)."""
    return [info.filename for info in infos if not info.is_dir()]


def _extract_into(archive: Path, zf: zipfile.ZipFile, plan, root: Path, max_total_bytes: int) -> list[str]:
    written_total = 0
    files: list[str] = []
    for info, parts in plan:
        target = root.joinpath(*parts)
        written = 0
        try:
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "xb") as out:
                while chunk := src.read(_CHUNK):
                    written += len(chunk)
                    written_total += len(chunk)
                    if written > info.file_size or written_total > max_total_bytes:
                        raise ArchiveError(f"{archive}: member {info.filename!r} expands beyond its "
                                           f"declared size of {info.file_size} bytes (lying header)")
                    out.write(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
            raise ArchiveError(f"{archive}: member {info.filename!r} is corrupt or unsupported "
                               f"({' '.join(str(exc).split())})") from None
        except OSError as exc:
            raise ArchiveError(f"{archive}: cannot extract member {info.filename!r}: "
                               f"{exc.strerror or exc}") from None
        files.append(PurePosixPath(*parts).as_posix())
    return files


def safe_extract(archive: Path, dest: Path, *, max_total_bytes: int = 4 * 2**30,
                 max_members: int = 10_000, max_ratio: float = 200.0,
                 archive_sha256: str | None = None,
                 members: Collection[str] | None = None) -> list[Path]:
    """Extract the zip ``archive`` into ``dest`` safely; returns the extracted files (archive order).

    Refuses absolute names, drive letters, ``..`` components and symlink members (anywhere in the
    archive), more than ``max_members`` members, a declared uncompressed total of the extracted
    members over ``max_total_bytes`` and members (over 1 MiB) compressed more than ``max_ratio``
    times; bytes actually written are bounded too. ``members``: base names of the only files to
    extract (found in any folder, ``__MACOSX`` ignored, at most one each; a name absent from the
    archive is not an error here, :func:`find_member` reports it); None extracts everything.
    ``archive_sha256`` (already verified by the caller) saves hashing the archive again. When
    ``dest`` holds a marker with the archive's sha256 (and the same ``members``) it is reused as is.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: not a zip archive (no such file)")
    digest = archive_sha256.lower() if archive_sha256 else sha256_file(archive)
    wanted = frozenset(members) if members is not None else None
    selection = sorted(wanted) if wanted is not None else None
    marker = read_json_object(dest / MARKER)
    if (marker.get("sha256") == digest and marker.get("selection") == selection
            and isinstance(marker.get("files"), list)):
        paths = [dest / f for f in marker["files"]]
        if all(p.is_file() for p in paths):
            return paths
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise ArchiveError(f"{archive}: not a zip archive ({' '.join(str(exc).split())})") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zf:
        infos = zf.infolist()
        plan = _check_members(archive, infos, max_total_bytes, max_members, max_ratio, wanted)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".extract"))
        try:
            files = _extract_into(archive, zf, plan, tmp, max_total_bytes)
            (tmp / MARKER).write_text(json.dumps({"archive": str(archive), "sha256": digest,
                                                  "selection": selection, "files": files,
                                                  "members": _file_members(infos)},
                                                 indent=1) + "\n", encoding="utf-8")
            _swap_into_place(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return [dest / f for f in files]


def _swap_into_place(new: Path, dest: Path) -> None:
    """Rename ``new`` to ``dest``; an existing ``dest`` is moved aside first and removed after."""
    if not dest.exists() and not dest.is_symlink():
        os.replace(new, dest)
        return
    old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".old"))
    aside = old / "previous"
    os.replace(dest, aside)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(aside, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def find_member(root: Path, basename: str) -> Path:
    """The unique file named ``basename`` anywhere under ``root`` (``__MACOSX`` ignored).

    When it is missing the message lists the archive's members (from the extraction marker, so
    members that were not extracted are listed too).
    """
    root = Path(root)
    found: list[Path] = []
    members: list[str] = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or rel.parts[0] in (*_IGNORED_TOP, MARKER):
            continue
        members.append(rel.as_posix())
        if path.name == basename:
            found.append(path)
    if len(found) == 1:
        return found[0]
    if not found:
        listed = read_json_object(root / MARKER).get("members")
        if isinstance(listed, list):
            members = [str(m) for m in listed if str(m).split("/")[0] not in _IGNORED_TOP]
        shown = ", ".join(members[:12]) + (f", ... ({len(members)} in all)" if len(members) > 12 else "")
        raise ArchiveError(f"{root}: no {basename} found (members: {shown or 'none'})")
    raise ArchiveError(f"{root}: {len(found)} files named {basename} "
                       f"({', '.join(p.relative_to(root).as_posix() for p in found)}); expected one")


__all__ = ["safe_extract", "find_member", "MARKER"]
