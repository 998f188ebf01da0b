"""Parsing of every MovieLens layout and of user csv/parquet files into the canonical frames."""

from __future__ import annotations

import zipfile
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest

from flexmf_assets.datasets.catalog import ARCHIVE_FORMATS, DatasetSpec, builtin_catalog
from flexmf_assets.datasets.parsing import (
    ITEMS_SCHEMA,
    RATINGS_SCHEMA,
    load_dataset,
    parse_items_file,
    parse_plain,
    parse_ratings_file,
)
from flexmf_assets.errors import ParseError

ROWS = [(1, 10, 4.0, 978300760), (1, 20, 3.5, 978300761), (2, 10, 1.0, 978300762)]


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def _lines(sep: str, rows=ROWS) -> str:
    return "".join(sep.join(str(v if not isinstance(v, float) else v) for v in r) + "\n" for r in rows)


def _assert_canonical(df: pl.DataFrame, rows=ROWS) -> None:
    assert dict(df.schema) == RATINGS_SCHEMA
    assert df.rows() == [tuple(r) for r in rows]


# --------------------------------------------------------------------------- formats


def test_ml100k_tab_separated(tmp_path):
    rows = [(196, 242, 3.0, 881250949), (186, 302, 3.0, 891717742)]
    path = _write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    _assert_canonical(parse_ratings_file(path, ARCHIVE_FORMATS["ml-100k"]), rows)


def test_ml1m_and_ml10m_double_colon(tmp_path):
    path = _write(tmp_path / "ratings.dat", _lines("::"))
    _assert_canonical(parse_ratings_file(path, ARCHIVE_FORMATS["ml-1m"]))
    _assert_canonical(parse_ratings_file(path, ARCHIVE_FORMATS["ml-10m"]))


def test_csv_with_header_crlf_and_trailing_blank_lines(tmp_path):
    text = "userId,movieId,rating,timestamp\r\n" + _lines(",").replace("\n", "\r\n") + "\n\n"
    path = _write(tmp_path / "ratings.csv", text)
    _assert_canonical(parse_ratings_file(path, ARCHIVE_FORMATS["ml-latest-small"]))


def test_empty_csv_gives_empty_canonical_frame(tmp_path):
    path = _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n")
    df = parse_ratings_file(path, ARCHIVE_FORMATS["ml-25m"])
    assert df.height == 0 and dict(df.schema) == RATINGS_SCHEMA


def test_items_csv_quoted_titles(tmp_path):
    path = _write(tmp_path / "movies.csv", 'movieId,title,genres\n1,Toy Story (1995),Animation|Comedy\n'
                  '11,"American President, The (1995)",Comedy|Drama|Romance\n')
    df = parse_items_file(path, ARCHIVE_FORMATS["ml-latest-small"])
    assert dict(df.schema) == ITEMS_SCHEMA
    assert df.rows() == [(1, "Toy Story (1995)", "Animation|Comedy"),
                         (11, "American President, The (1995)", "Comedy|Drama|Romance")]


def test_items_ml1m_latin1(tmp_path):
    path = _write(tmp_path / "movies.dat", "1::Toy Story (1995)::Animation|Children's\n"
                  "73::Mis\xe9rables, Les (1995)::Drama|Musical\n".encode("latin-1"))
    df = parse_items_file(path, ARCHIVE_FORMATS["ml-1m"])
    assert df.rows() == [(1, "Toy Story (1995)", "Animation|Children's"),
                         (73, "Misérables, Les (1995)", "Drama|Musical")]


def test_items_ml100k_genre_flags(tmp_path):
    flags = ["0"] * 19
    flags[3] = flags[4] = flags[5] = "1"  # Animation, Children's, Comedy
    line = "1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy|" + "|".join(flags)
    path = _write(tmp_path / "u.item", (line + "\n").encode("latin-1"))
    df = parse_items_file(path, ARCHIVE_FORMATS["ml-100k"])
    assert df.rows() == [(1, "Toy Story (1995)", "Animation|Children's|Comedy")]


