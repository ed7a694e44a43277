"""Sharded checkpoints (`checkpoint.format=sharded`) on the real torchrun (Gloo, CPU, FSDP2).

One chain of runs proves the resharding: a single process writes the sharded reference (batch
16, six steps, a checkpoint every two); 2 ranks x 8 rows resume its step 2 (1 -> 2) to step 6;
4 ranks x 4 rows (2 -> 4) and one process x 16 rows (2 -> 1) resume the 2-rank step 4, and a
second 2-rank launch resumes it too. With `data.sampling=sequential` all of them read the same
16 rows a step (test_distributed's parity argument), so every resumed loss equals the
reference's within PARITY_RTOL: a weight or an Adam moment read into the wrong place would move
the next step's loss by far more. The 2-rank resume of the 2-rank checkpoint (equal world size)
must end bit-identical to the run it continued. Killed mid-write under torchrun: see
test_scaleout's elastic test, which runs sharded.

Time: 2 + 2 + 4 ranks launched once each (~10-15 s each on idle cores), 3 single-process runs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file
from test_distributed import REPO, TIMEOUT, assert_close, env, losses, train_args

from tinylm.config import ConfigError
from tinylm.train import checkpoint, sharded
from tinylm.train.checkpoint import CheckpointError
from tinylm.train.distributed import DistInfo

SHARDED = ["checkpoint.format=sharded", "train.distributed=fsdp"]


def _args(tmp: Path, corpus: Path, name: str, batch: int, *extra: str) -> list[str]:
    return [
        "tiny",
        *train_args(
            tmp, corpus, name, "train.max_steps=6", f"train.batch_size={batch}",
            "checkpoint.interval=2", "eval.interval=2", "checkpoint.keep_last=5", *extra,
        ),
    ]  # fmt: skip


def _torchrun(ranks: int, *args: object) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={ranks}", "-m", "tinylm.cli", "train", *map(str, args)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _resumable_copy(run: Path, step: int, to: Path) -> Path:
    """A run directory holding `run`'s config, tokenizer and its checkpoint of `step` alone
    (no metrics: the resumed run's records are then its own)."""
    (to / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "tokenizer.json"):
        shutil.copy(run / name, to / name)
    name = checkpoint.checkpoint_name(step)
    shutil.copytree(run / "checkpoints" / name, to / "checkpoints" / name)
    return to


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_checkpoint(run).model_state


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, corpus):
    """The runs described in the module docstring: {name: run directory}."""
    tmp = tmp_path_factory.mktemp("sharded")
    with pytest.MonkeyPatch.context() as patch:  # its own dataset cache (module scope)
        patch.setenv("TINYLM_CACHE", str(tmp / "cache"))
        return _run_chain(tmp, corpus)


def _run_chain(tmp: Path, corpus: Path) -> dict[str, Path]:
    runs = {name: tmp / name for name in ("one", "full", "two", "four", "back", "again")}
    # the single-process reference, sharded; and the same run with full checkpoints
    assert run_cli("train", *_args(tmp, corpus, "one", 16, *SHARDED)) == 0
    assert run_cli("train", *_args(tmp, corpus, "full", 16, "checkpoint.format=full")) == 0
    # 1 -> 2
    _resumable_copy(runs["one"], 2, runs["two"])
    out = _torchrun(2, "--resume", runs["two"], "--force", *_args(tmp, corpus, "two", 8, *SHARDED))
    assert "world size changed (1 -> 2)" in out, out
    # 2 -> 4, 2 -> 1 and 2 -> 2 from the 2-rank checkpoint of step 4
    for name, ranks, batch in (("four", 4, 4), ("back", 1, 16), ("again", 2, 8)):
        _resumable_copy(runs["two"], 4, runs[name])
        args = ["--resume", runs[name], "--force", *_args(tmp, corpus, name, batch, *SHARDED)]
        if ranks == 1:
            assert run_cli("train", *args) == 0
        else:
            _torchrun(ranks, *args)
    return runs


def test_sharded_checkpoints_reshard_on_load_and_resume_exactly(chain):
    two = chain["two"] / "checkpoints" / "step_00000004"
    meta = checkpoint.read_meta(two)
    assert meta["format"] == "sharded" and "model.safetensors" not in meta["files"]
    # each rank wrote its own shard file; every file is hashed in meta.json
    assert sorted(p.name for p in two.iterdir()) == sorted([*meta["files"], "meta.json"])
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(meta["files"])
    want = losses(chain["one"])
    assert_close(losses(chain["two"]), want[2:])  # 1 -> 2
    assert_close(losses(chain["four"]), want[4:])  # 2 -> 4
    assert_close(losses(chain["back"]), want[4:])  # 2 -> 1
    # equal world size: the same losses and weights, bit for bit, as the run it continued
    assert losses(chain["again"]) == losses(chain["two"])[2:]
    assert _equal(_weights(chain["again"]), _weights(chain["two"]))
    strays = [p for r in chain.values() for p in (r / "checkpoints").glob(".*")]
    assert strays == []


