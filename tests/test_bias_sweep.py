"""study.bias_sweep end to end: planted effects found, unplanted ones not, fixed test folds, tables, resume.

The ground truth is ``experiments/bias_synthetic.toml`` without its mitigations and with two levels (1200
faces, 3 folds x 2 seeds, representational levels 0.5 and 1; 18 runs): women's expression cues are
planted faint (a gender gap at level 0), the sweep removes women's training images (the gap must grow from
the second level on), and nothing is planted on age (its gap and its changes must not be detected, the six
tests held to a 5% family-wise error).
"""

import dataclasses
import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from fer_core.checkpoint import load_model
from fer_core.config import TrainConfig, to_dict, to_toml
from fer_core.data import save_dataset
from fer_core.fairness import (
    EQ_ODDS,
    FAIRNESS_COLUMNS,
    GAP_METRICS,
    GAP_PARTS,
    PAIRED_COLUMNS,
    eq_odds_floor,
    unit_intervals,
)
from fer_core.synthetic import SyntheticConfig, make_dataset
from study import bias_sweep, evaluate
from study.sweep_config import load_sweep, recipes, run_grid

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "experiments" / "bias_synthetic.toml")
SMALL = ["sweep.levels.representational=[0.5, 1.0]",
         "sweep.mitigations=['none']", "sweep.n_boot=50", "resources.dashboard=false"]
PREDICTION_COLUMNS = {"run_id", "arch", "bias_kind", "bias_level", "mitigation", "fold", "seed", "image_id",
                      "y_true", "y_pred", "p_Focused", "p_Happy", "p_Neutral", "p_Surprised", "gender", "age",
                      "config_hash", "version"}
PROGRESS = re.compile(r"^run \d+/\d+ done: main \S+ [\d.]+ \S+ fold \d seed \d: acc [\d.]+ gap -?[\d.]+ "
                      r"\([\d.]+ s\)$", re.M)


@pytest.fixture(scope="module")
def ray_runtime():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ray_runtime):
    """The small ground-truth sweep, run once: (results folder, arguments)."""
    args = ["--config", CONFIG, f"results_dir={tmp_path_factory.mktemp('sweep')}", *SMALL]
    assert bias_sweep.main(args) == 0
    exp = load_sweep(CONFIG, args[2:])
    return Path(exp.results_dir) / exp.name, args


@pytest.fixture(scope="module")
def preds(sweep):
    return pd.read_parquet(sweep[0] / "predictions.parquet")


def level0(frame):
    return frame[(frame["bias_kind"] == "none") & (frame["mitigation"] == "none")]


@pytest.mark.ray
def test_planted_gender_gap_at_level_0_is_found(sweep, preds):
    fair = level0(pd.read_parquet(sweep[0] / "fairness.parquet"))
    acc = fair[(fair["attribute"] == "gender") & (fair["metric"] == "accuracy")].set_index("group")
    assert acc.loc["Male", "value"] > acc.loc["Female", "value"]  # women's cues were planted faint
    assert acc.loc["difference", "ci_low"] > 0
    signed = unit_intervals(level0(preds), ["gender"], focus={"gender": "Female"})
    # faint cues in every class: found overall, class by class and in the within-class part of the split
    for metric in (*GAP_METRICS, "accuracy_gap_within"):
        gap = signed[signed["metric"] == metric].iloc[0]
        assert gap["direction"] == "Male - Female"
        assert gap["ci_low"] > 0, gap
    floor = eq_odds_floor(level0(preds), "gender", focus="Female", n_perm=30)  # and beyond chance per class
    assert len(floor) == 6 and stats.ttest_rel(floor["observed"], floor["floor"]).pvalue < 0.05, floor


