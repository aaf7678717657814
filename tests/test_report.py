"""study.report: the report is written from the tables alone, every plot is a real PNG, and report.md
carries the numbers of fairness.parquet."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fer_core.fairness import RUN_KEYS, fairness_table, unit_intervals
from study.common import write_table
from study.report import fmt_ci, main, md_table, pareto_front, read_composition

CLASSES = ["Focused", "Happy", "Neutral", "Surprised"]
PNGS = ["composition.png", "accuracy_vs_level_representational.png", "gap_vs_level_representational.png",
        "confusion_gender.png", "confusion_age.png", "pareto.png"]


def _handmade(n: int = 60, folds: int = 3) -> pd.DataFrame:
    """2 archs x (level 0, representational 0.5) x (none, reweight) x 3 folds; Female errors at 0.5."""
    rng = np.random.default_rng(7)
    y_true = np.asarray(CLASSES)[np.arange(n) % 4]
    gender = np.where((np.arange(n) // 4) % 2 == 0, "Female", "Male").astype(object)
    age = np.asarray(["Adult", "Senior", "Baby"])[np.arange(n) % 3].astype(object)
    age[[4, 9]] = None
    parts = []
    for arch in ("main", "variant1"):
        for kind, level in (("none", 0.0), ("representational", 0.5)):
            for mitigation in ("none", "reweight"):
                drop = level * (0.5 if mitigation == "reweight" else 1.0)
                p = np.where(gender == "Female", 0.85 - drop, 0.85)
                wrong = np.asarray(CLASSES)[(np.arange(n) % 4 + 1) % 4]
                parts.append(pd.DataFrame({
                    "run_id": f"{arch}-{kind}-{mitigation}", "arch": arch, "bias_kind": kind,
                    "bias_level": level, "mitigation": mitigation, "fold": np.arange(n) % folds, "seed": 0,
                    "image_id": [f"img{i}" for i in range(n)], "y_true": y_true,
                    "y_pred": np.where(rng.random(n) < p, y_true, wrong),
                    **{f"p_{c}": np.full(n, 0.25, dtype=np.float32) for c in CLASSES},
                    "gender": gender, "age": age, "config_hash": "h", "version": "0"}))
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    preds = _handmade()
    write_table(preds, root / "predictions.parquet")
    write_table(fairness_table(preds, ["gender", "age"], CLASSES, n_boot=5), root / "fairness.parquet")
    return root


def _check_pngs(out, names):
    for name in names:
        with Image.open(out / name) as img:
            assert img.format == "PNG", name
            assert img.size[0] > 300 and img.size[1] > 200, (name, img.size)
            img.load()  # decodes fully: a truncated file fails here


def test_report_from_tables_alone(results, tmp_path):
    out = tmp_path / "report"
    assert main([str(results), "--out", str(out)]) == 0
    _check_pngs(out, PNGS)
    text = (out / "report.md").read_text()
    for heading in ("## Data composition", "## Accuracy at level 0", "## Group gaps at level 0",
                    "## How gaps change with bias", "## Mitigation effects", "## Findings", "## Caveats"):
        assert heading in text
    fair = pd.read_parquet(results / "fairness.parquet")
    for arch in ("main", "variant1"):
        row = fair[(fair["arch"] == arch) & (fair["bias_kind"] == "none") & (fair["mitigation"] == "none")
                   & (fair["attribute"] == "gender") & (fair["group"] == "difference")
                   & (fair["metric"] == "accuracy")].iloc[0]
        assert fmt_ci(row["value"], row["ci_low"], row["ci_high"]) in text  # the level-0 gender gap
        female = fair[(fair[RUN_KEYS].apply(tuple, axis=1) == (arch, "none", 0.0, "none"))
                      & (fair["attribute"] == "gender") & (fair["group"] == "Female")
                      & (fair["metric"] == "accuracy")].iloc[0]
        assert fmt_ci(female["value"], female["ci_low"], female["ci_high"]) in text
    assert "Male - Female" in text
    intervals = unit_intervals(pd.read_parquet(results / "predictions.parquet"), ["gender"])
    # the signed gap, its class-mix and within-class parts, and the class-by-class gap
    for metric in ("accuracy_gap", "accuracy_gap_mix", "accuracy_gap_within", "balanced_accuracy_gap"):
        row = intervals[(intervals[RUN_KEYS].apply(tuple, axis=1) == ("main", "none", 0.0, "none"))
                        & (intervals["metric"] == metric)].iloc[0]
        assert f"Male - Female: {fmt_ci(row['mean'], row['ci_low'], row['ci_high'], True)}" in text
    assert "| Focused | 8 | 7 | 15 |" in text  # composition of the distinct test images: Female, Male, total
    assert not (out / "fairness.parquet").exists()  # read, not recomputed


def test_missing_fairness_and_paired_tables_are_computed_and_saved(tmp_path):
    results = tmp_path / "res"
    results.mkdir()
    write_table(_handmade(), results / "predictions.parquet")
    assert main([str(results), "n_boot=5", "focus.gender=Female", 'attributes=["gender"]']) == 0
    assert (results / "report.md").is_file() and (results / "fairness.parquet").is_file()
    paired = pd.read_parquet(results / "paired.parquet")
    gaps = paired[(paired["metric"] == "accuracy_gap") & (paired["attribute"] == "gender")]
    assert set(gaps["direction"]) == {"(Male - Female) run - reference"}
    planted = gaps[(gaps["comparison"] == "bias") & (gaps["mitigation"] == "none")]
    assert (planted["mean_diff"] > 0.2).all()  # Female accuracy drops by 0.5 at level 0.5


def test_attributes_found_in_a_sweeps_predictions_without_fairness_table(tmp_path):
    """The sweep's predictions also name the bias target (bias_attr, bias_group): not attributes."""
    results = tmp_path / "res"
    results.mkdir()
    write_table(_handmade().assign(bias_attr="gender", bias_group="Female"), results / "predictions.parquet")
    assert main([str(results), "n_boot=0"]) == 0
    fair = pd.read_parquet(results / "fairness.parquet")
    assert set(fair["attribute"]) == {"gender", "age", "gender x age"}


