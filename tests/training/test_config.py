"""Tests for training.config: schema checks, type coercion, YAML round trips, shipped configs."""

import dataclasses

import pytest
import yaml

from training.config import (
    SHIPPED_CONFIGS,
    ConfigError,
    ExperimentConfig,
    ImageTowerConfig,
    LossConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    save_config,
    to_dict,
)


def shipped(name: str):
    path = SHIPPED_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        pytest.skip(f"shipped config {path} is missing")
    return path


def assert_all_known_keys_listed(message: str, cls) -> None:
    for f in dataclasses.fields(cls):
        assert repr(f.name) in message, (f.name, message)


# --------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("name", ["fast", "full"])
def test_shipped_config_loads(name):
    path = shipped(name)
    config = load_config(name)
    assert isinstance(config, ExperimentConfig)
    assert config == load_config(path)  # by name and by path alike
    assert config.train.bits > 0 and config.train.epochs > 0 and config.train.batch_size > 0
    assert set(config.loss.weights) <= set(LossConfig().weights)
    assert isinstance(config.image.head_hidden, tuple)
    assert isinstance(config.image.mean, tuple) and len(config.image.mean) == 3
    # the YAML file itself has no stray keys at the top level
    assert set(yaml.safe_load(path.read_text())) <= {f.name for f in dataclasses.fields(ExperimentConfig)}


def test_shipped_configs_differ():
    shipped("fast")
    shipped("full")
    assert load_config("fast") != load_config("full")


def test_unknown_name_lists_shipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so the name cannot resolve to a file in the working directory
    with pytest.raises(FileNotFoundError) as info:
        load_config("no_such_config")
    message = str(info.value)
    assert "no_such_config" in message
    for path in SHIPPED_CONFIGS.glob("*.yaml"):
        assert repr(path.stem) in message
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "absent.yaml")


# --------------------------------------------------------------------------- defaults and dicts


def test_empty_dict_gives_defaults():
    assert config_from_dict({}) == ExperimentConfig()
    assert config_from_dict(None) == ExperimentConfig()


def test_partial_override_keeps_other_defaults():
    config = config_from_dict({"name": "x", "train": {"bits": 32}, "image": {"image_size": 224}})
    assert config.name == "x"
    assert config.train.bits == 32
    assert config.train.epochs == TrainConfig().epochs
    assert config.image.image_size == 224
    assert config.image.backbone == ImageTowerConfig().backbone
    assert config.text == ExperimentConfig().text


def test_default_loss_weights_not_shared():
    a, b = LossConfig(), LossConfig()
    a.weights["margin"] = 9.0
    assert b.weights["margin"] == 0.5


# --------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"trian": {"bits": 32}})
    message = str(info.value)
    assert "'trian'" in message
    assert_all_known_keys_listed(message, ExperimentConfig)


def test_unknown_nested_key():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"train": {"epochz": 3}})
    message = str(info.value)
    assert "config.train" in message
    assert "'epochz'" in message
    assert_all_known_keys_listed(message, TrainConfig)


def test_unknown_key_in_image_section():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"image": {"backbone": "x", "img_size": 224}})
    assert "config.image" in str(info.value) and "'img_size'" in str(info.value)
    assert_all_known_keys_listed(str(info.value), ImageTowerConfig)


def test_unknown_loss_term():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"loss": {"weights": {"hash_proxy": 1.0, "hashproxy": 1.0}}})
    message = str(info.value)
    assert "loss.weights" in message and "'hashproxy'" in message
    for term in LossConfig().weights:
        assert repr(term) in message


def test_subset_of_loss_terms_accepted():
    config = config_from_dict({"loss": {"weights": {"hash_proxy": 2, "quantization": 0.0}}})
    assert config.loss.weights == {"hash_proxy": 2, "quantization": 0.0}


@pytest.mark.parametrize("section", ["image", "text", "loss", "train", "tracking"])
@pytest.mark.parametrize("value", [3, "fast", [1, 2], None])
def test_section_not_a_mapping(section, value):
    with pytest.raises(ConfigError, match=f"config.{section}.*expected a mapping"):
        config_from_dict({section: value})


def test_top_level_not_a_mapping():
    with pytest.raises(ConfigError, match="expected a mapping"):
        config_from_dict(["train"])


# --------------------------------------------------------------------------- types