@pytest.mark.ray
def test_planted_representational_effect_is_found_from_level_2_up(sweep):
    paired = pd.read_parquet(sweep[0] / "paired.parquet")
    for metric in GAP_METRICS:
        rows = paired[(paired["comparison"] == "bias") & (paired["attribute"] == "gender")
                      & (paired["metric"] == metric)].sort_values("bias_level")
        assert list(rows["bias_level"]) == [0.5, 1.0]
        assert (rows["direction"] == "(Male - Female) run - reference").all()
        assert (rows["n_pairs"] == 6).all()  # 3 folds x 2 seeds, paired with level 0
        for _, row in rows.iloc[1:].iterrows():  # the second level on: the gap grows, interval above 0
            assert row["ci_low"] > 0, row


@pytest.mark.ray
def test_no_effect_where_none_was_planted(sweep, preds):
    # Eight tests of a true null (two gaps at level 0, three changes at each of two levels): at 5% each,
    # one or more would flag an effect in about a third of samples (on one CPU type it did: three p-values
    # of 0.023-0.029). The family is held to 5% (Bonferroni): each p-value must exceed 0.05 / 8.
    signed = unit_intervals(level0(preds), ["age"], focus={"age": "Baby"})
    paired = pd.read_parquet(sweep[0] / "paired.parquet")
    age = paired[(paired["comparison"] == "bias") & (paired["attribute"] == "age")]
    # the split of the accuracy gap is not a test of its own: the class-mix part moves whenever the classes
    # are read differently well for everybody, a real change of the gap between groups of unequal class mix
    assert sorted(age["metric"]) == sorted(2 * [*GAP_METRICS, EQ_ODDS, *GAP_PARTS])  # levels 0.5 and 1.0
    age = age[~age["metric"].isin(list(GAP_PARTS))]
    family = 0.05 / (len(GAP_METRICS) + len(age))
    for metric in GAP_METRICS:
        gap = signed[signed["metric"] == metric].iloc[0]
        assert gap["direction"] == "Adult - Baby"
        assert gap["p_value"] > family, gap
    assert (age["p_value"] > family).all(), age


@pytest.mark.ray
def test_test_folds_are_identical_across_levels_and_cover_the_data_once(preds):
    per_run = preds.groupby(["fold", "run_id"])["image_id"].apply(frozenset)
    for fold, runs in per_run.groupby(level="fold"):
        assert runs.nunique() == 1, f"fold {fold}: test images differ between runs"
    folds = [next(iter(runs)) for _, runs in per_run.groupby(level="fold")]
    assert len(folds) == 3
    assert sum(len(f) for f in folds) == len(frozenset().union(*folds)) == 1200  # disjoint, cover all
    assert preds["run_id"].nunique() == 18


@pytest.mark.ray
def test_tables_have_the_documented_columns(sweep, preds):
    out = sweep[0]
    assert PREDICTION_COLUMNS <= set(preds.columns)
    assert set(FAIRNESS_COLUMNS) <= set(pd.read_parquet(out / "fairness.parquet").columns)
    assert set(PAIRED_COLUMNS) <= set(pd.read_parquet(out / "paired.parquet").columns)
    runs = pd.read_parquet(out / "runs.parquet")
    assert {"run_id", "n_train", "n_target", "accuracy", "macro_f1", "gap", "seconds"} <= set(runs.columns)
    # representational level 1 trains on no woman at all; the baseline on all of them
    assert (runs.loc[runs["bias_level"] == 1.0, "n_target"] == 0).all()
    assert (runs.loc[runs["bias_kind"] == "none", "target_share"] > 0.4).all()
    assert {"attribute", "group", "label", "n"} <= set(pd.read_parquet(out / "composition.parquet").columns)
    assert (out / "config.toml").is_file() and (out / "command.txt").is_file()
    assert len(list((out / "runs").glob("*.parquet"))) == 18
    assert not (out / "failed_runs.json").exists()