def test_generate_eval_and_export_read_a_sharded_checkpoint_like_a_full_one(
    chain, tmp_path, capsys
):
    one, full = chain["one"], chain["full"]
    assert checkpoint.read_meta(checkpoint.find_latest(full / "checkpoints"))["format"] == "full"
    assert _equal(_weights(one), _weights(full))  # consolidated in this process, no group
    outputs = []
    for run in (one, full):
        capsys.readouterr()
        args = ["--prompt", "ANNA:", "--max-new-tokens", "12", "--seed", "3"]
        assert run_cli("generate", run, *args) == 0
        assert run_cli("eval", run, "--max-batches", "2") == 0
        lines = capsys.readouterr().out.replace(str(run), "RUN").splitlines()
        outputs.append([line for line in lines if not line.startswith("data: ")])  # cache notes
        assert run_cli("export", run, "--out", tmp_path / run.name) == 0
    assert outputs[0] == outputs[1] and outputs[0][0].startswith("ANNA:")
    assert any(": loss " in line for line in outputs[0]), outputs[0]
    exported = [load_file(tmp_path / r.name / "model.safetensors") for r in (one, full)]
    assert _equal(*exported)


def test_a_partial_sharded_checkpoint_is_never_taken_for_a_whole_one(chain, tmp_path, monkeypatch):
    """A shard lost or cut short, an unrenamed temporary directory, a write that fails half-way
    and a foreign index: each is skipped or refused, and the run's other checkpoints stay."""
    root = tmp_path / "checkpoints"
    shutil.copytree(chain["two"] / "checkpoints", root)
    newest = root / "step_00000006"
    (newest / "__1_0.distcp").unlink()  # rank 1 lost its file
    with pytest.warns(UserWarning, match="__1_0.distcp is missing"):
        assert checkpoint.find_latest(root) == root / "step_00000004"
    with open(root / "step_00000004" / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    with pytest.warns(UserWarning) as warned:
        assert checkpoint.find_latest(root) == root / "step_00000002"
    assert ["is missing" in str(w.message) for w in warned] == [True, False]
    assert "__0_0.distcp has 100 bytes" in str(warned[1].message)
    shutil.rmtree(root)
    shutil.copytree(chain["two"] / "checkpoints", root)
    # a save killed before its rename: a .tmp- directory, never listed, removed by rotation
    stray = root / ".tmp-step_00000008-999999"
    shutil.copytree(newest.parent / "step_00000006", stray)
    assert checkpoint.list_checkpoints(root)[-1].name == "step_00000006"

    # a write that fails after the shards (disk full): CheckpointError, nothing left behind
    loaded = checkpoint.load_checkpoint(newest)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "slow_checkpoint_hook", disk_full)
    with pytest.raises(CheckpointError, match=r"write checkpoint step_00000008.*intact"):
        sharded.save(
            root, 8, model, optimizer, DistInfo(), train_state={}, config=loaded.config,
            tokenizer=loaded.tokenizer, val_loss=None,
        )  # fmt: skip
    assert sorted(p.name for p in root.iterdir()) == [
        stray.name, "step_00000002", "step_00000004", "step_00000006",
    ]  # fmt: skip
    checkpoint.rotate(root, loaded.config.checkpoint)
    assert not stray.exists()

    # an index that would run code when unpickled is refused, even with a matching hash
    index = newest / ".metadata"
    index.write_bytes(pickle.dumps(_Evil()))
    meta = json.loads((newest / "meta.json").read_text())
    meta["files"][".metadata"] = {
        "bytes": index.stat().st_size,
        "sha256": hashlib.sha256(index.read_bytes()).hexdigest(),
    }
    (newest / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"\.metadata is not a sharded checkpoint's index"):
        checkpoint.load_checkpoint(newest)


class _Evil:
    def __reduce__(self):
        return (print, ("this ran",))


def test_auto_shards_only_under_fsdp_past_the_threshold_and_never_on_xla():
    cpu, two = torch.device("cpu"), DistInfo(rank=0, world_size=2)
    big, small = sharded.AUTO_SHARD_PARAMS, sharded.AUTO_SHARD_PARAMS - 1

    def choose(requested, info=two, mode="fsdp", n=big, device=cpu):
        return sharded.choose_format(requested, info, mode, n, device)[0]

    assert choose("auto") == "sharded"
    assert choose("auto", n=small) == choose("auto", mode="ddp") == "full"
    assert choose("auto", info=DistInfo()) == "full"  # one process: nothing to gather
    assert choose("sharded", info=DistInfo(), n=1) == "sharded"  # asked for: also in one process
    assert choose("full") == "full"
    xla = torch.device("xla")
    assert choose("auto", device=xla) == "full"
    with pytest.raises(ConfigError, match=r"checkpoint\.format=sharded is not supported on XLA"):
        choose("sharded", device=xla)
