import numpy as np
import pandas as pd
import pytest
import torch

import fer_core.crossval as crossval
from fer_core.checkpoint import load_model, save_model
from fer_core.config import SplitConfig, TrainConfig, to_dict
from fer_core.data import image_id
from tests.helpers import bar_dataset


def test_test_fold_never_reaches_training_or_validation(monkeypatch):
    ds = bar_dataset(60)
    seen = []
    real_fit = crossval.fit

    def spy(cfg, train_px, train_y, val_px, val_y, *args, **kwargs):
        seen.append(({image_id(p) for p in train_px}, {image_id(p) for p in val_px}))
        return real_fit(cfg, train_px, train_y, val_px, val_y, *args, **kwargs)

    monkeypatch.setattr(crossval, "fit", spy)
    folds, preds, _ = crossval.run_kfold(TrainConfig(epochs=1, batch_size=16), SplitConfig(k=3), ds)
    assert len(seen) == 3
    for fold, (train_ids, val_ids) in enumerate(seen):
        test_ids = set(preds.loc[preds["fold"] == fold, "image_id"])
        assert not test_ids & train_ids
        assert not test_ids & val_ids
        assert not train_ids & val_ids
    # every image is tested exactly once
    assert sorted(preds["image_id"]) == sorted(ds.manifest["image_id"])


def test_fold_metrics_match_predictions():
    ds = bar_dataset(60)
    folds, preds, _ = crossval.run_kfold(TrainConfig(epochs=1, batch_size=16), SplitConfig(k=3), ds)
    for fold, grp in preds.groupby("fold"):
        acc = (grp["y_true"] == grp["y_pred"]).mean()
        assert folds.loc[folds["fold"] == fold, "accuracy"].item() == acc
        probs = grp[[f"p_{c}" for c in ds.classes]].to_numpy()
        assert np.allclose(probs.sum(1), 1, atol=1e-4)
        conf = np.array(folds.loc[folds["fold"] == fold, "confusion"].item()).reshape(4, 4)
        assert conf.sum() == len(grp)
        assert np.trace(conf) == (grp["y_true"] == grp["y_pred"]).sum()
    assert {"gender", "age", "config_hash", "arch"} <= set(preds.columns)
    assert isinstance(preds, pd.DataFrame) and len(preds) == 60


def test_saved_model_round_trip_weights_only(tmp_path):
    ds = bar_dataset(40)
    _, _, runs = crossval.run_kfold(TrainConfig(epochs=1, batch_size=16), SplitConfig(k=2), ds)
    res = runs[0].result
    path = save_model(tmp_path / "m.pt", res.model, arch="main", classes=ds.classes, input_size=(48, 48),
                      mean=res.mean, std=res.std, config={"dropout": 0.3})
    raw = torch.load(path, weights_only=True)  # must not need pickled code
    assert raw["classes"] == list(ds.classes)
    saved = load_model(path)
    x = torch.randn(4, 1, 48, 48)
    assert torch.allclose(saved.model(x), res.model.eval()(x), atol=1e-5)
    assert saved.input_size == (48, 48) and saved.mean == res.mean


@pytest.mark.parametrize("shape", [{"width": 1.5}, {"stem_pool": False}])
def test_saved_model_keeps_its_width_and_stem_pooling(tmp_path, shape):
    ds = bar_dataset(40)
    cfg = TrainConfig(epochs=1, batch_size=16, **shape)
    _, _, runs = crossval.run_kfold(cfg, SplitConfig(k=2), ds)
    res = runs[0].result
    path = save_model(tmp_path / "m.pt", res.model, arch="main", classes=ds.classes, input_size=(48, 48),
                      mean=res.mean, std=res.std, config=to_dict(cfg))
    saved = load_model(path)
    x = torch.randn(4, 1, 48, 48)
    assert torch.allclose(saved.model(x), res.model.eval()(x), atol=1e-5)


def test_extra_rows_are_fitted_but_never_validated_or_tested(monkeypatch):
    ds = bar_dataset(80)
    train_idx, test_idx, extra_idx = np.arange(0, 50), np.arange(50, 65), np.arange(65, 80)
    seen = []
    real_fit = crossval.fit

    def spy(cfg, train_px, train_y, val_px, val_y, *args, **kwargs):
        seen.append(([image_id(p) for p in train_px], [image_id(p) for p in val_px]))
        return real_fit(cfg, train_px, train_y, val_px, val_y, *args, **kwargs)

    monkeypatch.setattr(crossval, "fit", spy)
    cfg = TrainConfig(epochs=1, batch_size=16, val_fraction=0.2)
    plain = crossval.train_on_split(cfg, ds, train_idx, test_idx, fold=1)
    more = crossval.train_on_split(cfg, ds, train_idx, test_idx, fold=1, extra_idx=extra_idx)
    (fit_plain, val_plain), (fit_more, val_more) = seen
    ids = ds.manifest["image_id"].to_numpy()
    assert val_more == val_plain and set(val_plain) <= set(ids[train_idx])  # same carve, from train rows
    assert fit_more == fit_plain + list(ids[extra_idx])  # the extras are added to what is fitted
    assert more.metrics["n_fit"] == plain.metrics["n_fit"] + len(extra_idx) == len(fit_more)
    assert list(more.predictions["image_id"]) == list(ids[test_idx])