# --------------------------------------------------------------------------- malformed rows


@pytest.mark.parametrize(
    ("layout", "file", "text", "expected"),
    [
        ("ml-latest-small", "ratings.csv",
         "userId,movieId,rating,timestamp\n1,2,3.5,4\n1,3,abc,5\n", "ratings.csv line 3: rating 'abc' is not a number"),
        ("ml-latest-small", "ratings.csv",
         "userId,movieId,rating,timestamp\n1,2,3.5,4\n1,3,4.0\n1,4,4,4\n", "ratings.csv line 3: expected 4 fields"),
        ("ml-latest-small", "ratings.csv",
         "userId,movieId,rating,timestamp\n1,2,3.5,4\n1,3,4.0,5,6\n", "ratings.csv line 3: expected 4 fields"),
        ("ml-latest-small", "ratings.csv",
         "userId,movieId,rating,timestamp\n1,2,3.5,4\n1,x7,4.0,5\n", "ratings.csv line 3: movieId 'x7' is not an integer"),
        ("ml-latest-small", "ratings.csv",
         "userId,movieId,rating,timestamp\n1,2,3.5,4\n\n1,3,4.0,5\n", "ratings.csv line 3: blank line"),
        ("ml-latest-small", "ratings.csv",
         "userId,movieId,rating,timestamp\n1,2,3.5,4\n1,3,4.0,\n", "ratings.csv line 3: timestamp is empty"),
        ("ml-latest-small", "ratings.csv",
         "user,movie,rating,timestamp\n1,2,3.5,4\n", "ratings.csv line 1: header"),
        ("ml-100k", "u.data", "1\t2\t3\t4\n1\t2.5\t3\t4\n", "u.data line 2: item_id '2.5' is not an integer"),
        ("ml-1m", "ratings.dat", "1::2::3::4\n1::2::3::4\n1::3::3\n", "ratings.dat line 3: expected 4 fields"),
        ("ml-1m", "ratings.dat", "1::2::3::4\n1:2::3::4::5\n", "ratings.dat line 2:"),
        ("ml-10m", "ratings.dat", "1::2::3::4\n1::2::3::17e\n", "ratings.dat line 2: timestamp '17e' is not an integer"),
    ],
)
def test_malformed_ratings_name_file_and_line(tmp_path, layout, file, text, expected):
    path = _write(tmp_path / file, text)
    with pytest.raises(ParseError) as info:
        parse_ratings_file(path, ARCHIVE_FORMATS[layout])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_bad_row_far_into_a_large_file(tmp_path):
    lines = ["userId,movieId,rating,timestamp"] + [f"{u},{u % 97},3.5,{u}" for u in range(1, 200_001)]
    lines[150_000] = "7,8,4.0,2021-01-01"
    path = _write(tmp_path / "ratings.csv", "\n".join(lines) + "\n")
    with pytest.raises(ParseError, match=r"^ratings.csv line 150001: timestamp '2021-01-01' is not an integer$"):
        parse_ratings_file(path, ARCHIVE_FORMATS["ml-latest-small"])


def test_undecodable_bytes_name_the_line(tmp_path):
    path = _write(tmp_path / "ratings.csv", b"userId,movieId,rating,timestamp\n1,2,3.5,4\n1,2,3\xff5,4\n")
    with pytest.raises(ParseError, match=r"ratings.csv line 3: .*not valid UTF-8"):
        parse_ratings_file(path, ARCHIVE_FORMATS["ml-latest-small"])
    items = _write(tmp_path / "movies.csv", b"movieId,title,genres\n1,T\xe9st,Drama\n")
    with pytest.raises(ParseError, match=r"movies.csv line 2: .*not valid utf-8"):
        parse_items_file(items, ARCHIVE_FORMATS["ml-latest-small"])


