"""Result tables (CSV or Parquet, chosen by the file name): written atomically under the
output's write lock, Parquet with page checksums and optional key-value metadata."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import MoecacheError
from .files import atomic_write, first_line, output_lock, require_regular_file

TABLE_SUFFIXES = (".csv", ".parquet")


def write_table(frame: pd.DataFrame, path: str | os.PathLike, *, overwrite: bool = True,
                meta: dict[str, str] | None = None) -> Path:
    """Write ``frame`` to ``path`` through a temporary file and a rename.

    ``meta`` is stored as Parquet key-value metadata (read back by :func:`read_table_meta`);
    a CSV file has no room for it.
    """
    path = Path(path)
    if path.suffix not in TABLE_SUFFIXES:
        raise MoecacheError(f"{path}: results are written as .csv or .parquet")
    with output_lock(path):
        if path.is_dir():
            raise MoecacheError(f"{path}: is a folder, expected a results table path")
        if path.exists() and not overwrite:
            raise MoecacheError(f"{path}: already exists (pass --force to overwrite)")
        with atomic_write(path) as tmp:
            if path.suffix == ".csv":
                frame.to_csv(tmp, index=False)
            else:
                table = pa.Table.from_pandas(frame, preserve_index=False)
                table = table.replace_schema_metadata({**(table.schema.metadata or {}), **(meta or {})})
                pq.write_table(table, tmp, write_page_checksum=True)
    return path


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a results table written by :func:`write_table`."""
    path = _table_file(path)
    try:
        if path.suffix == ".csv":
            return pd.read_csv(path)
        return pq.read_table(path, page_checksum_verification=True).to_pandas()
    except Exception as err:  # pandas and pyarrow raise many types for malformed files
        raise MoecacheError(f"{path}: unreadable results table: {first_line(err)}") from None


def read_table_meta(path: str | os.PathLike) -> dict[str, str]:
    """The key-value metadata of a Parquet results table (empty for CSV)."""
    path = _table_file(path)
    if path.suffix == ".csv":
        return {}
    try:
        raw = pq.read_schema(path).metadata or {}
    except Exception as err:  # not Parquet, truncated
        raise MoecacheError(f"{path}: unreadable results table: {first_line(err)}") from None
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in raw.items()}


def _table_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix not in TABLE_SUFFIXES:
        raise MoecacheError(f"{path}: results tables are .csv or .parquet files")
    return require_regular_file(path, "results table (.parquet or .csv)")
