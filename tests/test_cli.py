"""Entry points: a user's mistake is one line naming the key, value or file, not a traceback."""

import subprocess
import sys

import pytest

from study import bias_sweep
from study.common import TRACEBACK_ENV, run_cli


def bad_key() -> int:
    raise KeyError("x.toml: unknown config key 'lrr'")


def test_a_user_error_is_one_line_and_exit_status_2(capsys, monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    assert run_cli(bad_key, "prog") == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "prog: error: x.toml: unknown config key 'lrr'"  # no KeyError quotes
    assert f"set {TRACEBACK_ENV}=1" in err and "Traceback" not in err


def test_the_traceback_on_request_and_for_anything_else(monkeypatch):
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(KeyError):
        run_cli(bad_key, "prog")
    monkeypatch.delenv(TRACEBACK_ENV)

    def bug() -> int:
        raise RuntimeError("not a user's mistake")

    with pytest.raises(RuntimeError):
        run_cli(bug, "prog")


def test_python_dash_m_prints_the_message_not_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "study.kfold", "--smoke-test", "lr=fast"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "python -m study.kfold: error: command line: key 'lr' must be float, got 'fast'" in done.stderr
    assert "Traceback" not in done.stderr


def test_resume_refuses_a_folder_that_is_not_a_sweep(tmp_path):
    (tmp_path / "config.toml").write_text('[data]\npath = "synthetic"\n\n[train]\nepochs = 2\n')
    with pytest.raises(ValueError, match="no \\[sweep\\] table, so it was not written by study.bias_sweep"):
        bias_sweep.resolve(bias_sweep.parse_args(["--resume", str(tmp_path)]))


def test_a_starting_model_of_another_architecture_is_refused_before_any_folder_is_made(tmp_path):
    from fer_core.checkpoint import save_model
    from fer_core.models import create_model
    from study import kfold, tune

    path = save_model(tmp_path / "main.pt", create_model("main"), arch="main", classes=("a", "b", "c", "d"),
                      input_size=(48, 48), mean=0.5, std=0.2, config={"width": 1.0})
    out = tmp_path / "results"
    with pytest.raises(ValueError, match="init: .*main.pt: holds a 'main' model of width 1.0, but training "
                                         "asks for 'variant1'"):
        kfold.main(["--smoke-test", "--arch", "variant1", "--out", str(out / "kfold"), f"init={path}"])
    # the default search space tries all three architectures: variant1 and variant2 could not start
    with pytest.raises(ValueError, match="train.init with search.space.arch .*'variant1'"):
        tune.main(["--smoke-test", f"results_dir={out}", f"train.init={path}"])
    with pytest.raises(ValueError, match="search.space.init: the starting model is not searchable"):
        tune.main(["--smoke-test", f"results_dir={out}", f'search.space.init=["", "{path}"]'])
    with pytest.raises(ValueError, match="search.space.teachers: the teachers are not searchable"):
        tune.main(["--smoke-test", f"results_dir={out}", 'search.space.teachers=[[], []]'])
    with pytest.raises(ValueError, match="init of the variant2 recipe: .*asks for 'variant2'"):
        bias_sweep.main(["--smoke-test", f"results_dir={out}", 'sweep.archs=["main", "variant2"]',
                         f"train.init={path}"])
    assert not out.exists()
    # one architecture, the saved one: the search is accepted (checked without running it)
    tune.check_init_fits(tune.load_experiment(None, [f"train.init={path}", 'search.space.arch=["main"]']))


@pytest.mark.parametrize(("choices", "error"), [
    ('search.space.input_norm=["dataset", "bogus"]', "search.space.input_norm = \\['dataset', 'bogus'\\]: .*"
                                                     "must be one of \\['dataset', 'equalize', 'image'\\]"),
    ('search.space.epochs=[2.5, 3]', "search.space.epochs = \\[2.5, 3\\]: .*'epochs' must be int, got 2.5"),
])
def test_a_searched_choice_that_is_not_a_valid_value_is_refused_before_any_trial(tmp_path, choices, error):
    from study import tune

    with pytest.raises((TypeError, ValueError), match=error):
        tune.main(["--smoke-test", f"results_dir={tmp_path / 'results'}", choices])
    assert not (tmp_path / "results").exists()


def test_a_searched_choice_that_cannot_go_with_a_fixed_key_is_refused_before_any_trial(tmp_path):
    from study import tune

    out = tmp_path / "results"
    space = 'search.space.landmark_input=["points", "mesh"]'
    with pytest.raises(ValueError, match=r"space.landmark_input = \['points', 'mesh'\]: .*landmark_mirror"):
        tune.main(["--smoke-test", f"results_dir={out}", "train.landmark_weight=0.5",
                   "train.landmark_mirror=true", space])
    assert not out.exists()
    # with the mirror off both choices are valid (checked without running the search)
    exp = tune.load_experiment(None, ["train.landmark_weight=0.5", space])
    assert exp.search.space["landmark_input"] == ["points", "mesh"]
