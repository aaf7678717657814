"""Get the face-mesh model that ``landmark_weight`` > 0 needs, or check the one there is.

Usage::

    python -m study.landmarks fetch            # into ~/.cache/fer-bias-study/ (or $FER_MESH_MODEL)
    python -m study.landmarks fetch --dest models/face_landmark.tflite
    python -m study.landmarks check            # the file is there and is the one this tool was measured with

``fetch`` runs ``pip download mediapipe==0.10.14`` (one 36 MB wheel, no dependencies) into a temporary
folder, keeps only ``face_landmark.tflite`` (1.2 MB, Apache-2.0) and checks its sha256. On a Ray cluster
every node that runs trials needs the file at the same path (``$FER_MESH_MODEL``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fer_core.landmarks import ENV_VAR, MESH_WHEEL, check_mesh_model, fetch_mesh_model, mesh_model_path
from study.common import run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line interface of ``python -m study.landmarks``."""
    parser = argparse.ArgumentParser(prog="python -m study.landmarks", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("action", choices=("fetch", "check"))
    parser.add_argument("--dest", type=Path,
                        help=f"the model file (default: ${ENV_VAR}, else {mesh_model_path()})")
    parser.add_argument("--force", action="store_true", help="fetch again even if the file is there")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Fetch or check the face-mesh model file."""
    args = parse_args(argv)
    if args.action == "fetch":
        try:
            path = fetch_mesh_model(args.dest, force=args.force)
        except RuntimeError as err:  # pip could not download the wheel: its own message says why
            raise SystemExit(f"python -m study.landmarks: error: {err}") from None
        print(f"{path}: face-mesh model from {MESH_WHEEL}, sha256 checked")
    else:
        path = check_mesh_model(args.dest)
        print(f"{path}: the face-mesh model this tool expects")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "python -m study.landmarks"))
