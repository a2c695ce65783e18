import pytest
from conftest import REPO

from train.autoencoder.config import TrainConfig, load_config, validate


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


# ------------------------------------------------------------------------- ranges of every key
from train.autoencoder.config import TRAIN_RANGES  # noqa: E402
from train.common.ranges import numeric_keys, within  # noqa: E402
from train.diffusion.config import LDM_RANGES, LDMConfig, load_ldm_config, validate_ldm  # noqa: E402

TRAINERS = {"train": (TrainConfig, TRAIN_RANGES), "train.ldm": (LDMConfig, LDM_RANGES)}


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_every_numeric_key_has_a_range(trainer):
    cls, ranges = TRAINERS[trainer]
    assert sorted(numeric_keys(cls)) == sorted(ranges)


def _outside(key: str, interval: str) -> str:
    """YAML for a value just outside ``interval``: below its lower end, above [1, 3], NaN where
    it is unbounded; a one-item list for list keys."""
    low = interval[1:-1].split(",")[0]
    value = ".nan" if low == "-inf" else "4" if interval == "[1, 3]" else \
        str(float(low) - 1 if interval[0] == "[" else float(low))
    if value not in (".nan",) and "." not in low and value.endswith(".0"):
        value = value[:-2]  # an int key takes an int
    if key == "optim.betas":
        return f"[{value}, 0.9]"  # two values, the first out of range
    return f"[{value}]" if key in ("mlp.hidden_sizes", "model.block_out_channels") else value


def _load(trainer, key, value):
    base = {"train": ["data.train=[imgs]"], "train.ldm": ["data.latents=lat"]}[trainer]
    if trainer == "train":
        return validate(load_config(None, [*base, f"{key}={value}"]))
    return validate_ldm(load_ldm_config(None, [*base, f"{key}={value}"]))


@pytest.mark.parametrize("trainer,key", [(t, k) for t, (_, r) in TRAINERS.items() for k in r])
def test_a_value_out_of_range_names_key_value_and_range(trainer, key):
    interval = TRAINERS[trainer][1][key]
    with pytest.raises(ValueError) as info:
        _load(trainer, key, _outside(key, interval))
    # the range's message, or (keys checked before ranges existed) one that also starts with the key
    message = str(info.value)
    assert message.startswith(key) and (message.endswith(f"valid values are in {interval}") or "must be" in message)


@pytest.mark.parametrize("key,value", [
    ("log_every", 0), ("val_every", -1), ("mlp.kl_anneal_ratio", 0), ("optim.lr", -1e-4), ("ema_decay", 1.5),
    ("loss.kl_weight", -1), ("optim.min_lr_ratio", 5), ("optim.warmup_steps", -5), ("mlp.beta", -1),
    ("scale_samples", 0),
])
def test_the_issues_values_are_refused_at_load_time(key, value):
    with pytest.raises(ValueError) as info:
        _load("train", key, value)
    assert str(info.value) in [f"{key}: {v!r} is out of range; valid values are in {TRAIN_RANGES[key]}"
                               for v in (value, float(value))]  # ints given for float keys read as floats


def test_intervals():
    assert within(0, "[0, 1)") and not within(1, "[0, 1)") and not within(0, "(0, inf)")
    assert within(1e9, "(0, inf)") and not within(float("nan"), "(-inf, inf)") and within(1, "[0, 1]")


def test_shipped_configs_load_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/tiny.yaml", ["data.train=[x]"]).max_steps == load_config("tiny", []).max_steps
    with pytest.raises(FileNotFoundError, match=r"nope.yaml: no such config file \(shipped configs: \[.*'tiny'"):
        load_config("nope.yaml", [])
