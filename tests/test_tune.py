"""study.tune: test folds kept out, outputs, two-node cluster, SIGKILL + resume, reproducibility."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from fer_core.data import image_id
from study import evaluate
from study.experiment import load_experiment, trial_train_config
from study.results import best_trial, summary_table
from study.search import check_resumable, make_scheduler, make_searcher
from study.trainable import make_trainers
from tests.helpers import bar_dataset

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.ray


def test_test_folds_never_reach_training_or_early_stopping():
    ds = bar_dataset(48)
    exp = load_experiment(None, ["split.k=3", "train.epochs=1", "train.batch_size=8"])
    trainers, tests = make_trainers(exp, ds, {"arch": "main"})
    assert len(trainers) == 3
    for tr, test_idx in zip(trainers, tests, strict=True):
        test_ids = set(ds.manifest["image_id"].iloc[test_idx])
        pixels_seen = {image_id(p) for p in tr.x.mul(tr.std).add(tr.mean).mul(255).round()
                       .clamp(0, 255).byte().squeeze(1).numpy()}
        val_seen = {image_id(p) for p in tr.x_val.mul(tr.std).add(tr.mean).mul(255).round()
                    .clamp(0, 255).byte().squeeze(1).numpy()}
        assert not test_ids & pixels_seen
        assert not test_ids & val_seen
        assert len(pixels_seen) + len(val_seen) + len(test_ids) == len(ds)


def test_best_trial_is_chosen_by_validation_not_by_test_folds():
    summary = pd.DataFrame({
        "trial_id": ["a", "b", "c"], "status": ["completed", "completed", "pruned"],
        "objective": [0.9, 0.8, 0.95], "cv_macro_f1": [0.5, 0.99, np.nan]})
    assert best_trial(summary)["trial_id"] == "a"


def test_summary_keeps_epochs_run_apart_from_a_searched_epoch_budget():
    def result(tid, ran, budget, done):
        metrics = {"trial_id": tid, "training_iteration": ran, **({"cv_macro_f1": 0.7} if done else {})}
        return SimpleNamespace(metrics=metrics, config={"arch": "main", "epochs": budget}, error=None)

    summary = summary_table([result("a", 6, 40, False), result("b", 20, 20, True)]).set_index("trial_id")
    assert summary.loc["a", ["epochs_run", "epochs", "status"]].tolist() == [6, 40, "pruned"]
    assert summary.loc["b", ["epochs_run", "epochs", "status"]].tolist() == [20, 20, "completed"]


@pytest.mark.parametrize("torn, content", [
    ("experiment_state-2026-01-02_00-00-00.json", ""),
    ("experiment_state-2026-01-02_00-00-00.json", '{"trial_data": [['),
    ("searcher-state-2026-01-02_00-00-00.pkl", ""),
    ("search_gen_state-2026-01-02_00-00-00.json", ""),
])
def test_resume_refuses_an_experiment_state_cut_short_by_a_kill(tmp_path, torn, content):
    tune_dir = tmp_path / "tune"
    tune_dir.mkdir()
    (tune_dir / "tuner.pkl").write_bytes(b"tuner")
    for stamp in ("2026-01-01_00-00-00", "2026-01-02_00-00-00"):  # a resumed study has one per session
        (tune_dir / f"experiment_state-{stamp}.json").write_text('{"trial_data": []}')
        (tune_dir / f"searcher-state-{stamp}.pkl").write_bytes(b"searcher")
        (tune_dir / f"search_gen_state-{stamp}.json").write_bytes(b"\x80\x05 a pickle, despite its name")
    check_resumable(tune_dir)  # complete: accepted
    (tune_dir / torn).write_text(content)
    with pytest.raises(ValueError, match=f"{torn}: the file is (empty|not complete JSON).*new results_dir"):
        check_resumable(tune_dir)
    # only the newest counts: an older session's file cut short is not what Tune restores from
    (tune_dir / torn).write_text('{"trial_data": []}')
    (tune_dir / torn.replace("01-02", "01-01")).write_text(content)
    check_resumable(tune_dir)


def test_tune_resume_refuses_a_torn_state_before_starting_ray(tmp_path, monkeypatch):
    from study import tune

    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "tuner.pkl").write_bytes(b"tuner")
    (tmp_path / "tune" / "experiment_state-2026-01-01_00-00-00.json").write_text("")
    monkeypatch.setattr(tune, "start_ray", lambda *a: pytest.fail("Ray started on a torn state"))
    with pytest.raises(ValueError, match="experiment_state-2026-01-01_00-00-00.json: the file is empty"):
        tune.main(["--resume", str(tmp_path)])


def test_a_grace_period_longer_than_the_budget_is_a_named_error():
    exp = load_experiment(None, ["train.epochs=4", "search.grace_period=6"])
    with pytest.raises(ValueError, match="search.grace_period = 6 is more than the largest epoch budget, 4"):
        make_scheduler(exp)
    assert make_scheduler(load_experiment(None, ["train.epochs=6", "search.grace_period=6"])) is not None


@pytest.mark.parametrize("objective", ["accuracy", "pareto"])
def test_start_from_train_makes_the_recipe_the_first_trial(objective):
    fer4 = str(ROOT / "experiments" / "fer4.toml")
    overrides = ["train.lr=0.004", "train.dropout=0.2", "train.optimizer=sgd",
                 f"search.objective={objective}", "search.scheduler=fifo"]
    exp = load_experiment(fer4, [*overrides, "search.start_from_train=true"])
    searcher = make_searcher(exp)
    first, second = searcher.suggest("t0"), searcher.suggest("t1")
    assert set(first) == set(exp.search.space)
    assert trial_train_config(exp.train, first) == exp.train  # the first trial trains exactly [train]
    assert trial_train_config(exp.train, second) != exp.train  # after it, TPE draws
    plain = make_searcher(load_experiment(fer4, [*overrides, "search.start_from_train=false"])).suggest("t0")
    assert trial_train_config(exp.train, plain) != exp.train


def test_start_from_train_outside_the_space_names_the_key():
    with pytest.raises(ValueError, match=r"train.batch_size = 48 is outside search.space.batch_size"):
        load_experiment(str(ROOT / "experiments" / "fer4.toml"), ["search.start_from_train=true",
                                                                  "train.batch_size=48"])
    load_experiment(str(ROOT / "experiments" / "fer4.toml"), ["search.start_from_train=false",
                                                              "train.batch_size=48"])  # off: no check


def test_resume_without_a_study_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="tuner.pkl missing"):
        check_resumable(tmp_path / "tune")


def run_tune(args, results_dir):
    from study import tune

    return tune.main(["--smoke-test", f"results_dir={results_dir}", *args])


def test_smoke_study_writes_tables_best_config_and_a_usable_model(tmp_path):
    assert run_tune([], tmp_path) == 0
    out = tmp_path / "smoke"
    trials = pd.read_parquet(out / "trials.parquet")
    expected = {"study", "trial_id", "arch", "fold", "epoch", "hp_arch", "hp_lr", "train_loss", "val_loss",
                "val_accuracy", "val_macro_f1", "seconds", "status", "config_hash", "version"}
    assert expected <= set(trials.columns)
    assert not trials.duplicated(["trial_id", "fold", "epoch"]).any()
    assert set(trials["fold"]) == {0, 1}
    best = tomllib.loads((out / "best.toml").read_text())
    summary = pd.read_parquet(out / "summary.parquet")
    chosen = summary.loc[summary["trial_id"] == best["trial_id"]].iloc[0]
    assert best["scores"]["cv_macro_f1"] == pytest.approx(chosen["cv_macro_f1"])
    assert best["train"]["arch"] == chosen["arch"]
    # epochs a trial ran (not overwritten by a searched "epochs" budget) agrees with its per-epoch rows
    ran = trials.groupby("trial_id")["epoch"].max() + 1  # epochs are numbered from 0
    assert summary.set_index("trial_id")["epochs_run"].sort_index().tolist() == ran.sort_index().tolist()
    # DuckDB reads the same tables: one row per trial x fold x epoch, joined to the summary in SQL
    import duckdb  # a dev dependency: a missing one is a failure, not a skip

    con = duckdb.connect()
    assert con.execute(f"SELECT count(*) FROM '{out / 'trials.parquet'}'").fetchone()[0] == len(trials)
    per_trial = con.execute(f"""
        SELECT t.trial_id, count(DISTINCT t.fold) AS folds, max(t.epoch) + 1 AS ran, any_value(s.epochs_run)
        FROM '{out / "trials.parquet"}' t JOIN '{out / "summary.parquet"}' s USING (trial_id)
        GROUP BY t.trial_id""").fetchall()
    assert len(per_trial) == len(summary)
    assert all(folds == 2 and ran == epochs_run for _, folds, ran, epochs_run in per_trial)
    assert (out / "config.toml").is_file() and (out / "command.txt").is_file()
    assert list((out / "tune").glob("*/events.out.tfevents.*")), "no TensorBoard logs"
    # the refit model runs on data it has not seen
    from fer_core.data import save_dataset
    from fer_core.synthetic import make_dataset

    unseen = save_dataset(make_dataset(n=40, seed=99), tmp_path / "unseen")
    assert evaluate.main(["--model", str(out / "best" / "model.pt"), "--data", str(unseen),
                          "--out", str(tmp_path / "ev")]) == 0
    assert len(pd.read_parquet(tmp_path / "ev" / "predictions.parquet")) == 40


def test_two_node_cluster_runs_trials_on_both_nodes(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        # trials of ~1 s let one reused worker take them all in turn; 20 full epochs make them overlap
        assert run_tune(["--address", cluster.address, "train.epochs=20", "train.patience=20",
                         "search.num_samples=4", "search.scheduler=fifo"], tmp_path) == 0
    finally:
        ray.shutdown()
        cluster.shutdown()
    summary = pd.read_parquet(tmp_path / "smoke" / "summary.parquet")
    assert len(summary) == 4
    assert summary["node_id"].nunique() == 2, summary[["trial_id", "node_id"]]


STUDY = """
name = "killme"
[data]
path = "synthetic"
[data.synthetic]
n = 160
[split]
k = 2
[train]
epochs = 8
batch_size = 16
patience = 10
[search]
num_samples = 4
n_startup_trials = 4
scheduler = "fifo"
refit = false
checkpoint_seconds = 0
[search.space]
arch = ["main", "variant2"]
lr = { low = 1e-3, high = 1e-2, log = true }
[resources]
dashboard = false
"""


EPOCHS = tomllib.loads(STUDY)["train"]["epochs"]


def launch(args, cwd, tmpdir=None):
    """Start ``study.tune``; with ``tmpdir``, its processes (Ray workers too) make temporary files there."""
    env = dict(ENV)
    if tmpdir is not None:  # Ray's own session folder stays where it was: only the trials' files move
        env.update(TMPDIR=str(tmpdir), RAY_TMPDIR=os.environ.get("RAY_TMPDIR", tempfile.gettempdir()))
    return subprocess.Popen([sys.executable, "-m", "study.tune", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def trial_part_way(study: Path, epochs: int) -> bool:
    """Some trial has reported two epochs or more, and fewer than ``epochs``.

    Tune snapshots its state at the end of the step that took a trial's checkpoint, before it takes
    the trial's next result: once a second epoch is in result.json, the snapshot on disk holds the
    first epoch's checkpoint, and a resumed study must start that trial from it.
    """
    lines = [len(p.read_text().splitlines()) for p in study.glob("tune/*/result.json")]
    return any(2 <= n < epochs for n in lines)


def resumed_from_checkpoint(study: Path) -> int:
    """Trials whose results show a restore: epochs counted since the restore fall behind the total."""
    count = 0
    for path in study.glob("tune/*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        count += any(r["iterations_since_restore"] < r["training_iteration"] for r in rows)
    return count


def kill_part_way(config: Path, results: Path, tmpdir: Path) -> None:
    """Start the study and SIGKILL its driver once some trial is part way through."""
    # a SIGKILL can land while a checkpoint is being stored: its temporary folder goes to tmpdir
    tmpdir.mkdir()
    proc = launch(["--config", str(config), f"results_dir={results}"], ROOT, tmpdir=tmpdir)
    deadline = time.time() + 240
    while not trial_part_way(results / "killme", EPOCHS) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the study finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (results / "killme" / "trials.parquet").exists()


def test_ctrl_c_stops_the_study_saying_how_to_resume(tmp_path):
    config = tmp_path / "study.toml"
    config.write_text(STUDY)
    results = tmp_path / "r"
    env = {**ENV, "TMPDIR": str(tmp_path), "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", tempfile.gettempdir())}
    proc = subprocess.Popen([sys.executable, "-m", "study.tune", "--config", str(config),
                             f"results_dir={results}"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not trial_part_way(results / "killme", EPOCHS) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the study finished before it could be stopped"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert f"python -m study.tune --resume {results / 'killme'}" in out
    assert not (results / "killme" / "trials.parquet").exists()
    assert not (results / "killme" / "best.toml").exists()
    check_resumable(results / "killme" / "tune")  # Tune saved its state on the way out


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    config = tmp_path / "study.toml"
    config.write_text(STUDY)
    fresh = tmp_path / "b"
    # Tune copies its experiment state into the results folder in the background; a kill during the
    # copy leaves it torn, and --resume then refuses it (test above). Kill again, in a new folder.
    for attempt in range(3):
        killed = tmp_path / f"a{attempt}"
        kill_part_way(config, killed, tmp_path / f"killed_tmp{attempt}")
        time.sleep(2)
        try:
            check_resumable(killed / "killme" / "tune")
            break
        except ValueError as err:
            print(f"attempt {attempt}: {err}")
    else:
        pytest.fail("three kills in a row tore Tune's experiment state")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    resumed = launch(["--resume", str(killed / "killme")], ROOT, tmpdir=scratch)
    uninterrupted = launch(["--config", str(config), f"results_dir={fresh}"], ROOT, tmpdir=scratch)
    assert resumed.wait(timeout=400) == 0
    assert uninterrupted.wait(timeout=400) == 0
    # every epoch was checkpointed (checkpoint_seconds = 0); none is left in the temporary folder
    assert not list(scratch.glob("fer-ckpt-*"))
    # at least one trial went on from its checkpoint rather than starting again
    assert resumed_from_checkpoint(killed / "killme") > 0
    a = pd.read_parquet(killed / "killme" / "trials.parquet")
    b = pd.read_parquet(fresh / "killme" / "trials.parquet")
    for t in (a, b):
        assert not t.duplicated(["trial_id", "fold", "epoch"]).any()
        assert (t["status"] == "completed").all() and t["trial_id"].nunique() == 4
    key = ["hp_arch", "hp_lr", "fold", "epoch"]
    a, b = a.sort_values(key, ignore_index=True), b.sort_values(key, ignore_index=True)
    pd.testing.assert_frame_equal(a[key], b[key])
    for col in ("train_loss", "val_loss", "val_macro_f1"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-6, err_msg=col)