def test_a_size_matched_stereotypical_kind_is_measured_from_its_own_level_zero(tmp_path):
    frame = _handmade()
    biased = frame[frame["bias_kind"] == "representational"]
    stereo = pd.concat([frame[frame["bias_kind"] == "none"].assign(bias_kind="stereotypical", bias_level=0.0),
                        biased.assign(bias_kind="stereotypical", bias_level=1.0)], ignore_index=True)
    results = tmp_path / "res"
    results.mkdir()
    write_table(pd.concat([frame, stereo], ignore_index=True), results / "predictions.parquet")
    assert main([str(results), "n_boot=5", 'attributes=["gender"]']) == 0
    _check_pngs(results, ["accuracy_vs_level_stereotypical.png", "gap_vs_level_stereotypical.png"])
    text = (results / "report.md").read_text()
    line = next(ln for ln in text.splitlines()
                if ln.startswith("- stereotypical bias, main without mitigation: the gender gap"))
    # the stereotypical level 0 holds the baseline's predictions here, so it differs from it by exactly 0
    assert "vs its size-matched level 0 (which differs from the unbiased baseline by +0.000" in line
    only_level_one = "— interval excludes 0 at level 1 (1: " + line.split("(1: ")[1]
    assert line.endswith(only_level_one)


def test_composition_from_the_manifest_named_in_config(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame({"image_id": ["a", "b", "c", "d"], "label": ["Happy", "Happy", "Focused", "Happy"],
                  "subset": ["base", "base", "base", "extra"], "gender": ["Female", None, "Male", "Female"]}
                 ).to_parquet(data / "manifest.parquet")
    results = tmp_path / "res"
    results.mkdir()
    (results / "config.toml").write_text(f'[data]\npath = "{data}"\n')
    comp = read_composition(results, _handmade(), ["gender"])
    got = {(r.label, r.group): r.n for r in comp.itertuples()}
    assert got == {("Focused", "Male"): 1, ("Happy", "Female"): 1, ("Happy", "unknown"): 1}


def test_pareto_front_by_hand():
    points = pd.DataFrame({"accuracy": [0.9, 0.8, 0.85, 0.7, 0.9], "gap": [0.2, 0.05, 0.1, 0.3, 0.25]})
    front = pareto_front(points)
    assert front.index.tolist() == [1, 2, 0]  # by increasing gap; 3 and 4 are dominated
    assert pareto_front(points.iloc[:0]).empty


def test_smoke_test(tmp_path):
    assert main(["--smoke-test", "--out", str(tmp_path)]) == 0
    _check_pngs(tmp_path, PNGS)
    assert "## Findings" in (tmp_path / "report.md").read_text()
    fair = pd.read_parquet(tmp_path / "fairness.parquet")  # computed from the simulated predictions
    assert set(fair["attribute"]) == {"gender", "age", "gender x age"}
    assert (tmp_path / "paired.parquet").is_file()
    # the simulated table sits next to the report it made, and the report reads the same from it again
    simulated = pd.read_parquet(tmp_path / "predictions.parquet")
    assert set(fair["attribute"]) <= set(simulated.columns) | {"gender x age"}
    before = (tmp_path / "report.md").read_text()
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text() == before


def test_missing_predictions_say_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="no predictions.parquet"):
        main([str(tmp_path)])