@pytest.mark.ray
def test_duckdb_reads_the_tables_and_recomputes_group_metrics_from_predictions(sweep):
    """Per-gender counts, accuracy and per-class recall, recomputed in SQL from predictions.parquet."""
    import duckdb  # a dev dependency: a missing one is a failure, not a skip

    out = sweep[0]
    con = duckdb.connect()
    keys = "arch, bias_kind, bias_level, mitigation"
    by_sql = con.execute(f"""
        SELECT {keys}, gender AS "group",
               count(*) AS n,
               avg(CASE WHEN y_true = y_pred THEN 1.0 ELSE 0.0 END) AS accuracy,
               avg(CASE WHEN y_true = 'Happy' THEN (y_pred = 'Happy')::DOUBLE END) AS recall_Happy
        FROM '{out / "predictions.parquet"}' WHERE gender IS NOT NULL
        GROUP BY ALL""").df()
    table = con.execute(f"""
        SELECT {keys}, "group", metric, value FROM '{out / "fairness.parquet"}'
        WHERE attribute = 'gender' AND "group" IN ('Female', 'Male')""").df()
    assert len(by_sql) == 2 * 3  # two genders x three run groups (level 0, 0.5, 1.0)
    index = [*keys.split(", "), "group"]
    metrics = table.pivot_table(index=index, columns="metric", values="value").reset_index()
    merged = by_sql.merge(metrics, on=index, suffixes=("_sql", ""))
    assert len(merged) == len(by_sql)
    np.testing.assert_allclose(merged["accuracy_sql"], merged["accuracy"], rtol=1e-12)
    np.testing.assert_allclose(merged["recall_Happy_sql"], merged["recall_Happy"], rtol=1e-12)
    np.testing.assert_array_equal(merged["n"], merged["count"])
    # every documented table reads back in DuckDB with the rows pandas sees
    for name in ("predictions", "fairness", "paired", "runs", "composition"):
        path = out / f"{name}.parquet"
        assert con.execute(f"SELECT count(*) FROM '{path}'").fetchone()[0] == len(pd.read_parquet(path))


