"""safe_extract() / find_member(): zips crafted in tmp_path, every refusal, atomic replacement."""

from __future__ import annotations

import stat
import struct
import zipfile
from pathlib import Path

import pytest

from flexmf_assets.datasets.archive import MARKER, RATIO_FLOOR_BYTES, find_member, safe_extract
from flexmf_assets.errors import ArchiveError


def make_zip(path: Path, members: dict[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


GOOD = {"ml-demo/": b"", "ml-demo/ratings.csv": b"userId,movieId,rating\n1,2,3.5\n",
        "ml-demo/movies.csv": b"movieId,title\n2,Heat\n"}


def _single_line_error(call) -> str:
    with pytest.raises(ArchiveError) as err:
        call()
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def _only(tmp_path: Path, *names: str) -> list[str]:
    """Names directly under tmp_path, to show that no temp or partial folder is left behind."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in names)


def test_extracts_files_and_reuses_them(tmp_path):
    archive = make_zip(tmp_path / "a.zip", GOOD)
    dest = tmp_path / "out"
    files = safe_extract(archive, dest)
    assert files == [dest / "ml-demo" / "ratings.csv", dest / "ml-demo" / "movies.csv"]
    assert files[0].read_bytes() == GOOD["ml-demo/ratings.csv"]
    assert (dest / MARKER).is_file() and _only(tmp_path) == ["a.zip", "out"]
    sentinel = dest / "sentinel"
    sentinel.write_text("kept")
    assert safe_extract(archive, dest) == files  # same sha256: reused, not re-extracted
    assert sentinel.exists()


def test_changed_archive_replaces_dest(tmp_path):
    dest = tmp_path / "out"
    safe_extract(make_zip(tmp_path / "a.zip", GOOD), dest)
    (dest / "sentinel").write_text("stale")
    files = safe_extract(make_zip(tmp_path / "b.zip", {"x/ratings.csv": b"new"}), dest)
    assert files == [dest / "x" / "ratings.csv"] and files[0].read_bytes() == b"new"
    assert not (dest / "sentinel").exists() and not (dest / "ml-demo").exists()
    assert _only(tmp_path) == ["a.zip", "b.zip", "out"]


def test_not_a_zip(tmp_path):
    text = tmp_path / "notes.zip"
    text.write_text("userId,movieId\n1,2\n")
    empty = tmp_path / "empty.zip"
    empty.write_bytes(b"")
    full = make_zip(tmp_path / "full.zip", GOOD).read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(full[: len(full) // 2])
    for bad in (text, empty, truncated, tmp_path / "missing.zip"):
        msg = _single_line_error(lambda: safe_extract(bad, tmp_path / "out"))
        assert msg.startswith(f"{bad}: not a zip archive")
    assert not (tmp_path / "out").exists()


def test_corrupt_member_names_it_and_leaves_nothing(tmp_path):
    data = bytearray(make_zip(tmp_path / "a.zip", {"r.csv": b"1,2,3\n" * 5000}).read_bytes())
    data[60:70] = b"\xff" * 10  # inside the deflate stream of the only member
    (tmp_path / "a.zip").write_bytes(bytes(data))
    msg = _single_line_error(lambda: safe_extract(tmp_path / "a.zip", tmp_path / "out"))
    assert "member 'r.csv' is corrupt" in msg
    assert _only(tmp_path) == ["a.zip"]


@pytest.mark.parametrize("name, why", [
    ("/etc/evil.txt", "absolute path"), ("\\windows\\evil.txt", "absolute path"),
    ("C:/evil.txt", "absolute path"), ("c:evil.txt", "absolute path"),
    ("../evil.txt", "escapes"), ("ml/../../evil.txt", "escapes"), ("ml\\..\\..\\evil.txt", "escapes"),
])
def test_unsafe_member_names_are_refused(tmp_path, name, why):
    archive = make_zip(tmp_path / "a.zip", {"ok.csv": b"fine", name: b"pwned"})
    assert name in zipfile.ZipFile(archive).namelist()  # the name really is in the archive
    msg = _single_line_error(lambda: safe_extract(archive, tmp_path / "deep" / "out"))
    assert str(archive) in msg and repr(name) in msg and why in msg
    assert _only(tmp_path) == ["a.zip", "deep"] and list((tmp_path / "deep").iterdir()) == []


def test_symlink_member_is_refused(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        link = zipfile.ZipInfo("ml/ratings.csv")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    msg = _single_line_error(lambda: safe_extract(archive, tmp_path / "out"))
    assert "'ml/ratings.csv' is a symbolic link" in msg
    assert _only(tmp_path) == ["a.zip"]


def test_too_many_members(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {f"f{i}.csv": b"x" for i in range(6)})
    assert "6 members exceed the limit of 5" in _single_line_error(
        lambda: safe_extract(archive, tmp_path / "out", max_members=5))
    assert len(safe_extract(archive, tmp_path / "out", max_members=6)) == 6


def test_declared_total_over_limit(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {f"f{i}.csv": bytes(range(256)) * 4 for i in range(3)})
    msg = _single_line_error(lambda: safe_extract(archive, tmp_path / "out", max_total_bytes=2500))
    assert "member 'f2.csv' brings the declared uncompressed size to 3072 bytes" in msg
    assert _only(tmp_path) == ["a.zip"]


def test_compression_ratio_bomb(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        member = zipfile.ZipInfo("ml/ratings.csv")
        member.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(member, "w") as out:
            for _ in range(8):
                out.write(bytes(2**20))  # 8 MiB of zeros compress to a few KiB
    info = zipfile.ZipFile(archive).getinfo("ml/ratings.csv")
    assert info.file_size / info.compress_size > 200
    msg = _single_line_error(lambda: safe_extract(archive, tmp_path / "out"))
    assert "'ml/ratings.csv' compression ratio" in msg and "exceeds 200" in msg
    assert _only(tmp_path) == ["bomb.zip"]


def test_lying_header_cannot_write_more_than_declared(tmp_path):
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(zipfile.ZipInfo("big.bin"), bytes(4 * 2**20), compress_type=zipfile.ZIP_DEFLATED)
    data = bytearray(archive.read_bytes())
    # declare 1000 bytes in both the local header (offset 22) and the central directory (offset 24)
    struct.pack_into("<I", data, 22, 1000)
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 1000)
    archive.write_bytes(bytes(data))
    assert zipfile.ZipFile(archive).getinfo("big.bin").file_size == 1000
    msg = _single_line_error(lambda: safe_extract(archive, tmp_path / "out"))
    assert "member 'big.bin'" in msg
    assert _only(tmp_path) == ["liar.zip"]


def test_failed_extraction_keeps_previous_dest(tmp_path):
    dest = tmp_path / "out"
    files = safe_extract(make_zip(tmp_path / "good.zip", GOOD), dest)
    bad = make_zip(tmp_path / "bad.zip", {"ok.csv": b"x", "../evil": b"y"})
    _single_line_error(lambda: safe_extract(bad, dest))
    assert all(f.is_file() for f in files) and _only(tmp_path) == ["bad.zip", "good.zip", "out"]
    assert not (tmp_path / "evil").exists()


def test_find_member(tmp_path):
    dest = tmp_path / "out"
    safe_extract(make_zip(tmp_path / "a.zip", {**GOOD, "__MACOSX/ml-demo/ratings.csv": b"junk",
                                                "other/movies.csv": b"dup"}), dest)
    assert find_member(dest, "ratings.csv") == dest / "ml-demo" / "ratings.csv"
    msg = _single_line_error(lambda: find_member(dest, "u.data"))
    assert msg.startswith(f"{dest}: no u.data found (members: ") and "ml-demo/ratings.csv" in msg
    assert MARKER not in msg
    msg = _single_line_error(lambda: find_member(dest, "movies.csv"))
    assert "2 files named movies.csv" in msg and "other/movies.csv" in msg


# --------------------------------------------------------------------------- only the needed members

NEEDED = ("ratings.csv", "movies.csv")


def padded_zip(path: Path, n_padding: int, members: dict[str, bytes] | None = None) -> Path:
    """GOOD plus ``n_padding`` members of 1 MiB of zeros each (a few KiB zipped, under the ratio floor)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in {**GOOD, **(members or {})}.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
        for i in range(n_padding):
            zf.writestr(zipfile.ZipInfo(f"ml-demo/pad/{i:04d}.bin"), bytes(RATIO_FLOOR_BYTES),
                        compress_type=zipfile.ZIP_DEFLATED)
    return path


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_padding_members_are_not_written(tmp_path):
    archive = padded_zip(tmp_path / "a.zip", 64)
    assert archive.stat().st_size < 2**20  # 64 MiB of padding zipped to about 70 KiB
    dest = tmp_path / "out"
    files = safe_extract(archive, dest, members=NEEDED)
    assert files == [dest / "ml-demo" / "ratings.csv", dest / "ml-demo" / "movies.csv"]
    written = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert written == [MARKER, "ml-demo/movies.csv", "ml-demo/ratings.csv"]
    assert _disk_bytes(dest) < 64 * 1024
    # the padding was not even counted: a cap far below it still extracts the two files
    again = safe_extract(archive, tmp_path / "capped", members=NEEDED, max_total_bytes=2**20)
    assert [f.read_bytes() for f in again] == [GOOD["ml-demo/ratings.csv"], GOOD["ml-demo/movies.csv"]]
    assert _only(tmp_path) == ["a.zip", "capped", "out"]


def test_cap_applies_to_what_is_extracted(tmp_path):
    import random

    big = random.Random(3).randbytes(3 * 2**20)  # incompressible: no ratio refusal, only the cap
    archive = padded_zip(tmp_path / "a.zip", 2, {"ml-demo/ratings.csv": big})
    msg = _single_line_error(lambda: safe_extract(archive, tmp_path / "out", members=NEEDED,
                                                  max_total_bytes=2 * 2**20))
    assert "member 'ml-demo/ratings.csv' brings the declared uncompressed size to 3145728 bytes" in msg
    assert "over the limit of 2097152" in msg
    assert _only(tmp_path) == ["a.zip"]


def test_a_needed_name_twice_is_refused_before_writing(tmp_path):
    archive = padded_zip(tmp_path / "a.zip", 0, {"copy/ratings.csv": b"userId,movieId,rating\n",
                                                 "__MACOSX/ml-demo/ratings.csv": b"resource fork"})
    msg = _single_line_error(lambda: safe_extract(archive, tmp_path / "out", members=NEEDED))
    assert msg == (f"{archive}: 2 files named ratings.csv (ml-demo/ratings.csv, copy/ratings.csv); "
                   "expected one")
    assert _only(tmp_path) == ["a.zip"]


def test_members_not_extracted_are_still_checked_and_listed(tmp_path):
    evil = make_zip(tmp_path / "evil.zip", {**GOOD, "../evil.txt": b"pwned"})
    msg = _single_line_error(lambda: safe_extract(evil, tmp_path / "out", members=NEEDED))
    assert "member '../evil.txt' escapes the destination" in msg
    no_ratings = make_zip(tmp_path / "b.zip", {"ml-demo/movies.csv": b"x", "ml-demo/pad.bin": b"y"})
    dest = tmp_path / "out"
    assert safe_extract(no_ratings, dest, members=NEEDED) == [dest / "ml-demo" / "movies.csv"]
    msg = _single_line_error(lambda: find_member(dest, "ratings.csv"))
    assert msg == f"{dest}: no ratings.csv found (members: ml-demo/movies.csv, ml-demo/pad.bin)"
    # a different selection of the same archive is a new extraction, not a reuse
    assert len(safe_extract(no_ratings, dest)) == 2 and (dest / "ml-demo" / "pad.bin").is_file()
