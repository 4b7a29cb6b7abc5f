"""The results table: tidy long format, one row per measured value, written cell by cell.

Every finished grid cell writes its rows to ``<study_dir>/cells/<cell id>.parquet`` through a
temporary file and ``os.replace`` (atomic on POSIX), so a run killed at any point (SIGKILL)
leaves only whole cell files: the table is their union, a rerun skips cells whose file exists,
and no row is ever written twice. ``results.parquet`` / ``results.csv`` are the union, rewritten
(atomically) at the end of each run for convenience.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mapex_analysis.files import atomic_write, remove_orphaned_temp_files

__all__ = [
    "COLUMNS",
    "cell_file_problem",
    "cell_path",
    "finished_cells",
    "read_results",
    "write_cell",
    "write_table",
]

logger = logging.getLogger(__name__)

#: Column -> pandas dtype of the results table. ``variant`` is the full operator chain
#: (``base``, ``prune[sar]``, ``slim[0.25,attn+mlp,first]``, ``prune[sar]+slim[0.5,...]``);
#: ``modalities`` the fed modalities joined by ``+``; ``protocol`` is ``cost`` for MACs,
#: parameters and latency, ``features`` for redundancy, ``routing`` for specialisation;
#: ``subject`` names what a row is about (a modality for attribution and specialisation),
#: ``expert_group`` the modality owning a routed expert, ``layer`` / ``expert`` / ``batch_size`` are -1 where they do not apply.
#: ``device`` is the hardware a row was computed on (``cpu (x86_64)``, ``cuda:0
#: (NVIDIA H200)``), ``precision`` the feature-extraction precision of eval rows.
#: ``ci_low`` / ``ci_high`` bound the 95 % bootstrap interval over test scenes of a probe or
#: fine-tuning metric (NaN for rows without one).
COLUMNS: dict[str, str] = {
    "study": "string",
    "cell": "string",
    "model": "string",
    "source": "string",
    "role": "string",
    "router": "string",
    "variant": "string",
    "operator": "string",
    "prune": "string",
    "width": "float64",
    "mode": "string",
    "order": "string",
    "task": "string",
    "modalities": "string",
    "protocol": "string",
    "seed": "int64",
    "metric": "string",
    "value": "float64",
    "ci_low": "float64",
    "ci_high": "float64",
    "unit": "string",
    "subject": "string",
    "layer": "int64",
    "expert": "int64",
    "expert_group": "string",
    "batch_size": "int64",
    "device": "string",
    "precision": "string",
}

_DEFAULTS: dict[str, Any] = {"string": "", "float64": float("nan"), "int64": -1}
_SORT = ["model", "variant", "modalities", "task", "protocol", "seed", "metric", "subject",
         "layer", "expert", "batch_size"]  # fmt: skip


def _frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    records = []
    for row in rows:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise KeyError(f"unknown result columns {sorted(unknown)}; valid: {list(COLUMNS)}")
        rec = {}
        for col, dtype in COLUMNS.items():
            v = row.get(col)
            rec[col] = _DEFAULTS[dtype] if v is None else v
        records.append(rec)
    df = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    return df.astype(COLUMNS)  # type: ignore[arg-type]


def _atomic_write(df: pd.DataFrame, path: Path, fmt: str) -> None:
    with atomic_write(path) as tmp:
        if fmt == "parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)


def cell_path(study_dir: str | Path, cell_id: str) -> Path:
    """Where a cell's rows live: ``<study_dir>/cells/<cell_id>.parquet``."""
    return Path(study_dir) / "cells" / f"{cell_id}.parquet"


def cell_file_problem(path: Path) -> str | None:
    """Why a cell file is unreadable (``None`` when it is a whole Parquet file).

    A file written by :func:`write_cell` is always whole (atomic rename), but one copied
    partially onto a shared filesystem or cut by a full disk is not: its Parquet footer is
    missing or its metadata does not parse.
    """
    try:
        size = path.stat().st_size
        if size < 12:
            return f"{size} bytes, too short for a Parquet file"
        with open(path, "rb") as fh:
            head = fh.read(4)
            fh.seek(-4, os.SEEK_END)
            tail = fh.read(4)
        if head != b"PAR1" or tail != b"PAR1":
            return "no Parquet magic bytes at its start or end (truncated or partial copy)"
        pq.read_metadata(path)
    except Exception as err:  # any unreadable file is a problem to report, not to raise
        return f"{type(err).__name__}: {err}"
    return None


