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


def test_subset_of_loss_terms_merges_with_the_defaults():
    config = config_from_dict({"loss": {"weights": {"hash_proxy": 2, "quantization": 0.0}}})
    # The named terms change; the others keep their default weights instead of being turned off.
    assert config.loss.weights == {**LossConfig().weights, "hash_proxy": 2.0, "quantization": 0.0}


def test_partial_loss_weights_in_a_yaml_file_keep_the_other_terms_on(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("loss:\n  weights:\n    margin: 2.0\n")
    weights = load_config(path).loss.weights
    assert weights["margin"] == 2.0
    assert {k: v for k, v in weights.items() if k != "margin"} == {
        k: v for k, v in LossConfig().weights.items() if k != "margin"}
    assert all(weights[k] > 0 for k in ("hash_proxy", "contrastive", "alignment"))


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
    assert data["loss"]["weights"] == {**LossConfig().weights, "hash_proxy": 1.5, "contrastive": 0.0}
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


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    "data, where, why",
    [
        ({"train": {"bits": 12}}, "config.train.bits", "multiple of 8"),
        ({"train": {"bits": 0}}, "config.train.bits", "multiple of 8"),
        ({"train": {"bits": 1032}}, "config.train.bits", "between 8 and 1024"),
        ({"train": {"epochs": 0}}, "config.train.epochs", ">= 1"),
        ({"train": {"batch_size": 1}}, "config.train.batch_size", ">= 2"),
        ({"train": {"eval_every": 0}}, "config.train.eval_every", ">= 1"),
        ({"train": {"lr": 0.0}}, "config.train.lr", "> 0"),
        ({"train": {"weight_decay": -1e-4}}, "config.train.weight_decay", ">= 0"),
        ({"train": {"warmup_epochs": -1}}, "config.train.warmup_epochs", ">= 0"),
        ({"train": {"feature_noise": -0.1}}, "config.train.feature_noise", ">= 0"),
        ({"train": {"ema_decay": 1.0}}, "config.train.ema_decay", "< 1"),
        ({"train": {"seed": -1}}, "config.train.seed", ">= 0"),
        ({"train": {"views": [0, 8]}}, "config.train.views[1]", "< 8"),
        ({"train": {"views": []}}, "config.train.views", "empty"),
        ({"train": {"device": "gpu"}}, "config.train.device", "unknown 'gpu'"),
        ({"train": {"schedule": "sometimes"}}, "config.train.schedule", "unknown 'sometimes'"),
        ({"train": {"snapshot_every": 0}}, "config.train.snapshot_every", ">= 1"),
        ({"loss": {"proxy_temperature": 0}}, "config.loss.proxy_temperature", "> 0"),
        ({"loss": {"contrastive_temperature": -0.07}}, "config.loss.contrastive_temperature", "> 0"),
        ({"loss": {"image_grad_from_text": 1.5}}, "config.loss.image_grad_from_text", "<= 1"),
        ({"loss": {"caption_relatedness": 1.2}}, "config.loss.caption_relatedness", "<= 1"),
        ({"loss": {"weights": {"margin": -0.5}}}, "config.loss.weights.margin", ">= 0"),
        ({"image": {"dropout": 1.0}}, "config.image.dropout", "< 1"),
        ({"image": {"std": [0.5, 0.0, 0.5]}}, "config.image.std[1]", "> 0"),
        ({"image": {"head_hidden": [64, 0]}}, "config.image.head_hidden[1]", ">= 1"),
        ({"image": {"encode_views": [-1]}}, "config.image.encode_views[0]", ">= 0"),
        ({"text": {"max_length": 0}}, "config.text.max_length", ">= 1"),
        ({"distributed": {"num_workers": -1}}, "config.distributed.num_workers", ">= 0"),
        ({"distributed": {"cpus_per_worker": 0}}, "config.distributed.cpus_per_worker", "> 0"),
        ({"distributed": {"text_workers": 0}}, "config.distributed.text_workers", ">= 1"),
        ({"tracking": {"pue": 0.9}}, "config.tracking.pue", ">= 1"),
        ({"name": ""}, "config.name", "empty"),
    ],
)
def test_values_out_of_range(data, where, why):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert str(info.value).startswith(f"{where}: ") and why in str(info.value)


def test_bits_follow_the_serving_rule():
    from serving.model.codes import MAX_BITS, MIN_BITS, validate_bits

    for bits in range(0, MAX_BITS + 16, 4):
        try:
            validate_bits(bits)
        except ValueError:
            with pytest.raises(ConfigError, match="config.train.bits"):
                config_from_dict({"train": {"bits": bits}})
        else:
            assert config_from_dict({"train": {"bits": bits}}).train.bits == bits
    assert config_from_dict({"train": {"bits": MIN_BITS}}).train.bits == MIN_BITS