def test_a_folder_that_is_not_a_sweep_is_named(tmp_path):
    write_table(pd.DataFrame({"fold": [0], "image_id": ["a"], "y_true": ["Happy"], "y_pred": ["Happy"]}),
                tmp_path / "predictions.parquet")  # what study.kfold writes, without the sweep's keys
    with pytest.raises(SystemExit, match=r"lacks the columns \['arch', 'bias_kind', 'bias_level', "
                                         r"'mitigation', 'seed'\] of a bias sweep's predictions"):
        main([str(tmp_path)])


def test_a_pipe_inside_a_cell_does_not_split_the_markdown_table():
    """The equalized-odds direction holds pipes (``|Male - Female|``): escaped, every line keeps 3 columns."""
    table = md_table(pd.DataFrame({"Δ EO (worst class, |Male - Female|)": ["a|b"], "n": [1], "p": ["0.3"]}))
    lines = table.strip().splitlines()
    assert [len(re.findall(r"(?<!\\)\|", line)) for line in lines] == [4, 4, 4]
    assert "\\|Male - Female\\|" in lines[0] and "a\\|b" in lines[2]


def test_a_focus_other_than_the_sweeps_recomputes_the_paired_gaps(tmp_path, caplog):
    """Signs must agree: the paired changes of a gap are put beside its intervals, so a focus that turns
    the gap round gives the same narrow / widen verdicts, and the sweep's own paired.parquet is kept."""
    results = tmp_path / "res"
    results.mkdir()
    write_table(_handmade(n=240, folds=6), results / "predictions.parquet")
    assert main([str(results), "n_boot=0", 'attributes=["gender"]']) == 0  # writes paired.parquet
    written = pd.read_parquet(results / "paired.parquet")

    def verdicts(text):
        return re.findall(r"reweight vs no mitigation: .*?(\d+ narrow, \d+ widen)", text)

    before = verdicts((results / "report.md").read_text())
    assert before and before != ["0 narrow, 0 widen"]  # reweight halves the planted drop: it narrows
    out = tmp_path / "male"
    male = ["n_boot=0", 'attributes=["gender"]', "focus.gender=Male"]
    assert main([str(results), "--out", str(out), *male]) == 0
    turned = pd.read_parquet(out / "paired.parquet")
    gaps = turned[(turned["metric"] == "accuracy_gap") & (turned["attribute"] == "gender")]
    assert set(gaps["direction"]) == {"(Female - Male) run - reference"}
    assert verdicts((out / "report.md").read_text()) == before
    with caplog.at_level("WARNING", logger="study.report"):
        assert main([str(results), *male]) == 0
    assert "left that file as the sweep wrote it" in caplog.text
    pd.testing.assert_frame_equal(pd.read_parquet(results / "paired.parquet"), written)
