import pytest
import yaml

from soteacher.config import (Config, ConfigError, apply_overrides, config_to_dict, load_config,
                              validate)


def test_default_config_loads_and_validates():
    cfg = load_config()
    assert isinstance(cfg, Config)
    validate(cfg)


def test_unknown_top_level_key_lists_valid_ones(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seeed: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'seeed'; valid keys: seed, device, data"):
        load_config(p)


def test_unknown_nested_key_via_override():
    with pytest.raises(ConfigError, match=r"'teacher.train.lrr'.*valid keys under 'teacher.train': epochs"):
        apply_overrides(Config(), ["teacher.train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"'studnet'"):
        apply_overrides(Config(), ["studnet.train.epochs=3"])


def test_overrides_parse_yaml_values_and_types():
    cfg = apply_overrides(Config(), ["teacher.train.epochs=7", "teacher.train.lr=1e-2",
                                     "teacher.train.milestones=[2, 5]", "data.augment=false",
                                     "teacher.options.consistency_schedule=cosine"])
    assert cfg.teacher.train.epochs == 7 and cfg.teacher.train.lr == pytest.approx(0.01)
    assert cfg.teacher.train.milestones == [2, 5] and cfg.data.augment is False
    assert cfg.teacher.options == {"consistency_schedule": "cosine"}


@pytest.mark.parametrize("override,message", [
    ("teacher.train.epochs=ten", "must be an integer"),
    ("teacher.train.epochs=2.5", "must be an integer"),
    ("data.augment=maybe", "must be true or false"),
    ("teacher.train.lr=[1]", "must be a number"),
    ("seed", "must look like key=value"),
    ("seed.x=1", "is not a mapping"),
])
def test_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), [override])


@pytest.mark.parametrize("override,message", [
    ("data.name=cifar1000", "data.name: unknown dataset 'cifar1000'; available: .*known_truth"),
    ("teacher.model.name=resnet9000", "teacher.model.name: unknown model"),
    ("teacher.method=sotaecher", "teacher.method: unknown teacher method 'sotaecher'; available: .*soteacher"),
    ("distill.method=dk", "distill.method: unknown distiller 'dk'; available: .*kd"),
    ("teacher.options.lipshitz_weight=1", "unknown option.*'lipshitz_weight'.*valid options: lipschitz_weight"),
    ("distill.options.temp=2", "valid options: temperature, ce_weight, kl_weight"),
    ("data.options.num_trian=5", "valid options:.*num_train"),
    ("teacher.model.options.widht=3", "unknown option"),
    ("teacher.train.epochs=0", "teacher.train: epochs must be >= 1"),
    ("student.train.lr=-1", "student.train: lr must be"),
    ("teacher.train.schedule=exp", "unknown lr schedule 'exp'; available: step, cosine, constant"),
])
def test_validate_names_and_options(override, message):
    cfg = apply_overrides(load_config(), [override])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_resolved_config_round_trips(tmp_path):
    cfg = apply_overrides(load_config(), ["teacher.train.epochs=3", "seed=5"])
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(p) == cfg


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(p)
