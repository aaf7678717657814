"""Fixtures shared by the test modules."""

from pathlib import Path

import pytest

import fer_core.landmarks as landmarks

FER4 = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer4"  # the real dataset, beside the repo


@pytest.fixture
def fer4_and_mesh():
    """Skip, saying which, unless fer4 is beside the repository and the face-mesh model is fetched."""
    if not (FER4 / "Data").is_dir():
        pytest.skip(f"{FER4}: absent (the realdata tests expect ../shared/data/fer4 beside the repository)")
    try:
        landmarks.check_mesh_model()
    except (FileNotFoundError, ValueError) as err:
        pytest.skip(f"no face-mesh model ({err})")