def _cell_files(folder: Path, remove: bool = True) -> list[Path]:
    """Whole cell files of ``folder``; unreadable ones are named in a warning and (``remove``)
    deleted, so a resumed run recomputes them (their rows were never complete)."""
    out = []
    for p in sorted(folder.glob("*.parquet")):
        if p.name.startswith("."):
            continue
        problem = cell_file_problem(p)
        if problem is not None:
            what = "removed, the cell will be recomputed" if remove else "skipped"
            logger.warning("corrupt cell file %s (%s): %s", p, problem, what)
            if remove:
                p.unlink(missing_ok=True)
            continue
        out.append(p)
    return out


def finished_cells(study_dir: str | Path) -> set[str]:
    """Ids of the cells whose results file exists and is whole (temporary files are ignored;
    corrupt files are removed with a warning naming them)."""
    folder = Path(study_dir) / "cells"
    if not folder.is_dir():
        return set()
    return {p.stem for p in _cell_files(folder)}


def remove_partial_files(study_dir: str | Path) -> list[Path]:
    """Delete the temporary cell files that killed writers left in ``cells/`` (a partial file
    never counts as a result; files of writers still running are kept).

    Args:
        study_dir: The study's output folder.

    Returns:
        The removed files.
    """
    removed = remove_orphaned_temp_files(Path(study_dir) / "cells")
    if removed:
        logger.warning("removed %d partial cell files left by killed writers", len(removed))
    return removed


def write_cell(study_dir: str | Path, cell_id: str, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write one finished cell's rows atomically.

    Args:
        study_dir: The study's output folder.
        cell_id: The cell's id (file stem).
        rows: Result rows (keys from :data:`COLUMNS`; missing keys take their defaults).

    Returns:
        The written file.

    Raises:
        KeyError: for a row with a column not in :data:`COLUMNS`.
    """
    df = _frame(rows)
    df["cell"] = cell_id
    path = cell_path(study_dir, cell_id)
    _atomic_write(df, path, "parquet")
    logger.debug("cell %s: %d rows -> %s", cell_id, len(df), path)
    return path


def read_results(study_dir: str | Path) -> pd.DataFrame:
    """The results table of a study: the union of its cell files, sorted.

    Args:
        study_dir: The study's output folder (with ``cells/``), or a folder holding only a
            ``results.parquet``.

    Returns:
        A DataFrame with the :data:`COLUMNS` (empty if nothing finished yet).

    Raises:
        FileNotFoundError: if the folder has neither cell files nor ``results.parquet``.
    """
    folder = Path(study_dir)
    # a corrupt file is skipped with a warning here (the next run removes and recomputes it)
    files = _cell_files(folder / "cells", remove=False) if (folder / "cells").is_dir() else []
    if files:
        try:  # one Arrow table, converted once (about twice as fast as a frame per file)
            tables = [pq.read_table(f) for f in files]
            df = pa.concat_tables(tables, promote_options="default").to_pandas()
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # cell files whose column types differ
            df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    elif (folder / "results.parquet").is_file():
        df = pd.read_parquet(folder / "results.parquet")
    elif folder.is_dir():
        return _frame([])
    else:
        raise FileNotFoundError(f"no study results in {str(folder)!r} (expected cells/*.parquet)")
    df = df.astype(COLUMNS)  # type: ignore[arg-type]
    return df.sort_values(_SORT, kind="stable").reset_index(drop=True)


def write_table(study_dir: str | Path) -> pd.DataFrame:
    """Rewrite ``results.parquet`` and ``results.csv`` as the union of the cell files.

    Args:
        study_dir: The study's output folder.

    Returns:
        The table.
    """
    df = read_results(study_dir)
    folder = Path(study_dir)
    _atomic_write(df, folder / "results.parquet", "parquet")
    _atomic_write(df, folder / "results.csv", "csv")
    return df
