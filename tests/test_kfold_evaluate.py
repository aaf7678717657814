"""study.kfold and study.evaluate end to end on tiny data."""

import dataclasses
import json
import tomllib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fer_core.data import save_dataset
from study import evaluate, kfold
from tests.helpers import bar_dataset


@pytest.fixture(scope="module")
def kfold_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kfold")
    data = save_dataset(bar_dataset(60), out / "data")
    assert kfold.main(["--data", str(data), "--arch", "main", "--out", str(out / "run"),
                       "k=3", "epochs=2", "batch_size=16"]) == 0
    return out


def test_kfold_writes_folds_predictions_models_and_config(kfold_run):
    run = kfold_run / "run"
    folds = pd.read_parquet(run / "folds.parquet")
    preds = pd.read_parquet(run / "predictions.parquet")
    assert list(folds["fold"]) == [0, 1, 2]
    assert {"accuracy", "macro_f1", "micro_f1", "macro_precision", "macro_recall", "f1_Happy",
            "confusion", "config_hash", "version"} <= set(folds.columns)
    assert len(preds) == 60 and preds["image_id"].is_unique
    assert sorted(p.name for p in (run / "models").iterdir()) == ["fold0.pt", "fold1.pt", "fold2.pt"]
    assert "epochs = 2" in (run / "config.toml").read_text()


def test_kfold_smoke_test_and_unknown_key(tmp_path, capsys):
    assert kfold.main(["--smoke-test", "--out", str(tmp_path / "s")]) == 0
    assert "2-fold cross-validation of main" in capsys.readouterr().out
    with pytest.raises(KeyError, match="learning_rate"):
        kfold.main(["--smoke-test", "--out", str(tmp_path / "t"), "learning_rate=0.1"])


