"""Every numeric config field declares a domain, and `tinylm train` refuses values outside it.

The walk covers every numeric field of the config tree (a field added later is walked too), with
0, -1, NaN, +-infinity and a huge value, through the real CLI entry point: exit status 2, one
message naming the key, no traceback. A numeric field without a declared domain fails the first
test, so a new field cannot skip its range.
"""

from __future__ import annotations

import math

import pytest

from tinylm.cli import main
from tinylm.config import Config, ConfigError, load_config
from tinylm.domains import field_domain, numeric_fields_without_domain, numeric_kind, walk_fields

NUMERIC = [(key, f, numeric_kind(tp)) for key, f, tp in walk_fields(Config) if numeric_kind(tp)]
# Text as typed on the command line: YAML reads `.nan`/`.inf`; `nan`/`inf` arrive as strings
# that float fields parse and int fields refuse.
ALWAYS_BAD = ["-1", "nan", ".nan", "inf", ".inf", "-.inf", "1e30", "1" + "0" * 30]


def _override(key: str, text: str) -> str:
    """`data.mix[].weight` is set through a one-item mix list (`data.phases[].until` likewise)."""
    if "[]." in key:
        section, name = key.split("[].")
        item = "weights: [1, 1]" if section == "data.phases" else "path: a.txt"
        return f"{section}=[{{{item}, {name}: {text}}}]"
    return f"{key}={text}"


def _shown_key(key: str) -> str:
    return key.replace("[]", "[0]")


def test_every_numeric_field_declares_a_domain():
    assert len(NUMERIC) >= 45  # the walk below sees the whole tree, not an empty list
    assert numeric_fields_without_domain(Config) == []


@pytest.mark.parametrize("key", [k for k, _, _ in NUMERIC])
def test_out_of_domain_values_are_refused_by_the_cli(key, capsys):
    for text in ALWAYS_BAD:
        code = main(["train", "tiny", _override(key, text)])
        err = capsys.readouterr().err
        assert code == 2, (key, text, err)
        assert _shown_key(key) in err, (key, text, err)
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err  # one clear message


@pytest.mark.parametrize("key, f, kind", NUMERIC, ids=[k for k, _, _ in NUMERIC])
def test_zero_is_refused_exactly_when_outside_the_domain(key, f, kind):
    domain = field_domain(f)
    lower = domain.ge if domain.ge is not None else domain.gt
    zero_allowed = lower < 0 or (lower == 0 and domain.ge is not None)
    if zero_allowed:
        cfg = load_config("tiny", [_override(key, "0")])
        assert cfg is not None
    else:
        with pytest.raises(ConfigError, match=_shown_key(key).replace("[", r"\[")):
            load_config("tiny", [_override(key, "0")])


def test_domain_messages_name_key_range_and_value():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["train.batch_size=-4"])
    assert str(info.value) == (
        "train.batch_size=-4 is out of range (too small): must be an integer in [1, 65,536]"
    )
    with pytest.raises(ConfigError, match=r"optim.lr=nan .*not a finite number.*\(0, 10\]"):
        load_config("tiny", ["optim.lr=nan"])
    with pytest.raises(ConfigError, match=r"eval.batch_size=-1 .*\(0 = train.batch_size\)"):
        load_config("tiny", ["eval.batch_size=-1"])
    with pytest.raises(ConfigError, match=r"optim.decay_steps=-5 .*or null"):
        load_config("tiny", ["optim.decay_steps=-5"])


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.n_kv_head=3"], "model.n_kv_head=3 must divide model.n_head=4"),
        (["model.n_head=3"], "model.n_head=3 must divide model.d_model"),
        (["optim.lr=1e-4", "optim.min_lr=1e-3"], "optim.min_lr=0.001 must be in [0, optim.lr"),
        (["model.pos_emb=rope", "model.n_head=128"], "needs an even head dim"),
        (["model.n_kv_head=8"], "model.n_kv_head=8 must divide model.n_head=4"),
        (["data.train=", "data.mix=[]"], "data.train (or data.mix) must name a source"),
    ],
)
def test_relations_between_fields(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides)
    assert fragment in str(info.value)


@pytest.mark.parametrize("name", ["a/b", "../escape", "..", ".", "/abs", "x\\y", "' padded'"])
def test_run_name_is_one_directory_name(name):
    with pytest.raises(ConfigError, match="run_name"):
        load_config("tiny", [f"run_name={name}"])


def test_run_name_accepts_plain_names_and_out_dir_takes_paths():
    cfg = load_config("tiny", ["run_name=my-run_2.v1", "out_dir=../elsewhere/runs"])
    assert (cfg.run_name, cfg.out_dir) == ("my-run_2.v1", "../elsewhere/runs")


def test_nul_in_a_string_is_refused():
    with pytest.raises(ConfigError, match=r"data\.train: contains a NUL"):
        load_config("tiny", ["data.train=a\x00b"])


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("max_steps=5", "'train.max_steps'"),
        ("train.lr=1e-3", "'optim.lr'"),
        ("model.n_layerz=3", "'model.n_layer'"),
        ("modle.n_layer=3", "'model'"),
        ("train.warmup_step=3", "'optim.warmup_steps'"),
        ("checkpoint.intervall=3", "'checkpoint.interval'?"),
        ("data.mix=[{path: a, wieght: 2}]", "'data.mix[0].weight'"),
    ],
)
def test_unknown_keys_suggest_the_intended_one(override, suggestion):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [override])
    assert f"Did you mean {suggestion}" in str(info.value)


def test_unrelated_unknown_key_gets_no_suggestion():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["train.zzzqqq=1"])
    assert "Did you mean" not in str(info.value)


def test_preset_typo_and_config_path_typo(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'tiny'"):
        load_config("tiyn")
    (tmp_path / "mine.yaml").write_text("train: {max_steps: 3}\n")
    with pytest.raises(ConfigError, match=r"Did you mean '.*mine\.yaml'"):
        load_config(str(tmp_path / "mien.yaml"))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))


def test_values_inside_every_domain_load():
    cfg = load_config("tiny", ["eval.temperature=0", "optim.grad_clip=0", "eval.samples=0"])
    assert (cfg.eval.temperature, cfg.optim.grad_clip, cfg.eval.samples) == (0.0, 0.0, 0)
    assert math.isfinite(cfg.optim.lr)