def test_malformed_items(tmp_path):
    path = _write(tmp_path / "movies.dat", "1::A (1995)::Drama\nx::B (1996)::Comedy\n")
    with pytest.raises(ParseError, match=r"movies.dat line 2: item_id 'x' is not an integer"):
        parse_items_file(path, ARCHIVE_FORMATS["ml-10m"])
    path = _write(tmp_path / "movies.csv", "movieId,title,genres\n1,A,Drama\n2,B\n")
    with pytest.raises(ParseError, match=r"movies.csv line 3: expected 3 fields"):
        parse_items_file(path, ARCHIVE_FORMATS["ml-latest-small"])


def test_name_override_is_used_in_messages(tmp_path):
    path = _write(tmp_path / "u.data", "1\t2\t3\n")
    with pytest.raises(ParseError, match=r"^ml-100k/u.data line 1: expected 4 fields"):
        parse_ratings_file(path, ARCHIVE_FORMATS["ml-100k"], name="ml-100k/u.data")


# --------------------------------------------------------------------------- plain files


def _spec(fmt: str, **columns: str) -> DatasetSpec:
    return DatasetSpec(name="mine", format=fmt, url="file:///x", columns=columns)


def test_plain_csv_mapped_columns_any_order(tmp_path):
    path = _write(tmp_path / "r.csv", "ts,extra,item,who,stars\n978300760,a,10,1,4\n978300761,b,20,1,3.5\n"
                  "978300762,c,10,2,1\n")
    df = parse_plain(path, _spec("csv", user_id="who", item_id="item", rating="stars", timestamp="ts"))
    _assert_canonical(df)


def test_plain_csv_without_timestamp_and_custom_separator(tmp_path):
    path = _write(tmp_path / "r.csv", "u;i;r\n1;10;4\n2;20;2.5\n")
    spec = replace(_spec("csv", user_id="u", item_id="i", rating="r"), separator=";")
    df = parse_plain(path, spec)
    assert dict(df.schema) == RATINGS_SCHEMA
    assert df.rows() == [(1, 10, 4.0, None), (2, 20, 2.5, None)]


def test_plain_csv_missing_column_and_bad_id(tmp_path):
    path = _write(tmp_path / "r.csv", "u,i,r\n1,10,4\n1.5,20,2.5\n")
    with pytest.raises(ParseError, match=r"r.csv: column 'rating' \(for rating\) not found; columns present: u, i, r"):
        parse_plain(path, _spec("csv", user_id="u", item_id="i", rating="rating"))
    with pytest.raises(ParseError, match=r"^r.csv line 3: u '1.5' is not an integer$"):
        parse_plain(path, _spec("csv", user_id="u", item_id="i", rating="r"))


def test_plain_parquet(tmp_path):
    src = pl.DataFrame({"who": [1, 1, 2], "item": [10.0, 20.0, 10.0], "stars": [4.0, 3.5, 1.0],
                        "when": pl.from_epoch(pl.Series([978300760, 978300761, 978300762]), "s")})
    path = tmp_path / "r.parquet"
    src.write_parquet(path)
    df = parse_plain(path, _spec("parquet", user_id="who", item_id="item", rating="stars", timestamp="when"))
    _assert_canonical(df)
    bad = src.with_columns(pl.Series("item", [10.0, 20.5, 10.0]))
    bad.write_parquet(path)
    with pytest.raises(ParseError, match=r"r.parquet row 2: item 20.5 is not an integer"):
        parse_plain(path, _spec("parquet", user_id="who", item_id="item", rating="stars"))
    with pytest.raises(ParseError, match=r"column 'nope' \(for timestamp\) not found; columns present: who, item"):
        parse_plain(path, _spec("parquet", user_id="who", item_id="item", rating="stars", timestamp="nope"))


# --------------------------------------------------------------------------- whole datasets


