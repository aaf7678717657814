"""Shared plumbing of the entry points: logging, data selection, results folders and tables."""

from __future__ import annotations

import datetime as dt
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fer_core import __version__
from fer_core.config import to_toml
from fer_core.data import FaceDataset, load_dataset

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
_NOT_DATA = ("{0}: not a canonical dataset folder (no manifest.parquet). Import it first with "
             "`python -m study.prepare {0} --out DIR`, or use --data synthetic")


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr: INFO by default, DEBUG with ``verbose``."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def load_data(spec: str, synthetic_overrides: dict[str, Any] | None = None) -> FaceDataset:
    """``"synthetic"`` (the built-in generator) or a canonical dataset folder, with extras kept."""
    if spec == SYNTHETIC:
        from fer_core.config import from_dict
        from fer_core.synthetic import SyntheticConfig, make_dataset

        cfg = from_dict(SyntheticConfig, synthetic_overrides or {}, "data.synthetic")
        return make_dataset(cfg)
    path = Path(spec)
    if path.is_dir() and not (path / "manifest.parquet").is_file():
        raise FileNotFoundError(_NOT_DATA.format(path))
    return load_dataset(path)


def make_run_dir(base: str | os.PathLike, name: str, stamp: bool = True) -> Path:
    """``base/name`` (with a timestamp suffix when ``stamp``), created."""
    if stamp:
        name = f"{name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    out = Path(base) / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def record_run(out: Path, config: dict[str, Any], argv: list[str] | None) -> None:
    """Write the resolved config (``config.toml``) and the command line (``command.txt``)."""
    (out / "config.toml").write_text(to_toml(config))
    # the process's own command line; when called as a function, the arguments it was given
    cmd = shlex.join(sys.orig_argv) if argv is None else f"main({argv!r})"
    (out / "command.txt").write_text(f"{cmd}\n# fer-bias-study {__version__}, {dt.datetime.now():%F %T}\n")


def write_table(frame: pd.DataFrame, path: str | os.PathLike, **meta: str) -> Path:
    """Write ``frame`` as Parquet atomically, with the package version and ``meta`` in the schema."""
    path = Path(path)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    extra = {b"fer_bias_study_version": __version__.encode()}
    extra.update({k.encode(): str(v).encode() for k, v in meta.items()})
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path
