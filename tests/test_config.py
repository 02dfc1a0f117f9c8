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


# ---- switching a named choice by --set (issue 13) -----------------------------------------------
def test_switching_the_teacher_method_drops_the_old_methods_options_with_a_note():
    notes = []
    cfg = load_config(None, ["teacher.method=standard"], notes=notes)
    assert cfg.teacher.options == {}
    assert notes == ["teacher.method is now 'standard' (was 'soteacher'): dropped teacher.options "
                     "lipschitz_weight, consistency_weight, consistency_schedule, which it does "
                     "not take"]
    validate(cfg)


def test_switching_the_dataset_and_the_distiller():
    notes = []
    cfg = load_config(None, ["data.name=cifar100", "distill.method=dkd"], notes=notes)
    assert cfg.data.options == {}
    assert notes[0].startswith("data.name is now 'cifar100' (was 'known_truth'): dropped "
                               "data.options num_classes, input_shape, num_train, num_test, seed")
    # options the new distiller takes are kept, and the note says so
    assert cfg.distill.options == {"temperature": 4.0, "ce_weight": 0.5}
    assert notes[1] == ("distill.method is now 'dkd' (was 'kd'): dropped distill.options "
                        "kl_weight, which it does not take; kept temperature=4.0, "
                        "ce_weight=0.5, which it takes (--set distill.options={} for its "
                        "defaults)")
    validate(cfg, ("distill",))


def test_an_option_set_explicitly_is_kept_and_still_checked():
    for order in (["teacher.method=standard", "teacher.options.lipschitz_weight=1e-5"],
                  ["teacher.options.lipschitz_weight=1e-5", "teacher.method=standard"]):
        notes = []
        cfg = load_config(None, order, notes=notes)
        assert cfg.teacher.options == {"lipschitz_weight": 1e-5}
        assert "consistency_weight" in notes[0] and "lipschitz_weight" not in notes[0]
        with pytest.raises(ConfigError, match="unknown option.*'lipschitz_weight' for teacher "
                                              "method 'standard'"):
            validate(cfg)
    # a whole options mapping given with the switch is taken as it is, without a note
    notes = []
    cfg = load_config(None, ["teacher.method=standard", "teacher.options={label_smoothing: 0.1}"],
                      notes=notes)
    assert cfg.teacher.options == {"label_smoothing": 0.1} and notes == []
    # no switch, nothing touched; without a notes list the note is a warning
    assert load_config(None, ["teacher.method=soteacher"], notes=notes).teacher.options
    assert notes == []
    with pytest.warns(UserWarning, match="dropped teacher.model.options widths"):
        cfg = apply_overrides(load_config(), ["teacher.model.name=resnet8"])
    assert cfg.teacher.model.options == {}


def test_runtime_keys_are_not_stored_with_a_run():
    cfg = apply_overrides(load_config(), ["threads=2", "logging.tensorboard=true"])
    assert cfg.threads == 2 and cfg.logging.tensorboard
    assert "threads" not in config_to_dict(cfg) and "logging" not in config_to_dict(cfg)
    assert config_to_dict(cfg, runtime=True)["threads"] == 2
    with pytest.raises(ConfigError, match="threads must be >= 1"):
        validate(apply_overrides(load_config(), ["threads=0"]))