def test_evaluate_on_canonical_folder_single_image_and_image_folder(kfold_run, tmp_path, capsys):
    model = str(kfold_run / "run" / "models" / "fold0.pt")
    out = str(tmp_path / "a")
    assert evaluate.main(["--model", model, "--data", str(kfold_run / "data"), "--out", out]) == 0
    assert "source_path" in capsys.readouterr().out  # the first predictions, as a table
    quiet = ["--model", model, "--data", str(kfold_run / "data"), "--out", out, "--show", "0"]
    assert evaluate.main(quiet) == 0
    printed = capsys.readouterr().out
    assert "source_path" not in printed and "Empty DataFrame" not in printed and "images predicted" in printed
    report = json.loads((tmp_path / "a" / "metrics.json").read_text())
    preds = pd.read_parquet(tmp_path / "a" / "predictions.parquet")
    assert report["metrics"]["accuracy"] == pytest.approx((preds["label"] == preds["y_pred"]).mean())

    ds = bar_dataset(8, seed=5)
    folder = tmp_path / "imgs"
    for i, (px, label) in enumerate(zip(ds.pixels, ds.manifest["label"], strict=True)):
        (folder / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(px).save(folder / label / f"{i}.png")
    (folder / "Happy" / "broken.png").write_bytes(b"not an image")
    assert evaluate.main(["--model", model, "--data", str(folder), "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert report["n_images"] == 8
    assert [s["path"].endswith("broken.png") for s in report["skipped"]] == [True]
    assert report["metrics"]["n_labelled"] == 8

    one = folder / "Happy" / next(p.name for p in (folder / "Happy").iterdir() if p.name != "broken.png")
    assert evaluate.main(["--model", model, "--data", str(one), "--out", str(tmp_path / "c")]) == 0
    assert len(pd.read_parquet(tmp_path / "c" / "predictions.parquet")) == 1


def test_evaluate_rejects_missing_data_and_non_model_files(kfold_run, tmp_path):
    model = str(kfold_run / "run" / "models" / "fold0.pt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        evaluate.main(["--model", model, "--data", str(tmp_path / "nope")])
    bad = tmp_path / "bad.pt"
    import torch

    torch.save({"weights": np.zeros(3)}, bad)  # a numpy array needs pickled code to load
    with pytest.raises(ValueError, match="bad.pt: refused to load"):
        evaluate.main(["--model", str(bad), "--data", str(kfold_run / "data")])
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="other.pt: not a fer-bias-study model file"):
        evaluate.main(["--model", str(other), "--data", str(kfold_run / "data")])


def test_kfold_reads_the_data_table_of_an_experiment_file_and_dotted_keys(kfold_run, tmp_path):
    config = tmp_path / "exp.toml"
    config.write_text(f'[data]\npath = "{kfold_run / "data"}"\n\n[train]\nepochs = 1\n\n'
                      '[search]\nnum_samples = 3\n')  # another command's table: ignored
    out = tmp_path / "run"
    assert kfold.main(["--config", str(config), "--out", str(out), "split.k=2", "train.batch_size=16"]) == 0
    preds = pd.read_parquet(out / "predictions.parquet")
    assert len(preds) == 60 and sorted(preds["fold"].unique()) == [0, 1]  # the bars, not synthetic faces
    recorded = tomllib.loads((out / "config.toml").read_text())
    assert recorded["data"]["path"] == str(kfold_run / "data")
    assert recorded["train"]["epochs"] == 1 and recorded["train"]["batch_size"] == 16


def test_kfold_names_where_a_bad_key_came_from(tmp_path):
    config = tmp_path / "exp.toml"
    config.write_text("[train]\nlrr = 0.1\n")
    with pytest.raises(KeyError, match=f"{config}: unknown config key 'lrr'"):
        kfold.main(["--config", str(config), "--smoke-test"])
    config.write_text("[train]\nlr = 0.1\n")
    with pytest.raises(KeyError, match="command line: 'lrr' is neither a training key .* nor a split key"):
        kfold.main(["--config", str(config), "--smoke-test", "lrr=1"])
    config.write_text("[trian]\nlr = 0.1\n")
    with pytest.raises(KeyError, match=r"unknown top-level key\(s\) \['trian'\]"):
        kfold.main(["--config", str(config), "--smoke-test"])


def test_evaluate_warns_about_labels_that_are_not_the_models_classes(kfold_run, tmp_path, caplog):
    model = str(kfold_run / "run" / "models" / "fold0.pt")
    ds = bar_dataset(12, seed=6)
    folder = tmp_path / "imgs"
    for i, (px, label) in enumerate(zip(ds.pixels, ds.manifest["label"], strict=True)):
        name = "Joyful.v2" if label == "Happy" else label  # one class under another name
        (folder / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(px).save(folder / name / f"{i}.png")
    n_joyful = int((ds.manifest["label"] == "Happy").sum())
    assert evaluate.main(["--model", model, "--data", str(folder), "--out", str(tmp_path / "a")]) == 0
    assert f"{n_joyful} images carry labels that are not the model's classes" in caplog.text
    assert "--class-map Joyful.v2=" in caplog.text
    report = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert report["n_images"] == 12 and report["metrics"]["n_labelled"] == 12 - n_joyful
    preds = pd.read_parquet(tmp_path / "a" / "predictions.parquet")
    known = preds[preds["label"].notna()]
    from sklearn.metrics import f1_score

    present = sorted(known["label"].unique())
    assert report["metrics"]["macro_f1_present"] == pytest.approx(
        f1_score(known["label"], known["y_pred"], labels=present, average="macro"))
    # renamed, every image is scored (a dot in a folder's name is no config key's separator)
    assert evaluate.main(["--model", model, "--data", str(folder), "--out", str(tmp_path / "b"),
                          "--class-map", "Joyful.v2=Happy"]) == 0
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["metrics"]["n_labelled"] == 12
    with pytest.raises(ValueError, match="--class-map Joyful.v2=Joy: 'Joy' is not one of the model's"):
        evaluate.main(["--model", model, "--data", str(folder), "--class-map", "Joyful.v2=Joy"])
    with pytest.raises(ValueError, match="--class-map 'Joyful.v2': expected FOLDER=CLASS"):
        evaluate.main(["--model", model, "--data", str(folder), "--class-map", "Joyful.v2"])


def test_evaluate_makes_non_square_images_square_as_fit_says(kfold_run, tmp_path, caplog):
    model = str(kfold_run / "run" / "models" / "fold0.pt")
    ds = bar_dataset(4, seed=7)
    side = ds.pixels.shape[1]
    square, wide = tmp_path / "square" / "Happy", tmp_path / "wide" / "Happy"
    square.mkdir(parents=True)
    wide.mkdir(parents=True)
    noise = np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
    for i, px in enumerate(ds.pixels):
        Image.fromarray(px).save(square / f"{i}.png")
        Image.fromarray(np.hstack([noise, px, noise])).save(wide / f"{i}.png")  # the face in the middle
    assert evaluate.main(["--model", model, "--data", str(square.parent), "--out", str(tmp_path / "a")]) == 0
    assert "not square" not in caplog.text
    assert evaluate.main(["--model", model, "--data", str(wide.parent), "--out", str(tmp_path / "b")]) == 0
    assert "4 of 4 images were not square; each was made square by --fit crop" in caplog.text
    a, b = (pd.read_parquet(tmp_path / d / "predictions.parquet") for d in "ab")
    probs = [c for c in a.columns if c.startswith("p_")]
    np.testing.assert_allclose(b[probs].to_numpy(), a[probs].to_numpy())  # the centre crop is the face
    assert set(b["original_size"]) == {f"{3 * side}x{side}"} and set(a["original_size"]) == {f"{side}x{side}"}
    assert evaluate.main(["--model", model, "--data", str(wide.parent), "--out", str(tmp_path / "c"),
                          "--fit", "stretch"]) == 0
    c = pd.read_parquet(tmp_path / "c" / "predictions.parquet")
    assert not np.allclose(c[probs].to_numpy(), a[probs].to_numpy())
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["fit"] == "stretch"


def test_evaluate_on_a_canonical_dataset_with_a_class_the_model_lacks(kfold_run, tmp_path, caplog):
    ds = bar_dataset(10, seed=7)
    ds.manifest.loc[:2, "label"] = "Angry"
    data = save_dataset(dataclasses.replace(ds, classes=(*ds.classes, "Angry")), tmp_path / "data")
    model = str(kfold_run / "run" / "models" / "fold0.pt")
    assert evaluate.main(["--model", model, "--data", str(data), "--out", str(tmp_path / "a")]) == 0
    assert "3 images carry labels that are not the model's classes" in caplog.text
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["metrics"]["n_labelled"] == 7


def test_evaluate_names_a_missing_or_non_model_file(kfold_run, tmp_path):
    data = str(kfold_run / "data")
    with pytest.raises(FileNotFoundError, match="nope.pt: no such model file"):
        evaluate.main(["--model", str(tmp_path / "nope.pt"), "--data", data])
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(ValueError, match="notes.pt: not a fer-bias-study model .*not a torch.save archive"):
        evaluate.main(["--model", str(tmp_path / "notes.pt"), "--data", data])


def test_kfold_names_a_class_too_small_for_k_before_writing_anything(tmp_path):
    data = save_dataset(bar_dataset(12, seed=8), tmp_path / "data")
    with pytest.raises(ValueError, match=r"class '\w+' has \d images, fewer than k=10 folds"):
        kfold.main(["--data", str(data), "--out", str(tmp_path / "run"), "k=10"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("input_norm", ["equalize", "image"])
def test_a_saved_model_scores_new_images_with_the_input_norm_it_was_trained_with(tmp_path, input_norm):
    data = save_dataset(bar_dataset(40), tmp_path / "data")
    run = tmp_path / "run"
    assert kfold.main(["--data", str(data), "--arch", "main", "--out", str(run), "k=2", "epochs=1",
                       "batch_size=16", f"input_norm={input_norm}"]) == 0
    assert tomllib.loads((run / "config.toml").read_text())["train"]["input_norm"] == input_norm
    assert evaluate.main(["--model", str(run / "models" / "fold0.pt"), "--data", str(data),
                          "--out", str(tmp_path / "ev"), "--show", "0"]) == 0
    tested = pd.read_parquet(run / "predictions.parquet").query("fold == 0").set_index("image_id")
    again = pd.read_parquet(tmp_path / "ev" / "predictions.parquet").set_index("image_id").loc[tested.index]
    probs = [f"p_{c}" for c in ("Focused", "Happy", "Neutral", "Surprised")]
    np.testing.assert_allclose(again[probs].to_numpy(), tested[probs].to_numpy(), atol=1e-5)


def test_evaluate_averages_the_probabilities_of_several_models(kfold_run, tmp_path, capsys):
    from fer_core.checkpoint import load_model, save_model

    models = [str(kfold_run / "run" / "models" / f"fold{f}.pt") for f in (0, 1)]
    data = ["--data", str(kfold_run / "data"), "--show", "0"]
    probs = [f"p_{c}" for c in ("Focused", "Happy", "Neutral", "Surprised")]
    alone = []
    for i, model in enumerate(models):
        assert evaluate.main(["--model", model, *data, "--out", str(tmp_path / str(i))]) == 0
        alone.append(pd.read_parquet(tmp_path / str(i) / "predictions.parquet")[probs].to_numpy())
    assert evaluate.main(["--model", *models, *data, "--out", str(tmp_path / "both")]) == 0
    assert "images predicted by the average of 2 models" in capsys.readouterr().out
    both = pd.read_parquet(tmp_path / "both" / "predictions.parquet")
    np.testing.assert_allclose(both[probs].to_numpy(), (alone[0] + alone[1]) / 2, atol=1e-6)
    classes = np.array([p.removeprefix("p_") for p in probs])
    assert (both["y_pred"].to_numpy() == classes[both[probs].to_numpy().argmax(1)]).all()
    assert json.loads((tmp_path / "both" / "metrics.json").read_text())["model"] == models

    other = load_model(models[1])  # the same weights, told its classes are others
    renamed = save_model(tmp_path / "renamed.pt", other.model, arch=other.arch, classes=("a", "b", "c", "d"),
                         input_size=other.input_size, mean=other.mean, std=other.std, config=other.config)
    with pytest.raises(ValueError, match="renamed.pt: its classes \\['a', 'b', 'c', 'd'\\] differ from "
                                         ".*fold0.pt"):
        evaluate.main(["--model", models[0], str(renamed), *data, "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_a_student_learns_from_the_teachers_fold_models_and_never_from_another_split(kfold_run, tmp_path,
                                                                                     monkeypatch):
    import fer_core.crossval as crossval
    from fer_core.config import TrainConfig
    from fer_core.data import image_id, load_dataset

    teacher, data = kfold_run / "run", kfold_run / "data"
    seen = []
    real_fit = crossval.fit

    def spy(cfg, train_px, *args, soft_targets=None, **kwargs):
        seen.append(([image_id(p) for p in train_px], soft_targets))
        return real_fit(cfg, train_px, *args, soft_targets=soft_targets, **kwargs)

    monkeypatch.setattr(crossval, "fit", spy)
    assert kfold.main(["--data", str(data), "--arch", "main", "--out", str(tmp_path / "student"), "k=3",
                       "epochs=1", "batch_size=16", f"teachers=['{teacher}']", "distill=0.7"]) == 0
    assert len(seen) == 3
    for fold, (fitted, soft) in enumerate(seen):  # the soft targets are the fold model's probabilities
        assert evaluate.main(["--model", str(teacher / "models" / f"fold{fold}.pt"), "--data", str(data),
                              "--out", str(tmp_path / f"ev{fold}"), "--show", "0"]) == 0
        probs = pd.read_parquet(tmp_path / f"ev{fold}" / "predictions.parquet").set_index("image_id")
        np.testing.assert_allclose(soft, probs.loc[fitted, [c for c in probs if c.startswith("p_")]],
                                   atol=1e-5)
        tested = pd.read_parquet(teacher / "predictions.parquet").query("fold == @fold")["image_id"]
        assert not set(tested) & set(fitted)  # the teacher's fold model never saw these test images
    recorded = tomllib.loads((tmp_path / "student" / "config.toml").read_text())["train"]
    assert recorded["teachers"] == [str(teacher.resolve())] and recorded["distill"] == 0.7

    # a refit on all the data (no test images) learns from every fold model of each teacher
    ds = load_dataset(data)
    every = crossval.teacher_targets(ds, TrainConfig(teachers=(str(teacher),)), None, np.arange(0),
                                     np.arange(len(ds)))
    each = [pd.read_parquet(tmp_path / f"ev{f}" / "predictions.parquet").filter(like="p_").to_numpy()
            for f in range(3)]
    np.testing.assert_allclose(every, np.mean(each, axis=0), atol=1e-5)

    # a teacher cut into other folds could have trained on this run's test images: refused at once
    with pytest.raises(ValueError, match="teachers: .*run: .* images differ between its fold 0 test images"):
        kfold.main(["--data", str(data), "--arch", "main", "--out", str(tmp_path / "k2"), "k=2",
                    f"teachers=['{teacher}']"])
    assert not (tmp_path / "k2").exists()
    with pytest.raises(ValueError, match="'teachers' must be a list of study.kfold result folders"):
        TrainConfig(teachers=(str(tmp_path),))
