"""Config tree: presets load, overrides are typed and strict, impossible combinations are refused."""

import pytest

from tinylm.config import ConfigError, list_presets, load_config, load_config_file


def test_every_preset_loads_and_validates():
    presets = list_presets()
    assert {"tiny", "gpt2-124m", "tinystories-15m", "llama-75m"} <= set(presets)
    for name in presets:
        load_config(name)


def test_dotted_overrides_are_parsed_as_typed_values():
    cfg = load_config(
        "tiny", ["train.max_steps=7", "optim.lr=3e-4", "model.qk_norm=true", "data.train=x.txt"]
    )
    assert cfg.train.max_steps == 7
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.qk_norm is True
    assert cfg.data.train == "x.txt"


def test_override_of_nullable_field_and_list_of_sections():
    cfg = load_config(
        None, ["model.n_kv_head=2", "data.mix=[{path: a.txt, weight: 0.2}, {path: b.txt}]"]
    )
    assert cfg.model.n_kv_head == 2
    assert [(m.path, m.weight) for m in cfg.data.mix] == [("a.txt", 0.2), ("b.txt", 1.0)]
    cfg = load_config(None, ["model.n_kv_head=null"])
    assert cfg.model.n_kv_head is None


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.n_layerz=3", "unknown config key 'model.n_layerz'"),
        ("modle.n_layer=3", "unknown config key 'modle'"),
        ("train.max_steps=abc", "train.max_steps: expected an integer"),
        ("train.max_steps=1.5", "train.max_steps: expected an integer"),
        ("model.qk_norm=3", "model.qk_norm: expected true or false"),
        ("model.norm=batchnorm", "model.norm: must be one of"),
        ("model.n_head=3", "model.n_head=3 must divide model.d_model=128"),
        ("model.n_kv_head=3", "model.n_kv_head=3 must divide model.n_head=4"),
        ("optim.min_lr=1.0", "optim.min_lr=1.0 must be in [0, optim.lr"),
        ("data.val_fraction=1.5", "data.val_fraction=1.5 is out of range"),
        ("train.max_steps", "not of the form section.key=value"),
    ],
)
def test_config_errors_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        load_config("tiny", [override])
    assert fragment in str(info.value)


def test_missing_config_file_and_unknown_preset():
    with pytest.raises(ConfigError, match="not found"):
        load_config("does/not/exist.yaml")
    with pytest.raises(ConfigError, match=r"Presets: .*tiny"):
        load_config("no-such-preset")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("llama-75m", ["train.max_steps=11"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config_file(path) == cfg


# ---- YAML with bounds (issue 21, item 4)


def test_yaml_alias_bomb_is_refused_at_once_everywhere(tmp_path):
    import time

    from test_bad_inputs import BOMB_FILE, BOMB_FLOW

    from tinylm.config import load_config_file
    from tinylm.yamlio import YAMLTooLarge, load

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB_FILE)
    t0 = time.perf_counter()
    for call in (
        lambda: load_config(str(bomb)),  # a config file
        lambda: load_config("tiny", [f"model.n_layer={BOMB_FLOW}"]),  # an override
        lambda: load_config_file(bomb),  # a run's config.yaml
    ):
        with pytest.raises(ConfigError, match="expand it to more than 100,000 values"):
            call()
    with pytest.raises(YAMLTooLarge, match="recursive alias"):
        load("&a [*a]")
    assert time.perf_counter() - t0 < 2.0
    # Aliases within the bound are fine: YAML's own feature, not refused as such.
    assert load("a: &x [1, 2]\nb: *x") == {"a": [1, 2], "b": [1, 2]}
    assert len(load("[" + ", ".join(["1"] * 50_000) + "]")) == 50_000


def test_values_in_error_messages_are_bounded():
    big = "[" + ", ".join(str(i) for i in range(5000)) + "]"
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [f"train.max_steps={big}"])
    assert "train.max_steps: expected an integer, got [0, 1, 2, 3, 4, 5, ...]" in str(e.value)
    assert len(str(e.value)) < 200