def test_load_real_movielens_zip(movielens_archive, tmp_path):
    archive = movielens_archive  # ml-latest-small: 100,836 ratings, 610 users, 9,724 of 9,742 movies rated
    spec = builtin_catalog(env={})["ml-latest-small"]
    data = load_dataset(spec, archive.path, tmp_path)
    r = data.ratings
    assert dict(r.schema) == RATINGS_SCHEMA
    assert r.height == archive.ratings
    assert r["user_id"].n_unique() == archive.users
    assert r["item_id"].n_unique() == archive.rated_items
    assert r.null_count().sum_horizontal()[0] == 0
    assert r["rating"].min() == 0.5 and r["rating"].max() == 5.0
    assert data.items is not None and data.items.height == archive.movies
    assert data.items.filter(pl.col("item_id") == 1)["title"][0] == archive.title_1  # "Toy Story (1995)"


def test_load_ml1m_style_archive_names_member_in_errors(tmp_path):
    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", "1::10::4::978300760\n1::20::x::978300761\n")
        zf.writestr("ml-1m/movies.dat", "10::A::Drama\n".encode("latin-1"))
    spec = builtin_catalog(env={})["ml-1m"]
    with pytest.raises(ParseError, match=r"^ml-1m/ratings.dat line 2: rating 'x' is not a number$"):
        load_dataset(spec, archive, tmp_path / "work")


def test_load_plain_and_synthetic(tmp_path):
    path = _write(tmp_path / "r.csv", "u,i,r\n1,10,4\n")
    data = load_dataset(_spec("csv", user_id="u", item_id="i", rating="r"), path, tmp_path)
    assert data.items is None and data.ratings.rows() == [(1, 10, 4.0, None)]
    syn = load_dataset(builtin_catalog(env={})["synthetic-100k"], None, tmp_path)
    assert syn.ratings.height > 90_000 and dict(syn.ratings.schema) == RATINGS_SCHEMA


@pytest.mark.parametrize(("layout", "sep"), [("ml-latest-small", ","), ("ml-10m", "::")])
def test_error_pass_in_small_blocks_keeps_line_numbers(tmp_path, monkeypatch, layout, sep):
    import flexmf_assets.datasets.line_errors as line_errors

    monkeypatch.setattr(line_errors, "BLOCK_BYTES", 1000)  # many blocks, lines cut at block edges
    header = ["userId,movieId,rating,timestamp"] if sep == "," else []
    lines = header + [sep.join([str(u), str(u % 97), "3.5", str(u)]) for u in range(1, 5_001)]
    bad_index = 4_321
    lines[bad_index] = sep.join(["7", "8", "4..0", "9"])
    path = _write(tmp_path / ("ratings.csv" if sep == "," else "ratings.dat"), "\n".join(lines) + "\n")
    with pytest.raises(ParseError, match=rf"line {bad_index + 1}: rating '4..0' is not a number$"):
        parse_ratings_file(path, ARCHIVE_FORMATS[layout])


# --------------------------------------------------------------------------- issue 14: line endings,
# quoting, separators (each case failed or was misreported before)

H = "userId,movieId,rating,timestamp"
ML_ROWS = [(1, 10, 4.0, 965710039), (1, 20, 3.5, 965710040)]
PLAIN = {"user_id": "u", "item_id": "i", "rating": "r", "timestamp": "t"}


def _plain(separator: str = ",", has_header: bool = True, **columns: str) -> DatasetSpec:
    return DatasetSpec(name="mine", format="csv", url="file:///x", columns=columns or PLAIN,
                       separator=separator, has_header=has_header)


def _parse(kind, path: Path) -> pl.DataFrame:
    return parse_plain(path, kind) if isinstance(kind, DatasetSpec) else parse_ratings_file(path, ARCHIVE_FORMATS[kind])