def test_another_code_length_keeps_the_instance_share_of_a_split_code():
    from training.config import check, load_config, set_bits

    shipped = load_config("fast_split")
    share = shipped.loss.instance_bits / shipped.train.bits
    for bits in (8, 16, 32, 64, 128, 256):
        config = set_bits(load_config("fast_split"), bits)
        check(config)
        assert config.train.bits == bits
        assert 1 <= config.loss.instance_bits < bits
        assert abs(config.loss.instance_bits - share * bits) <= 1  # the same share, rounded
    assert set_bits(load_config("fast"), 16).loss.instance_bits == 0  # an undivided code stays undivided
    with pytest.raises(ConfigError, match="config.train.bits: bits must be a multiple of 8"):
        set_bits(load_config("fast_split"), 20)


def test_out_of_range_value_in_a_file_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "hot.yaml"
    path.write_text("loss:\n  contrastive_temperature: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: config.loss.contrastive_temperature: must be > 0")


def test_check_catches_values_changed_in_place():
    from training.config import check

    config = ExperimentConfig()
    check(config)  # the defaults are valid
    config.train.bits = 20
    with pytest.raises(ConfigError, match="config.train.bits"):
        check(config)


def test_command_line_overrides_are_checked_like_the_file(tmp_path, capsys):
    from cluster.cli.main import main

    config_file = tmp_path / "ok.yaml"
    config_file.write_text("train:\n  epochs: 1\n")
    args = ["train", "--config", str(config_file), "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    assert main(args + ["--bits", "12"]) == 2
    assert "config.train.bits" in capsys.readouterr().err
    assert main(args + ["--workers", "-1"]) == 2
    assert "config.distributed.num_workers: must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing started


# --------------------------------------------------------------------------- distillation config


def test_shipped_distill_config_loads():
    from training.distill_job import load_config_for_cli
    from training.students import DistillConfig

    config = load_config_for_cli("default")
    assert isinstance(config, DistillConfig) and config.students == ("image", "text")
    assert isinstance(config.image.views, tuple)


def test_partial_distill_loss_weights_merge_with_the_defaults(tmp_path):
    from training.students import DistillLossConfig, load_distill_config

    path = tmp_path / "students.yaml"
    path.write_text("loss:\n  weights:\n    similarity: 0.5\n")
    assert load_distill_config(path).loss.weights == {**DistillLossConfig().weights, "similarity": 0.5}


@pytest.mark.parametrize(
    "data, where",
    [
        ({"students": []}, "distill.students"),
        ({"students": ["image", "audio"]}, "distill.students[1]"),
        ({"eval_every": 0}, "distill.eval_every"),
        ({"seed": -3}, "distill.seed"),
        ({"warmup_epochs": -1}, "distill.warmup_epochs"),
        ({"device": "tpu"}, "distill.device"),
        ({"image": {"epochs": 0}}, "distill.image.epochs"),
        ({"image": {"batch_size": 1}}, "distill.image.batch_size"),
        ({"image": {"views": [9]}}, "distill.image.views[0]"),
        ({"image": {"lr": 0}}, "distill.image.lr"),
        ({"text": {"num_layers": 0}}, "distill.text.num_layers"),
        ({"text": {"dropout": 1.5}}, "distill.text.dropout"),
        ({"loss": {"quantization_sigma": 0}}, "distill.loss.quantization_sigma"),
        ({"loss": {"weights": {"cosine": -1}}}, "distill.loss.weights.cosine"),
        ({"distributed": {"max_failures": -1}}, "distill.distributed.max_failures"),
    ],
)
def test_distill_values_out_of_range(data, where):
    from training.students import distill_config_from_dict

    with pytest.raises(ConfigError) as info:
        distill_config_from_dict(data)
    assert str(info.value).startswith(f"{where}: ")


def test_distill_unknown_key_names_the_key_and_the_file(tmp_path):
    from training.students import load_distill_config

    path = tmp_path / "students.yaml"
    path.write_text("image:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as info:
        load_distill_config(path)
    assert str(path) in str(info.value) and "'epoch'" in str(info.value) and "distill.image" in str(info.value)


def test_distill_has_no_skip_bad_images_option(capsys):
    from cluster.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--teacher", "x", "--skip-bad-images"])
    assert "--skip-bad-images" in capsys.readouterr().err
    assert build_parser().parse_args(["train", "--config", "fast", "--skip-bad-images"]).skip_bad_images
