"""Read partner data as it is: CSV (plain or gzip), Parquet, or a SQL query through SQLAlchemy.

Only the contract's columns are read (CSV ``usecols``, Parquet column projection, SQL column selection),
in chunks (CSV ``chunksize``, Parquet record batches, SQL ``fetchmany``), so memory is bounded by the
columns a contract needs, not by the file. CSV columns arrive as strings so that validation can report
the exact offending text; validation then converts each chunk to compact types.

Inputs are opened read-only and never modified; a SQL source must be a single SELECT/WITH query.
Malformed inputs raise ``DataValidationError`` (one clear message), never a parser traceback.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import lzma
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd

from federation.errors import DataValidationError, Problem

PARQUET_SUFFIXES = (".parquet", ".pq")
SEPARATORS = (",", ";", "\t", "|")
EXAMPLES = 3


def detect_format(path: str | os.PathLike, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    name = str(path).lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if re.match(r"^[a-z0-9+]+://", name):
        return "sql"
    return "csv"


@dataclass(frozen=True)
class Source:
    """One input: a file (csv/parquet) or a SQL query. ``describe`` names it in every message."""

    location: str  # a path, or a SQLAlchemy URL
    format: str  # csv | parquet | sql
    sep: str = ","
    encoding: str = "utf-8"
    chunksize: int = 200_000
    query: str = ""

    @property
    def describe(self) -> str:
        if self.format == "sql":
            return f"{_redact(self.location)} query {self.query.strip()[:60]!r}"
        return self.location

    def row_label(self, i: int) -> str:
        """How a user finds data row i (0-based) again: a CSV line number, else a row number."""
        return f"line {i + 2}" if self.format == "csv" else f"row {i}"

    def rows_text(self, rows: list[int], count: int) -> str:
        """'lines 5, 9, 14, ...' (CSV, 1-based with the header as line 1) or 'rows 3, 7' (0-based): positions only."""
        word = "line" if self.format == "csv" else "row"
        nums = [str(i + 2 if self.format == "csv" else i) for i in rows]
        return f"{word}{'s' if len(nums) > 1 else ''} {', '.join(nums)}{', ...' if count > len(nums) else ''}"

    # ---- CSV structure, checked before any value is parsed
    def _open_text(self):
        name = self.location.lower()
        opener = gzip.open if name.endswith(".gz") else bz2.open if name.endswith(".bz2") else \
            lzma.open if name.endswith((".xz", ".lzma")) else open
        return opener(self.location, "rt", encoding=self.encoding, newline="")

    def structure_problems(self, required: list[str], stats: dict | None = None) -> list[Problem]:
        """CSV only: a wrong separator (one error naming the right one) or records whose field count differs
        from the header's (an unquoted ``1,35.97`` shifts every later field of its row). Line numbers only.
        ``stats`` (optional) receives ``records``: the number of non-blank data records."""
        if self.format != "csv":
            return []
        try:
            with self._open_text() as fh:
                header_line = fh.readline()
                header = next(csv.reader([header_line], delimiter=self.sep), [])
                missing = [c for c in required if c not in header]
                if missing:
                    best = max(SEPARATORS, key=lambda s: sum(c in next(csv.reader([header_line], delimiter=s), [])
                                                             for c in required))
                    found = sum(c in next(csv.reader([header_line], delimiter=best), []) for c in required)
                    if best != self.sep and found > len(required) - len(missing):
                        return [Problem(
                            f"the file is separated by {best!r}, not {self.sep!r}: with {best!r} the header has "
                            f"{found} of the contract's {len(required)} columns; set source.sep: {best!r} in the "
                            "contract (or export with the contract's separator)", code="wrong_separator")]
                    return []  # genuinely absent columns: reported by column name
                width = len(header)
                over: list[int] = []
                under: list[int] = []
                n_over = n_under = 0
                reader = csv.reader(fh, delimiter=self.sep)
                last = 1
                records = 0
                for rec in reader:
                    n = len(rec)
                    records += n > 0
                    if n != width and n:  # blank lines are skipped, as pandas does
                        if n > width:
                            n_over += 1
                            if len(over) < EXAMPLES:
                                over.append(last + 1)
                        else:
                            n_under += 1
                            if len(under) < EXAMPLES:
                                under.append(last + 1)
                    last = reader.line_num + 1
                if stats is not None:
                    stats["records"] = records
        except DataValidationError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _unreadable(self, exc) from None
        out = []
        for count, lines, what in ((n_over, over, "more"), (n_under, under, "fewer")):
            if count:
                shown = f"line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))}{', ...' if count > len(lines) else ''}"
                out.append(Problem(
                    f"{count} line(s) have {what} fields than the header's {width} ({shown}); an unquoted "
                    f"separator inside a value (e.g. a decimal comma) or a truncated line shifts the columns: quote "
                    f"such values in the export or fix those lines", code="field_count", count=count))
        return out

    def arrow_types(self) -> dict[str, str]:
        """Parquet only: column -> Arrow type name (e.g. int64, timestamp[us], string)."""
        if self.format != "parquet":
            return {}
        import pyarrow.parquet as pq

        try:
            schema = pq.ParquetFile(self.location).schema_arrow
        except Exception as exc:  # noqa: BLE001
            raise _unreadable(self, exc) from None
        return {f.name: str(f.type) for f in schema}

    # ---- schema
    def columns(self) -> list[str]:
        try:
            if self.format == "csv":
                return [str(c) for c in pd.read_csv(self.location, sep=self.sep, encoding=self.encoding, nrows=0).columns]
            if self.format == "parquet":
                import pyarrow.parquet as pq

                return list(pq.ParquetFile(self.location).schema_arrow.names)
            with _engine(self.location).connect() as conn:
                return [str(k) for k in conn.exec_driver_sql(_check_query(self.query)).keys()]
        except DataValidationError:
            raise
        except Exception as exc:  # noqa: BLE001 - every reader failure becomes one clear report
            raise _unreadable(self, exc) from None

    # ---- data
    def chunks(self, usecols: list[str]) -> Iterator[pd.DataFrame]:
        """Chunks of exactly ``usecols`` (which must exist), in file order."""
        try:
            if self.format == "csv":
                reader = pd.read_csv(
                    self.location, sep=self.sep, encoding=self.encoding, usecols=usecols,
                    dtype={c: str for c in usecols}, chunksize=self.chunksize, keep_default_na=True,
                )
                with reader:
                    for chunk in reader:
                        yield chunk[usecols]
            elif self.format == "parquet":
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(self.location)
                for batch in pf.iter_batches(batch_size=self.chunksize, columns=usecols):
                    yield batch.to_pandas()[usecols]
            else:
                with _engine(self.location).connect() as conn:
                    result = conn.exec_driver_sql(_check_query(self.query))
                    keys = [str(k) for k in result.keys()]
                    idx = [keys.index(c) for c in usecols]
                    while rows := result.fetchmany(self.chunksize):
                        yield pd.DataFrame([[r[i] for i in idx] for r in rows], columns=usecols)
        except DataValidationError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _unreadable(self, exc) from None


def open_source(location: str | os.PathLike, *, format: str = "auto", sep: str = ",", encoding: str = "utf-8",
                chunksize: int = 200_000, query: str = "") -> Source:
    fmt = detect_format(location, format)
    loc = str(location)
    if fmt != "sql" and not Path(loc).is_file():
        raise DataValidationError(
            [Problem(f"file {loc!r} does not exist or is not a file; check the path (relative paths resolve "
                     "against $FEDPROP_DATA_DIR, else <repo>/../shared/data)", code="no_such_file")], source=loc)
    return Source(loc, fmt, sep=sep, encoding=encoding, chunksize=chunksize, query=query)


def read_frame(source: Source, usecols: list[str]) -> pd.DataFrame:
    """All chunks concatenated (convenience for small inputs and tests)."""
    parts = list(source.chunks(usecols))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=usecols)


def _engine(url: str):
    import sqlalchemy

    return sqlalchemy.create_engine(url)


def _check_query(query: str) -> str:
    q = query.strip().rstrip(";")
    if not re.match(r"(?is)^\s*(select|with)\b", q) or ";" in q:
        raise DataValidationError(
            [Problem(f"source.query must be one read-only SELECT (or WITH ... SELECT) statement, got {query[:80]!r}: "
                     "fedprop never writes to a partner's database", code="bad_query", column="source.query")],
            source="sql")
    return q


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def _unreadable(source: Source, exc: Exception) -> DataValidationError:
    kind = type(exc).__name__
    # the library's text, with anything it quotes removed (a quoted fragment may be a cell of the file)
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else kind
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'...'", text)
    if isinstance(exc, (UnicodeDecodeError,)):
        text = f"a byte at position {exc.start} is not valid {source.encoding}"
        hint = f"the file is not {source.encoding}-encoded text; set source.encoding in the contract"
    elif isinstance(exc, (gzip.BadGzipFile, zlib.error, EOFError)):
        hint = "the compressed file is corrupt or truncated; copy it again from the source system"
    elif source.format == "csv":
        hint = (f"the CSV could not be parsed with separator {source.sep!r}; check source.sep, quoting and that "
                "every line has the header's number of fields")
    elif source.format == "parquet":
        hint = "the Parquet file could not be read; it may be truncated or not Parquet at all"
    else:
        hint = "the SQL source could not be queried; check source.url and source.query"
    return DataValidationError([Problem(f"cannot read {source.format} input ({kind}: {text}); {hint}", code="unreadable")],
                               source=source.describe)
