import pytest

from fedunlearn.config import config_from_dict, load_config
from fedunlearn.errors import FedUnlearnError


def test_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nname = "ncf"\ndim = 16\n[train]\nrounds = 7\n')
    config = load_config(path, ["train.rounds=3", "eval.ks=[1,10]", "data.min_rating=4"])
    assert (config.model.name, config.model.dim, config.train.rounds) == ("ncf", 16, 3)
    assert config.eval.ks == [1, 10]
    assert config.data.min_rating == 4.0


def test_round_trip_through_dict():
    config = load_config(None, ["model.name=ncf", "train.fraction=0.25"])
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.fraction=0", "train.fraction must be in (0, 1]"),
        ("train.fraction=1.5", "train.fraction must be in (0, 1]"),
        ("model.name=svd", "model.name = 'svd' is not valid"),
        ("train.rounds=two", "train.rounds must be a whole number"),
        ("train.rounds=0", "train.rounds must be > 0"),
        ("nosuch.key=1", "unknown config key 'nosuch.key'"),
        ("train.nosuch=1", "unknown config key 'train.nosuch'"),
        ("train.rounds", "--set expects key=value"),
        ("data.dataset=netflix", "data.dataset = 'netflix' is not valid"),
    ],
)
def test_invalid_values_give_one_line_errors(override, message):
    with pytest.raises(FedUnlearnError) as err:
        load_config(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FedUnlearnError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nrounds = 1\n")
    with pytest.raises(FedUnlearnError, match="not valid TOML"):
        load_config(bad)


def test_a_validated_config_is_frozen_and_derive_makes_a_checked_copy():
    from fedunlearn.config import derive

    config = load_config(None, ["run.seed=3"])
    with pytest.raises(FedUnlearnError, match="frozen after validation"):
        config.model.dim = 8
    changed = derive(config, {"model.dim": 8})
    assert (changed.model.dim, changed.run.seed, config.model.dim) == (8, 3, 32)
    with pytest.raises(FedUnlearnError, match="frozen after validation"):
        changed.model.dim = 16
    with pytest.raises(FedUnlearnError, match="model.dim must be > 0"):
        derive(config, {"model.dim": 0})


def test_a_list_given_with_spaces_after_its_commas_reads_as_the_names():
    config = load_config(None, ["audit.attackers=[mlp, xgboost]", "eval.ks=[5, 10]"])
    assert config.audit.attackers == ["mlp", "xgboost"] and config.eval.ks == [5, 10]
