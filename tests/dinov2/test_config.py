"""Config loading: official key names, override files, dot-list overrides, one-line errors naming the key."""

import pytest
import yaml

from dinov2.config import DEFAULT_CONFIG_PATH, ConfigError, TrainConfig, load_config, save_config, scaled_lr


def test_defaults_equal_official_values():
    cfg = load_config()
    assert isinstance(cfg, TrainConfig)
    assert cfg.student.arch == "vit_large" and cfg.student.patch_size == 16
    assert cfg.dino.koleo_loss_weight == 0.1 and cfg.dino.head_n_prototypes == 65536
    assert cfg.optim.base_lr == 0.004 and cfg.optim.layerwise_decay == 0.9
    assert cfg.crops.global_crops_size == 224 and cfg.crops.local_crops_number == 8
    assert cfg.compute_precision.student.dino_head.mixed_precision.reduce_dtype == "fp32"
    assert cfg.compute_precision.teacher.dino_head.mixed_precision.reduce_dtype == "fp16"
    assert cfg.max_iter == 100 * 1250


def test_yaml_defaults_file_matches_dataclass_defaults():
    # ssl_default.yaml is documentation users read: it must hold every key and the same values as the dataclasses.
    from omegaconf import OmegaConf

    file_values = OmegaConf.to_container(OmegaConf.load(DEFAULT_CONFIG_PATH))
    code_values = OmegaConf.to_container(OmegaConf.structured(TrainConfig))
    assert file_values == code_values


def test_official_override_file_loads_unchanged(tmp_path):
    official_vitl14 = {
        "dino": {"head_n_prototypes": 131072, "head_bottleneck_dim": 384},
        "ibot": {"separate_head": True, "head_n_prototypes": 131072},
        "train": {"batch_size_per_gpu": 32, "dataset_path": "ImageNet22k", "centering": "sinkhorn_knopp"},
        "student": {"arch": "vit_large", "patch_size": 14, "drop_path_rate": 0.4, "ffn_layer": "swiglufused",
                    "block_chunks": 4},
        "teacher": {"momentum_teacher": 0.994},
        "optim": {"epochs": 500, "weight_decay_end": 0.2, "base_lr": 2.0e-04, "warmup_epochs": 80,
                  "layerwise_decay": 1.0},
        "crops": {"local_crops_size": 98},
    }
    path = tmp_path / "vitl14.yaml"
    path.write_text(yaml.safe_dump(official_vitl14))
    cfg = load_config(path)
    assert cfg.student.ffn_layer == "swiglufused" and cfg.train.centering == "sinkhorn_knopp"
    assert cfg.crops.local_crops_size == 98 and cfg.ibot.separate_head
    # lr scaling rule: 2e-4 * sqrt(32 * 96 / 1024) = 3.464e-4
    assert scaled_lr(cfg.optim, total_batch=cfg.train.batch_size_per_gpu * 96) == pytest.approx(3.464e-4, rel=1e-3)


def test_dotlist_overrides_win_over_file(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text("train:\n  batch_size_per_gpu: 32\n")
    cfg = load_config(path, ["train.batch_size_per_gpu=8", "crops.global_crops_scale=[0.4,1.0]"])
    assert cfg.train.batch_size_per_gpu == 8
    assert cfg.crops.global_crops_scale == [0.4, 1.0]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["student.archh=vit_small"], "student.archh"),
        (["train.batch_size_per_gpu=abc"], "train.batch_size_per_gpu"),
        (["train.centering=softmax"], "train.centering"),
        (["crops.global_crops_size=225", "student.patch_size=14"], "crops.global_crops_size"),
        (["optim.scaling_rule=cubic"], "optim.scaling_rule"),
        (["optim.epochs=5", "optim.warmup_epochs=6"], "optim.warmup_epochs"),
        (["train.loss_spike_window=2"], "train.loss_spike_window"),
        (["train.loss_spike_threshold=-1"], "train.loss_spike_threshold"),
        (["compute_precision.student.backbone.mixed_precision.param_dtype=fp8"], "param_dtype"),
        (["ibot.mask_sample_probability=1.5"], "ibot.mask_sample_probability"),
    ],
)
def test_bad_keys_give_one_line_errors_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert key in message
    assert "\n" not in message


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  base_lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.base_lrr"):
        load_config(path)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["student.arch=vit_small", "train.seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
