"""benchmarks/seed_ensemble_fer4.py: test-time shifts and averaging the seeds of one recipe."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score

from fer_core.config import TrainConfig
from fer_core.data import save_dataset
from fer_core.models import create_model
from fer_core.training import predict_proba
from tests.helpers import CLASSES, bar_dataset

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
_spec = importlib.util.spec_from_file_location("seed_ensemble_fer4", BENCH / "seed_ensemble_fer4.py")
seeds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seeds)


def test_shift_moves_the_image_and_replicates_the_border():
    x = torch.arange(2 * 6 * 5, dtype=torch.float32).view(2, 1, 6, 5)
    out = seeds.shifted(x, 2, -1)
    for i in range(6):
        for j in range(5):  # pixel (i, j) shows what was at (i - 2, j + 1), clipped to the image
            src = x[:, :, min(max(i - 2, 0), 5), min(max(j + 1, 0), 4)]
            assert torch.equal(out[:, :, i, j], src)
    assert torch.equal(seeds.shifted(x, 0, 0), x)


def test_flip_view_is_what_the_project_scores_and_shift_views_average_more():
    torch.manual_seed(0)
    model = create_model("main").eval()
    x = torch.randn(6, 1, 48, 48)
    assert np.allclose(seeds.view_probs(model, x, seeds.VIEWS["flip"]), predict_proba(model, x), atol=1e-6)
    one = seeds.view_probs(model, x, [(2, -2)])
    assert np.allclose(one, predict_proba(model, seeds.shifted(x, 2, -2)), atol=1e-6)
    nine = seeds.view_probs(model, x, seeds.VIEWS["shift9"])
    want = np.mean([predict_proba(model, seeds.shifted(x, dy, dx)) for dy, dx in seeds.VIEWS["shift9"]], 0)
    assert np.allclose(nine, want, atol=1e-6)


def _frame(seed: int, view: str, y: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame({"view": view, "fold": np.arange(len(y)) % 2, "seed": seed,
                          "image_id": [f"img{i}" for i in range(len(y))], "y_true": y})
    for j, c in enumerate(CLASSES):
        frame[f"p_{c}"] = probs[:, j]
    return frame


def test_seed_ensemble_averages_each_images_probabilities():
    rng = np.random.default_rng(0)
    n = 60
    y = rng.choice(CLASSES, n)
    probs = {(s, v): rng.dirichlet(np.ones(4), n) for s in (3, 7) for v in seeds.VIEWS}
    preds = pd.concat([_frame(s, v, y, p) for (s, v), p in probs.items()], ignore_index=True)
    lines = seeds.ensemble_table(preds.sample(frac=1, random_state=0), [3, 7], list(CLASSES))
    assert len(lines) == 3 * len(seeds.VIEWS)  # seed3, seed7 and both averaged, per view
    folds = np.arange(n) % 2

    def mean_f1(p):
        pred = np.asarray(CLASSES)[p.argmax(1)]
        return np.mean([f1_score(y[folds == f], pred[folds == f], average="macro") for f in (0, 1)])

    both = next(line for line in lines if line.startswith("shift5") and "2 seeds averaged" in line)
    assert f"mean {mean_f1(probs[3, 'shift5'] + probs[7, 'shift5']):.4f}" in both
    first = next(line for line in lines if line.startswith("flip") and "seed3 " in line)
    assert f"mean {mean_f1(probs[3, 'flip']):.4f}" in first and "(the reference)" in first


def test_end_to_end_on_a_tiny_dataset_and_refuses_another_recipes_predictions(tmp_path, monkeypatch, capsys):
    data = save_dataset(bar_dataset(80), tmp_path / "bars")
    out = tmp_path / "out"
    args = ["seed_ensemble_fer4.py", "--data", str(data), "--k", "2", "--seeds", "0", "1", "--out", str(out),
            "epochs=1", "batch_size=16"]
    monkeypatch.setattr(sys, "argv", args)
    seeds.main()
    printed = capsys.readouterr().out
    assert "2 seeds averaged" in printed
    preds = pd.read_parquet(out / "seed1.parquet")
    # every image of the 80 is tested once per view, in one fold
    assert preds.groupby("view")["image_id"].agg(lambda s: s.is_unique and len(s) == 80).all()
    assert set(preds["view"]) == set(seeds.VIEWS) and set(preds["seed"]) == {1}
    assert set(preds["recipe"]) == {seeds.recipe_hash(TrainConfig(epochs=1, batch_size=16))}
    monkeypatch.setattr(sys, "argv", args[:-1] + ["batch_size=32"])
    with pytest.raises(SystemExit, match="seed0.parquet holds another recipe"):
        seeds.main()
