import pytest

from fer_core.config import (
    SplitConfig,
    TrainConfig,
    config_hash,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
    to_toml,
)


def test_overrides_are_typed_and_nested():
    assert parse_overrides(["lr=0.01", "train.epochs=3", "optimizer=sgd", "amp=false"]) == {
        "lr": 0.01, "train": {"epochs": 3}, "optimizer": "sgd", "amp": False}


def test_unknown_key_is_named(tmp_path):
    cfg = tmp_path / "x.toml"
    cfg.write_text("lr = 0.1\nlearning_rate = 0.2\n")
    with pytest.raises(KeyError, match=r"x.toml.*'learning_rate'"):
        load_config(TrainConfig, cfg)


def test_wrong_type_is_named():
    with pytest.raises(TypeError, match="'epochs' must be int"):
        from_dict(TrainConfig, {"epochs": "ten"})
    with pytest.raises(TypeError, match="'amp' must be bool"):
        from_dict(TrainConfig, {"amp": 1})


def test_bad_choice_and_range():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="k"):
        SplitConfig(k=1)
    # patience 0 returned the untrained model; a negative step turns group DRO's ascent into descent;
    # a carve above a half cannot be made of equal parts
    for bad in ({"patience": 0}, {"dro_eta": -0.1}, {"dro_eta": float("nan")}, {"val_fraction": 0.6}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_int_is_accepted_for_float_and_file_then_command_line(tmp_path):
    cfg = tmp_path / "x.toml"
    cfg.write_text("lr = 1\nepochs = 5\n")
    got = load_config(TrainConfig, cfg, ["epochs=7"])
    assert got.lr == 1.0 and isinstance(got.lr, float) and got.epochs == 7


def test_toml_round_trip_and_hash_is_stable():
    import tomllib

    cfg = TrainConfig(arch="variant1", lr=0.002)
    back = from_dict(TrainConfig, tomllib.loads(to_toml(to_dict(cfg))))
    assert back == cfg
    assert config_hash(cfg) == config_hash(back) != config_hash(TrainConfig())


def test_keys_added_later_leave_old_hashes_alone_until_used():
    # the hash that code before `width` and `mixup` gave this configuration (and wrote into results)
    assert config_hash({"train": to_dict(TrainConfig()), "split": to_dict(SplitConfig())}) == "404fbee76716"
    assert config_hash(TrainConfig(width=2.0)) != config_hash(TrainConfig())
    assert config_hash(TrainConfig(mixup=0.2)) != config_hash(TrainConfig())
    changes = ({}, {"erase": 0.5}, {"ema": 0.99}, {"adv_weight": 0.5}, {"init": __file__},
               {"stem_pool": False}, {"input_norm": "equalize"}, {"input_norm": "image"}, {"sam": 0.05},
               {"face_align": True})
    hashes = {config_hash(TrainConfig(**kw)) for kw in changes}
    assert len(hashes) == len(changes)
    # landmark_select changes nothing without the landmark model, so it never changes that hash; with it,
    # "blend" (what landmark runs did before the key existed) hashes as they did
    for select in ("blend", "network"):
        assert config_hash(TrainConfig(landmark_select=select)) == config_hash(TrainConfig())
    with_landmarks = to_dict(TrainConfig(landmark_weight=0.5))
    before = {k: v for k, v in with_landmarks.items() if k != "landmark_select"}
    assert config_hash({**with_landmarks, "landmark_select": "blend"}) == config_hash(before)
    assert config_hash({**with_landmarks, "landmark_select": "network"}) != config_hash(before)
    for bad in ({"width": float("inf")}, {"width": 0.0}, {"mixup": float("nan")}, {"mixup": -1.0},
                {"erase": 1.5}, {"erase": float("nan")}, {"ema": 1.0}, {"ema": -0.1},
                {"adv_weight": -1.0}, {"adv_weight": float("inf")}, {"input_norm": "per_image"},
                {"sam": -0.05}, {"sam": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_nested_keys_are_named_with_their_table_and_lists_are_called_lists():
    from study.experiment import ExperimentConfig
    from study.sweep_config import SweepExperiment

    unknown = r"cli: unknown config key 'search.num_sample'; known keys: \[.*'search.num_samples'"
    with pytest.raises(KeyError, match=unknown):
        from_dict(ExperimentConfig, {"search": {"num_sample": 3}}, "cli")
    with pytest.raises(TypeError, match=r"cli: key 'sweep.seeds' must be a list, e.g. \[1, 2\], got 0"):
        from_dict(SweepExperiment, {"sweep": {"seeds": 0}}, "cli")