PARSES = {
    # Windows line endings, including a doubled carriage return (csv.writer in text mode on Windows)
    "ratings.csv CRLF": ("ml-latest-small", f"{H}\r\n1,10,4.0,965710039\r\n1,20,3.5,965710040\r\n"),
    "ratings.csv CR CR LF": ("ml-latest-small", f"{H}\r\r\n1,10,4.0,965710039\r\r\n1,20,3.5,965710040\r\r\n"),
    "u.data CR CR LF": ("ml-100k", "1\t10\t4\t965710039\r\r\n1\t20\t3.5\t965710040\r\r\n"),
    "ratings.dat CRLF": ("ml-1m", "1::10::4::965710039\r\n1::20::3.5::965710040\r\n"),
    "plain CR CR LF": (_plain(), "u,i,r,t\r\r\n1,10,4.0,965710039\r\r\n1,20,3.5,965710040\r\r\n"),
    # quoted numbers (valid CSV), also with spaces after the separators
    "ratings.csv quoted": ("ml-latest-small", f'{H}\n"1","10","4.0","965710039"\n"1","20","3.5","965710040"\n'),
    "ratings.csv quoted, spaces": ("ml-latest-small", f'{H}\n"1", "10", "4.0", "965710039"\n1, 20, 3.5, 965710040\n'),
    "u.data quoted": ("ml-100k", '"1"\t"10"\t"4"\t"965710039"\n"1"\t"20"\t"3.5"\t"965710040"\n'),
    "plain quoted, spaces": (_plain(), '"u","i","r","t"\n"1", "10", "4.0", "965710039"\n 1 ,20,3.5,965710040\n'),
    # multi-character and multi-byte separators in a user csv
    "plain '::'": (_plain("::"), "u::i::r::t\r\n1::10::4.0::965710039\r\n1::20::3.5::965710040\r\n\r\n"),
    "plain '::' trailing blank lines": (_plain("::"), "u::i::r::t\n1::10::4.0::965710039\n1::20::3.5::965710040\n\n  \n"),
    "plain '::' no header": (_plain("::", False, user_id="column_0", item_id="column_1", rating="column_2",
                                    timestamp="column_3"), "1::10::4.0::965710039\n1::20::3.5::965710040\n"),
    "plain '¦' quoted": (_plain("¦"), 'u¦i¦r¦t\n"1"¦"10"¦"4.0"¦"965710039"\n1¦20¦3.5¦965710040\n'),
    "plain ' | ' extra column": (_plain(" | ", user_id="u", item_id="i", rating="r", timestamp="t"),
                                 "note | u | i | r | t\na, b | 1 | 10 | 4.0 | 965710039\n | 1 | 20 | 3.5 | 965710040\n"),
}


@pytest.mark.parametrize("case", list(PARSES))
def test_line_endings_quotes_and_separators_parse(tmp_path, case):
    kind, text = PARSES[case]
    path = _write(tmp_path / "ratings.csv", text)
    _assert_canonical(_parse(kind, path), ML_ROWS)


