"""Shared plumbing of the entry points: logging, data selection, results folders and tables."""

from __future__ import annotations

import datetime as dt
import logging
import os
import shlex
import sys
from collections.abc import Callable
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

_BAD_DATA = "{0}: data must be a table [data] with path = ... or a path string, got {1!r}"
_UNKNOWN_DATA = "{0}: unknown [data] key(s) {1}; known: path, synthetic"


USER_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError)
TRACEBACK_ENV = "FER_TRACEBACK"


def run_cli(main: Callable[[], int], prog: str) -> int:
    """Run an entry point's ``main``: a bad key, value or file is one line on stderr and exit status 2.

    The library raises these errors with messages that name the key, value or file and say what to do; a
    traceback adds nothing for a user. ``FER_TRACEBACK=1`` in the environment shows it anyway.
    """
    try:
        return main()
    except USER_ERRORS as exc:
        if os.environ.get(TRACEBACK_ENV):
            raise
        # a KeyError's str() is the repr of its message: show the message itself
        message = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
        print(f"{prog}: error: {message}\n({type(exc).__name__}; set {TRACEBACK_ENV}=1 for the traceback)",
              file=sys.stderr)
        return 2


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


def data_settings(table: dict[str, Any], where: str) -> tuple[str | None, dict[str, Any]]:
    """The dataset path (``None`` if not given) and synthetic-generator keys of a config table.

    Reads an experiment file's ``[data]`` table (``path``, ``[data.synthetic]``), ``data = "PATH"`` as
    ``study.kfold`` records it, and a top-level ``[synthetic]`` table.
    """
    data = table.get("data", {})
    if isinstance(data, str):
        data = {"path": data}
    if not isinstance(data, dict):
        raise TypeError(_BAD_DATA.format(where, data))
    unknown = set(data) - {"path", "synthetic"}
    if unknown:
        raise KeyError(_UNKNOWN_DATA.format(where, sorted(unknown)))
    return data.get("path"), {**table.get("synthetic", {}), **data.get("synthetic", {})}


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
