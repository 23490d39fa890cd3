"""Recipes and overrides: validation messages name the key and the closest valid names."""
import pytest

from deepmetric.config import ConfigError, apply_overrides, load_config, save_config


def test_overrides_parse_yaml_scalars_and_address_lists(tmp_path):
    cfg = load_config(None, ["train.max_steps=7", "model.embedding_dim=128", "model.pretrained=null",
                             "losses.0.params.margin=0.2", "eval.ks=[1, 5]"])
    assert cfg.train.max_steps == 7 and cfg.model.embedding_dim == 128 and cfg.model.pretrained is None
    assert cfg.losses[0].params["margin"] == 0.2 and cfg.eval.ks == [1, 5]


def test_recipe_file_then_overrides_and_round_trip(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\ntrain: {max_steps: 3}\nlosses: [{name: arcface, params: {scale: 30}}]\n")
    cfg = load_config(p, ["train.max_steps=9"])
    assert cfg.name == "x" and cfg.train.max_steps == 9 and cfg.losses[0].name == "arcface"
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run") == cfg  # a run directory loads its resolved config


@pytest.mark.parametrize("override, message", [
    ("train.max_step=3", "unknown config key 'train.max_step'; did you mean 'max_steps'?"),
    ("dta.root=/x", "unknown config key 'dta'; did you mean 'data'"),
    ("train.max_steps=abc", "config key 'train.max_steps': input should be a valid integer"),
    ("train.max_steps=0", "config key 'train.max_steps': input should be greater than or equal to 1"),
    ("model.pooling=sum", "config key 'model.pooling': input should be 'avg', 'max', 'gem' or 'avgmax'"),
    ("data.sampler=balanced", "config key 'data.sampler': input should be 'pk' or 'random'"),
    ("data.batch_size=0", "config key 'data.batch_size': input should be greater than or equal to 1"),
    ("train.freeze_backbone_steps=-1", "config key 'train.freeze_backbone_steps': input should be greater than"),
    ("train.grad_clip_value=-1", "config key 'train.grad_clip_value': input should be greater than or equal to 0"),
    ("optimizer.param_groups=[{match: x, lrr: 1}]", "unknown config key 'optimizer.param_groups.0.lrr'; did you mean 'lr'?"),
    ("losses.4.name=x", "'losses.4': list index 4 out of range"),
    ("train", "override 'train' is not key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_and_missing_file_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {max_steps: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(bad)


def test_apply_overrides_does_not_mutate_its_input():
    raw = {"train": {"max_steps": 1}}
    out = apply_overrides(raw, ["train.max_steps=2"])
    assert raw["train"]["max_steps"] == 1 and out["train"]["max_steps"] == 2


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(Exception):
        cfg.train.max_steps = 5


def test_amp_off_from_the_command_line_is_not_yaml_false():
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    assert load_config(None, ["train.amp=bf16"]).train.amp == "bf16"