@pytest.mark.parametrize(
    "data, where",
    [
        ({"train": {"epochs": "60"}}, "config.train.epochs"),
        ({"train": {"bits": 64.0}}, "config.train.bits"),
        ({"train": {"bits": True}}, "config.train.bits"),
        ({"train": {"epochs": False}}, "config.train.epochs"),
        ({"train": {"lr": "1e-3"}}, "config.train.lr"),  # PyYAML reads 1e-3 as a string
        ({"train": {"lr": True}}, "config.train.lr"),
        ({"text": {"freeze_encoder": 1}}, "config.text.freeze_encoder"),
        ({"text": {"freeze_encoder": "yes"}}, "config.text.freeze_encoder"),
        ({"train": {"device": None}}, "config.train.device"),
        ({"name": 5}, "config.name"),
        ({"image": {"image_size": None}}, "config.image.image_size"),
        ({"image": {"head_hidden": 1024}}, "config.image.head_hidden"),
        ({"image": {"mean": "0.5"}}, "config.image.mean"),
        ({"loss": {"weights": [["margin", 1.0]]}}, "config.loss.weights"),
        ({"loss": {"margin": "0.2"}}, "config.loss.margin"),
    ],
)
def test_wrong_types(data, where):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert where in str(info.value)


def test_int_accepted_for_float():
    config = config_from_dict({"train": {"lr": 1, "feature_noise": 0}, "loss": {"margin": 2}})
    assert config.train.lr == 1.0 and type(config.train.lr) is float
    assert type(config.train.feature_noise) is float
    assert type(config.loss.margin) is float


def test_float_and_bool_values_kept():
    config = config_from_dict({"train": {"lr": 0.5}, "text": {"freeze_encoder": False}, "image": {"freeze_backbone": False}})
    assert config.train.lr == 0.5
    assert config.text.freeze_encoder is False
    assert config.image.freeze_backbone is False


def test_lists_become_tuples():
    config = config_from_dict(
        {"image": {"head_hidden": [256, 128], "mean": [0.1, 0.2, 0.3]}, "text": {"head_hidden": []}}
    )
    assert config.image.head_hidden == (256, 128)
    assert isinstance(config.image.head_hidden, tuple)
    assert config.image.mean == (0.1, 0.2, 0.3)
    assert config.text.head_hidden == ()


# --------------------------------------------------------------------------- round trips


def custom_config() -> ExperimentConfig:
    return config_from_dict(
        {
            "name": "custom",
            "image": {"head_hidden": [64], "mean": [0.4, 0.5, 0.6], "freeze_backbone": False},
            "text": {"max_length": 32},
            "loss": {"weights": {"hash_proxy": 1.5, "contrastive": 0.0}, "margin": 0.3},
            "train": {"bits": 16, "lr": 0.01, "ema_decay": 0.9, "device": "cpu"},
        }
    )


def test_to_dict_is_plain_data():
    data = to_dict(custom_config())
    assert data["image"]["head_hidden"] == [64]
    assert data["image"]["mean"] == [0.4, 0.5, 0.6]
    assert data["loss"]["weights"] == {"hash_proxy": 1.5, "contrastive": 0.0}
    assert data["train"]["bits"] == 16
    # nothing but YAML-safe builtins anywhere

    def walk(v):
        if isinstance(v, dict):
            assert all(isinstance(k, str) for k in v)
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        else:
            assert isinstance(v, (str, int, float, bool, type(None))), v

    walk(data)
    assert config_from_dict(data) == custom_config()


@pytest.mark.parametrize("make", [ExperimentConfig, custom_config], ids=["defaults", "custom"])
def test_save_load_round_trip(tmp_path, make):
    config = make()
    path = tmp_path / "run" / "config.yaml"
    path.parent.mkdir()
    save_config(config, path)
    loaded = load_config(path)
    assert loaded == config
    assert isinstance(loaded.image.head_hidden, tuple)
    assert yaml.safe_load(path.read_text()) == to_dict(config)
    # a string path works too
    assert load_config(str(path)) == config


def test_shipped_round_trip(tmp_path):
    shipped("full")
    config = load_config("full")
    save_config(config, tmp_path / "full.yaml")
    assert load_config(tmp_path / "full.yaml") == config


# --------------------------------------------------------------------------- file errors


def test_invalid_yaml_names_path(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  bits: [64\n  epochs: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "not valid YAML" in str(info.value)


def test_schema_error_in_file_names_path(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "'epochz'" in message


def test_yaml_scalar_document(tmp_path):
    path = tmp_path / "scalar.yaml"
    path.write_text("just a string\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)


def test_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(path) == ExperimentConfig()




@pytest.mark.parametrize(
    "data",
    [
        {"image": {"head_hidden": ["a"]}},
        {"image": {"mean": [0.5]}},
        {"loss": {"weights": {"margin": "x"}}},
    ],
    ids=["tuple-element-str", "fixed-tuple-length", "weight-str"],
)
def test_element_types_checked(data):
    with pytest.raises(ConfigError):
        config_from_dict(data)
