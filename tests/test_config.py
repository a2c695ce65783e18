import pytest
from conftest import REPO

from train.config import TrainConfig, load_config, validate


def test_defaults_yaml_and_overrides(tmp_path):
    assert load_config() == TrainConfig()
    y = tmp_path / "c.yaml"
    y.write_text("model: {preset: small}\noptim: {lr: 3.0e-4}\n")
    cfg = load_config(y, ["optim.lr=1e-3", "data.train=/x", "loss.disc_weight=0.5", "optim.disc_lr=null"])
    assert cfg.model.preset == "small"
    assert cfg.optim.lr == 1e-3  # "1e-3" is a string to YAML 1.1; still a float here
    assert cfg.data.train == ["/x"] and cfg.loss.disc_weight == 0.5 and cfg.optim.disc_lr is None
    assert cfg.loss.kl_weight == 1e-6  # untouched default from code


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ValueError, match=r"optim\.lrr.*valid keys: \[.*'lr'"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, ["bogus=1"])


def test_wrong_types_are_errors():
    with pytest.raises(ValueError, match="max_steps: expected int"):
        load_config(None, ["max_steps=lots"])
    with pytest.raises(ValueError, match="expects key=value"):
        load_config(None, ["max_steps"])


def test_validate_catches_bad_choices():
    cfg = load_config(None, ["data.train=/x", "loss.reconstruction=l3"])
    with pytest.raises(ValueError, match="choose from"):
        validate(cfg)
    with pytest.raises(ValueError, match="multiple of 8"):
        validate(load_config(None, ["data.train=/x", "data.crop_size=100"]))
    with pytest.raises(ValueError, match="data.train is empty"):
        validate(load_config())


@pytest.mark.parametrize("name", ["tiny", "small", "sd-kl-f8"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml", ["data.train=/x"])
    validate(cfg)
    assert cfg.model.preset == name


def test_shipped_distill_config_loads():
    cfg = load_config(REPO / "configs" / "distill.yaml",
                      ["data.train=/x", "distill.teacher=/t", "model.kind=autoencoder-tiny"])
    validate(cfg)
    assert cfg.distill.student == "taesd" and cfg.distill.train == "both"
