"""Read partner data as it is: CSV (plain or gzip), Parquet, or a SQL query through SQLAlchemy.

Only the contract's columns are read (CSV ``usecols``, Parquet column projection, SQL column selection),
in chunks (CSV ``chunksize``, Parquet record batches, SQL ``fetchmany``), so memory is bounded by the
columns a contract needs, not by the file. CSV columns arrive as strings so that validation can report
the exact offending text; validation then converts each chunk to compact types.

Inputs are opened read-only and never modified; a SQL source must be a single SELECT/WITH query.
Malformed inputs raise ``DataValidationError`` (one clear message), never a parser traceback.
"""
from __future__ import annotations

import gzip
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd

from federation.errors import DataValidationError

PARQUET_SUFFIXES = (".parquet", ".pq")


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
            [f"file {loc!r} does not exist or is not a file; check the path (relative paths resolve against "
             "$FEDPROP_DATA_DIR, else <repo>/../shared/data)"], source=loc)
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
            [f"source.query must be one read-only SELECT (or WITH ... SELECT) statement, got {query[:80]!r}: "
             "fedprop never writes to a partner's database"], source="sql")
    return q


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def _unreadable(source: Source, exc: Exception) -> DataValidationError:
    kind = type(exc).__name__
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else kind
    if isinstance(exc, (UnicodeDecodeError,)):
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
    return DataValidationError([f"cannot read {source.format} input ({kind}: {text}); {hint}"], source=source.describe)