BAD = {
    # case: (kind, text, the whole message)
    "CR CR LF, bad value": ("ml-latest-small", f"{H}\r\r\n1,10,4.0,965710039\r\r\n1,20,x,965710040\r\r\n",
                            "ratings.csv line 3: rating 'x' is not a number"),
    "quoted, bad later row": ("ml-latest-small", f'{H}\n"1","10","4.0","1"\n"1","11","4.0","2"\n1,12,4..0,3\n',
                              "ratings.csv line 4: rating '4..0' is not a number"),
    "quoted, bad quoted value": ("ml-latest-small", f'{H}\n"1","10","4.0","1"\n"1","x11","4.0","2"\n',
                                 "ratings.csv line 3: movieId 'x11' is not an integer"),
    "control characters echoed escaped": ("ml-latest-small", f"{H}\n1,10,4\x1b[31m,1\r\n",
                                          "ratings.csv line 2: rating '4\\x1b[31m' is not a number"),
    "plain, extra field": (_plain(), "u,i,r,t\r\n1,10,4.0,1\r\n1,11,4.0,2,9\r\n",
                           None),  # polars' reason, but the line and the text
    "plain, CR CR LF, bad id": (_plain(), "u,i,r,t\r\r\n1,10,4.0,1\r\r\n1,1x,4.0,2\r\r\n",
                                "ratings.csv line 3: i '1x' is not an integer"),
    "plain '::', short row": (_plain("::"), "u::i::r::t\n1::10::4.0::1\n1::11::4.0\n",
                              "ratings.csv line 3: expected 4 fields separated by '::', found 3 in '1::11::4.0'"),
    "plain '::', blank inside": (_plain("::"), "u::i::r::t\n1::10::4.0::1\n\n1::11::4.0::2\n",
                                 "ratings.csv line 3: blank line inside the data"),
    "plain '::', missing column": (_plain("::", rating="stars", user_id="u", item_id="i"), "u::i::r\n1::2::3\n",
                                   "ratings.csv: column 'stars' (for rating) not found; columns present: u, i, r"),
    "old Mac line endings": ("ml-latest-small", f"{H}\r1,10,4.0,965710039\r",
                             "ratings.csv line 1: header 'userId,movieId,rating,timestamp\\r1,10,4.0,965710039' "
                             "is not 'userId,movieId,rating,timestamp'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_every_parse_error_names_its_line_and_is_printable(tmp_path, case):
    kind, text, expected = BAD[case]
    path = _write(tmp_path / "ratings.csv", text)
    with pytest.raises(ParseError) as info:
        _parse(kind, path)
    message = str(info.value)
    assert message.isprintable(), message  # no raw \r, \n or escape sequence reaches a terminal
    if expected is None:
        assert message.startswith("ratings.csv line 3: cannot be parsed (") and message.endswith(" in '1,11,4.0,2,9'")
    else:
        assert message == expected


@pytest.mark.parametrize("sep", [",", "::"])
def test_blank_line_at_a_block_edge_is_named(tmp_path, monkeypatch, sep):
    import flexmf_assets.datasets.line_errors as line_errors

    monkeypatch.setattr(line_errors, "BLOCK_BYTES", 1000)  # blocks cut between the blank line and the next row
    lines = [sep.join(["u", "i", "r", "t"])] + [sep.join([str(k), "1", "3.5", "1"]) for k in range(1, 400)]
    lines.insert(200, "")
    path = _write(tmp_path / "r.csv", "\n".join(lines) + "\n")
    with pytest.raises(ParseError, match=r"^r.csv line 201: blank line inside the data$"):
        parse_plain(path, _plain(sep))
    layout_lines = [H] + lines[1:]
    ratings = _write(tmp_path / "ratings.csv", "\n".join(layout_lines).replace("::", ",") + "\n")
    with pytest.raises(ParseError, match=r"^ratings.csv line 201: blank line inside the data$"):
        parse_ratings_file(ratings, ARCHIVE_FORMATS["ml-latest-small"])


def test_incomplete_column_mapping_names_every_missing_column(tmp_path):
    path = _write(tmp_path / "r.csv", "u,i,r\n1,10,4\n")
    for columns, missing in [({}, "'user_id', 'item_id', 'rating'"), ({"item_id": "i"}, "'user_id', 'rating'")]:
        spec = DatasetSpec(name="mine", format="csv", url="file:///x", columns=columns)
        with pytest.raises(ParseError) as info:
            parse_plain(path, spec)
        assert str(info.value) == f"r.csv: the column mapping (columns:) of dataset 'mine' lacks {missing}"


def test_load_writes_only_the_layout_members(tmp_path):
    archive = tmp_path / "ml-demo.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ml-demo/ratings.csv", f"{H}\n1,10,4.0,965710039\n1,20,3.5,965710040\n")
        zf.writestr("ml-demo/movies.csv", "movieId,title,genres\n10,A,Drama\n20,B,Comedy\n")
        for k in range(32):  # padding: 32 MiB of zeros, each member under the ratio check's floor
            zf.writestr(f"ml-demo/pad{k}.bin", bytes(2**20))
    spec = replace(builtin_catalog(env={})["ml-latest-small"], name="demo")
    data = load_dataset(spec, archive, tmp_path / "work")
    _assert_canonical(data.ratings, ML_ROWS)
    assert data.items is not None and data.items.height == 2
    written = sorted(p.name for p in (tmp_path / "work").rglob("*") if p.is_file())
    assert written == [".flexmf-extracted.json", "movies.csv", "ratings.csv"]
