"""Atomic writing of result tables (CSV or Parquet, chosen by the file name)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .errors import MoecacheError
from .files import atomic_target

TABLE_SUFFIXES = (".csv", ".parquet")


def write_table(frame: pd.DataFrame, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write ``frame`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    if path.suffix not in TABLE_SUFFIXES:
        raise MoecacheError(f"{path}: results are written as .csv or .parquet")
    if path.exists() and not overwrite:
        raise MoecacheError(f"{path}: already exists (pass --force to overwrite)")
    tmp = atomic_target(path)
    try:
        if path.suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a results table written by :func:`write_table`."""
    path = Path(path)
    if not path.exists():
        raise MoecacheError(f"{path}: no such file")
    if path.suffix not in TABLE_SUFFIXES:
        raise MoecacheError(f"{path}: results tables are .csv or .parquet files")
    try:
        return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    except Exception as err:  # pandas raises many types for malformed files
        raise MoecacheError(f"{path}: unreadable results table: {str(err).splitlines()[0]}") from None