@pytest.mark.ray
def test_a_sweeps_model_scores_its_test_fold_again_through_study_evaluate(sweep, tmp_path):
    """A run's saved model, given its test fold as PNG files it has never trained on, reproduces the
    sweep's predictions and accuracy for that run through the study.evaluate command."""
    out, args = sweep
    exp = load_sweep(CONFIG, args[2:])
    preds = pd.read_parquet(out / "predictions.parquet")
    run_id = "main__representational-1__none__fold1__seed1"
    run = preds[preds["run_id"] == run_id].set_index("image_id")
    assert len(list((out / "models").glob("*.pt"))) == 18
    saved = load_model(out / "models" / f"{run_id}.pt")  # weights_only=True inside
    assert saved.config["bias"]["level"] == 1.0 and saved.config["fold"] == 1 and saved.config["seed"] == 1
    ds = bias_sweep.load_data(exp.data.path, exp.data.synthetic)
    images = tmp_path / "faces"
    for row, (image_id, label) in enumerate(ds.manifest[["image_id", "label"]].itertuples(index=False)):
        if image_id in run.index:
            (images / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(ds.pixels[row]).save(images / label / f"{image_id}.png")
    assert evaluate.main(["--model", str(out / "models" / f"{run_id}.pt"), "--data", str(images),
                          "--out", str(tmp_path / "eval")]) == 0
    again = pd.read_parquet(tmp_path / "eval" / "predictions.parquet")
    again.index = [Path(p).stem for p in again["source_path"]]
    assert sorted(again.index) == sorted(run.index)
    assert (again["y_pred"] == run.loc[again.index, "y_pred"]).all()
    np.testing.assert_allclose(again["p_Happy"], run.loc[again.index, "p_Happy"], atol=1e-5)
    runs = pd.read_parquet(out / "runs.parquet").set_index("run_id")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["accuracy"] == pytest.approx(runs.loc[run_id, "accuracy"])


def _benchmark(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.ray
def test_postprocess_benchmark_scores_each_test_image_once_per_rule(sweep, tmp_path, capsys):
    post = _benchmark("postprocess_fer4")
    out = tmp_path / "post.parquet"
    assert post.main([str(sweep[0]), "--out", str(out), "--generations", "3"]) == 0  # a short search
    printed = capsys.readouterr().out
    assert "== target on the gender gap" in printed and "== target on the gender balanced gap" in printed
    table = pd.read_parquet(out)
    base = table[table["mitigation"] == "none"].set_index(["run_id", "image_id"]).sort_index()
    assert len(base) == len(pd.read_parquet(sweep[0] / "predictions.parquet"))  # the sweep has no mitigation
    for rule in ("prior", "prior-half", "audit-acc", "audit-bal"):
        rows = table[table["mitigation"] == rule].copy()
        rows["run_id"] = rows["run_id"].str.removesuffix(f"+{rule}")
        rows = rows.set_index(["run_id", "image_id"]).sort_index()
        assert rows.index.equals(base.index), rule
        assert rows["y_true"].equals(base["y_true"]) and rows["gender"].equals(base["gender"])
        assert rows["y_pred"].isin(["Focused", "Happy", "Neutral", "Surprised"]).all()


@pytest.mark.ray
def test_postprocess_benchmark_refuses_a_dataset_the_sweep_did_not_use(sweep, tmp_path):
    post = _benchmark("postprocess_fer4")
    other = save_dataset(make_dataset(SyntheticConfig(n=1200, seed=5, image_size=32)), tmp_path / "other")
    with pytest.raises(SystemExit, match="differs from the sweep's test images; give --data"):
        post.main([str(sweep[0]), "--data", str(other)])


@pytest.mark.ray
def test_unseen_benchmark_finds_the_planted_effect_on_images_no_run_saw(sweep, tmp_path, capsys):
    """The sweep's models on extra women's faces none of them trained, validated or was tested on: the
    planted representational effect (no woman in training reads faint expressions as Neutral) must show
    there too, and each run's test-fold women's accuracy must be the one in predictions.parquet."""
    unseen = _benchmark("unseen_fer4")
    out, args = sweep
    exp = load_sweep(CONFIG, args[2:])
    with_extras = bias_sweep.load_data(exp.data.path, {**exp.data.synthetic, "n_extra": 240})
    trained = bias_sweep.load_data(exp.data.path, exp.data.synthetic)
    base = with_extras.manifest["subset"].eq("base").to_numpy()
    assert with_extras.manifest["image_id"][base].tolist() == trained.manifest["image_id"].tolist()
    data = save_dataset(with_extras, tmp_path / "with-extras")
    assert unseen.main([str(out), "--data", str(data)]) == 0
    printed = capsys.readouterr().out
    assert "240 unseen images (gender = Female)" in printed
    table = pd.read_parquet(out / "unseen.parquet").set_index("run_id")
    assert len(table) == 18
    preds = pd.read_parquet(out / "predictions.parquet")
    women = preds[preds["gender"] == "Female"]
    expected = (women["y_true"] == women["y_pred"]).groupby(women["run_id"]).mean()
    np.testing.assert_allclose(table.loc[expected.index, "test_focus_accuracy"], expected)
    change = unseen.representational(table.reset_index(), "unseen_accuracy").set_index("mitigation")
    assert change.loc["level 1", "high"] < 0  # interval of the change, points, below 0
    assert change.loc["level 1", "units"] == 6

    mixed = with_extras.manifest.copy()
    mixed.loc[~base, "gender"] = "Male"
    other = save_dataset(dataclasses.replace(with_extras, manifest=mixed), tmp_path / "mixed")
    with pytest.raises(SystemExit, match="not all gender = 'Female'"):
        unseen.main([str(out), "--data", str(other)])


@pytest.mark.ray
def test_resume_trains_nothing_when_every_run_is_done(sweep, capsys):
    out, args = sweep
    files = sorted((out / "runs").glob("*.parquet"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert bias_sweep.main(args) == 0
    printed = capsys.readouterr().out
    assert "18 of 18 runs already done" in printed
    assert not PROGRESS.search(printed)
    assert [f.stat().st_mtime_ns for f in files] == mtimes


@pytest.mark.ray
def test_smoke_test_runs_and_resume_trains_only_what_is_missing(tmp_path, ray_runtime, capsys):
    assert bias_sweep.main(["--smoke-test", f"results_dir={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    assert len(PROGRESS.findall(printed)) == 8
    out = tmp_path / "smoke-bias-sweep"
    removed, kept = sorted((out / "runs").glob("*.parquet"))[:2]
    removed.unlink()
    # an earlier invocation's record: the removed run, and one that has been finished since
    record = [{"run_id": f.stem, "error": "RuntimeError", "message": "x"} for f in (removed, kept)]
    (out / "failed_runs.json").write_text(json.dumps(record))
    assert bias_sweep.main(["--resume", str(out), "--tables-only"]) == 0  # tables of what is finished
    printed = capsys.readouterr().out
    assert len(PROGRESS.findall(printed)) == 0 and not removed.exists()
    assert "7 of 8 runs" in printed and "1 failed in an earlier invocation" in printed
    assert [f["run_id"] for f in json.loads((out / "failed_runs.json").read_text())] == [removed.stem]
    assert pd.read_parquet(out / "predictions.parquet")["run_id"].nunique() == 7
    assert bias_sweep.main(["--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "7 of 8 runs already done" in printed
    assert len(PROGRESS.findall(printed)) == 1
    assert removed.is_file() and not (out / "failed_runs.json").exists()
    assert pd.read_parquet(out / "predictions.parquet")["run_id"].nunique() == 8
    # another configuration matches none of the run files: its tables are not the old ones
    assert bias_sweep.main(["--resume", str(out), "--tables-only", "sweep.group=Male"]) == 0
    assert "0 of 8 runs" in capsys.readouterr().out
    assert not any((out / name).exists() for name in bias_sweep.SWEEP_TABLES)
    assert len(list((out / "runs").glob("*.parquet"))) == 8


@pytest.mark.ray
def test_a_failing_run_is_retried_recorded_and_the_others_finish(tmp_path, ray_runtime, capsys):
    exp = load_sweep(CONFIG, ["split.k=2", "data.synthetic.n=80", "train.epochs=1", "sweep.max_failures=1",
                              "sweep.mitigations=['none']", "sweep.levels.representational=[1.0]"])
    ds = bias_sweep.load_data(exp.data.path, exp.data.synthetic)
    tasks = bias_sweep.make_tasks(exp, ds, run_grid(exp, recipes(exp)))
    broken = dataclasses.replace(tasks[0], train_idx=np.array([10 ** 9]))  # IndexError in the worker
    (tmp_path / "runs").mkdir()
    failures = bias_sweep.execute([broken, *tasks[1:]], ds, exp, tmp_path)
    assert [f["run_id"] for f in failures] == [tasks[0].spec.run_id]
    assert "IndexError" in failures[0]["message"]
    assert "FAILED" in capsys.readouterr().out
    assert len(list((tmp_path / "runs").glob("*.parquet"))) == len(tasks) - 1
    bias_sweep.write_failures(tmp_path, failures)
    assert json.loads((tmp_path / "failed_runs.json").read_text())[0]["run_id"] == tasks[0].spec.run_id


# ---- configuration: fail fast, before any training ----

def test_options_may_come_between_overrides():
    args = bias_sweep.parse_args(["sweep.n_boot=0", "--max-runs", "2", "split.k=3", "--tables-only"])
    assert args.overrides == ["sweep.n_boot=0", "split.k=3"] and args.max_runs == 2 and args.tables_only


@pytest.mark.parametrize(("override", "match"), [
    ("sweep.archs=['resnet']", "unknown architecture 'resnet'"),
    ("sweep.levels.representational=[0.0]", "must be in \\(0, 1\\]"),
    ("sweep.levels.stereotypical=[1.5]", "must be in \\(0, 1\\]"),
    ("sweep.kinds=['sampling']", "kinds"),
    ("sweep.mitigations=['dropout']", "mitigations"),
    ("sweep.colour=1", "unknown config key 'sweep.colour'"),
    # a repeated value trained the same runs twice and read their files twice into the tables
    ("sweep.mitigations=['none', 'none']", "sweep.mitigations: 'none' is listed more than once"),
    ("sweep.levels.representational=[0.5, 0.5]", "levels.representational: 0.5 is listed more than once"),
    ("sweep.stereotypical_classes=['Happy', 'Happy']", "'Happy' is listed more than once"),
    ("sweep.max_in_flight=-1", "max_in_flight"),  # submitted nothing and waited for ever
])
def test_bad_config_is_refused_naming_the_key(override, match):
    with pytest.raises((KeyError, ValueError), match=match):
        load_sweep(CONFIG, [override])


@pytest.mark.parametrize(("override", "match"), [
    ("sweep.group=Other", "no group 'Other'"),
    ("sweep.attr=race", "no attribute 'race'"),
    ("sweep.stereotypical_classes=['Angry']", "no class 'Angry'"),
    ("sweep.tuned=nowhere", "no best.toml"),
])
def test_dataset_mismatch_fails_before_training(tmp_path, override, match):
    args = ["--smoke-test", f"results_dir={tmp_path}", "sweep.kinds=['representational', 'stereotypical']",
            override]
    with pytest.raises((KeyError, ValueError, FileNotFoundError), match=match):
        bias_sweep.main(args)
    assert not list(tmp_path.rglob("*.parquet"))


def test_grid_is_the_full_product_with_unique_run_ids():
    exp = load_sweep(None, ["split.k=5", "sweep.seeds=[0, 1]"])
    grid = run_grid(exp, recipes(exp))
    # baseline, representational x 4, stereotypical: its size-matched level 0 and 2 levels
    conditions = 1 + 4 + 1 + 2
    assert [s.level for s in exp.sweep.conditions() if s.kind == "stereotypical"] == [0.0, 0.5, 1.0]
    assert {s.size_level for s in exp.sweep.conditions() if s.kind == "stereotypical"} == {1.0}
    shrink = load_sweep(None, ["sweep.stereotypical_sizes=shrink"]).sweep.conditions()
    assert [(s.level, s.size_level) for s in shrink if s.kind == "stereotypical"] == [(0.5, 0.0), (1.0, 0.0)]
    assert len(grid) == 3 * conditions * 6 * 5 * 2  # archs x conditions x mitigations x folds x seeds
    assert len({r.run_id for r in grid}) == len(grid)
    assert {r.cfg.mitigation for r in grid} == {"none", "resample", "reweight", "groupdro", "groupheads",
                                                "adversary"}
    assert all(r.cfg.group_attr == "gender" and r.cfg.arch == r.arch for r in grid)
    # the hash names everything that shapes a run except its fold
    hashes = {(r.arch, r.bias, r.mitigation, r.seed): r.config_hash for r in grid}
    assert len(set(hashes.values())) == len(hashes)


def test_tuned_folder_gives_its_best_recipe_to_its_arch_and_the_default_to_the_others(tmp_path):
    best = dataclasses.replace(TrainConfig(), arch="variant1", lr=0.0042, epochs=7)
    (tmp_path / "best.toml").write_text(to_toml({"study": "t", "scores": {"cv_macro_f1": 0.9},
                                                 "train": to_dict(best)}))
    exp = load_sweep(None, [f"sweep.tuned={tmp_path}", "train.epochs=3"])
    got = recipes(exp)
    assert got["variant1"].lr == 0.0042 and got["variant1"].epochs == 7
    assert got["main"].lr == TrainConfig().lr and got["main"].epochs == 3
    grid = run_grid(exp, got)
    assert {r.cfg.lr for r in grid if r.arch == "variant1"} == {0.0042}
