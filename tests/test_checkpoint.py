"""Checkpoints: round trip, damage detection, fallback to the previous one, rotation policy."""

import json

import pytest
import torch

from tinylm.config import CheckpointConfig, load_config
from tinylm.model import GPT
from tinylm.tokenizer import CharTokenizer
from tinylm.train import checkpoint as ck


@pytest.fixture
def setup():
    cfg = load_config("tiny", ["model.vocab_size=20", "model.n_layer=1", "model.d_model=32"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    tok = CharTokenizer(list("abcdefghijklmnopqr"))
    return cfg, model, tok


def save(root, step, setup, val_loss=None):
    cfg, model, tok = setup
    optimizer = torch.optim.AdamW(model.parameters()).state_dict()
    state = {"loop": {"step": step}, "rng": [{}], "optimizer": optimizer}
    return ck.save_checkpoint(
        root,
        step,
        model_state=model.state_dict(),
        train_state=state,
        config=cfg,
        tokenizer=tok,
        val_loss=val_loss,
    )


def test_round_trip_restores_weights_config_and_tokenizer(tmp_path, setup):
    cfg, model, tok = setup
    path = save(tmp_path / "checkpoints", 5, setup)
    assert path.name == "step_00000005"
    loaded = ck.load_checkpoint(path)
    assert loaded.config == cfg
    assert loaded.tokenizer.fingerprint() == tok.fingerprint()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model_state[name], tensor), name
    assert loaded.train_state()["loop"]["step"] == 5
    model2, _, _, _ = ck.load_model(tmp_path, "latest")  # run dir form
    x = torch.randint(0, 20, (1, 8))
    assert torch.equal(model2(x)[0], model.eval()(x)[0])


def test_tied_embeddings_are_stored_once(tmp_path, setup):
    path = save(tmp_path / "checkpoints", 1, setup)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["aliases"], "tied weights should be stored once with an alias"


def test_truncated_latest_is_skipped_with_warning(tmp_path, setup):
    root = tmp_path / "checkpoints"
    save(root, 1, setup)
    latest = save(root, 2, setup)
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.warns(UserWarning, match="truncated"):
        assert ck.find_latest(root).name == "step_00000001"


def test_corrupt_bytes_detected_by_checksum(tmp_path, setup):
    root = tmp_path / "checkpoints"
    path = save(root, 3, setup)
    data = bytearray((path / "train_state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "train_state.pt").write_bytes(bytes(data))
    assert "checksum" in ck.check_checkpoint(path)
    with pytest.raises(ck.CheckpointError, match="damaged"):
        ck.load_checkpoint(path)


def test_incomplete_directory_is_not_a_checkpoint(tmp_path, setup):
    root = tmp_path / "checkpoints"
    save(root, 1, setup)
    (root / "step_00000009").mkdir()  # e.g. copied half-way by hand: no meta.json
    with pytest.warns(UserWarning, match="incomplete"):
        assert ck.find_latest(root).name == "step_00000001"


def test_rotation_keeps_last_best_and_milestones(tmp_path, setup):
    root = tmp_path / "checkpoints"
    losses = {10: 3.0, 20: 1.0, 30: 2.0, 40: 2.5, 50: 2.6, 60: 2.7}
    policy = CheckpointConfig(keep_last=2, keep_best=True, milestone_interval=30)
    for step, loss in losses.items():
        save(root, step, setup, val_loss=loss)
        (root / f".tmp-step_{step:08d}-99999").mkdir()  # a stray write from a dead process
        ck.rotate(root, policy)
    kept = [int(p.name.split("_")[1]) for p in ck.list_checkpoints(root)]
    assert kept == [20, 30, 50, 60]  # best (20), milestones (30, 60), last two (50, 60)
    assert not list(root.glob(".tmp-*"))
    assert ck.find_best(root).name == "step_00000020"


def test_missing_run_gives_clear_error(tmp_path):
    with pytest.raises(ck.CheckpointError, match="neither a run directory"):
        ck.load_checkpoint(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    with pytest.raises(ck.CheckpointError, match="no intact checkpoint"):
        ck.load_checkpoint(tmp_path / "run")
