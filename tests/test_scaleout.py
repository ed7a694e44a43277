"""Scale-out on the real torchrun (Gloo, CPU): two rendezvous agents as two nodes, elastic restarts
that resume by themselves, a rank that cannot see rank 0's files, and the Slurm example.

Every launch runs under a wall-clock timeout (`test_distributed.TIMEOUT`), so a deadlock fails the
test instead of hanging CI. The two-agent run is the reference of the elastic test: same world
size, same arguments, never interrupted, so a restarted run must end with bit-identical weights.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from helpers import read_metrics, records, run_cli
from test_distributed import REPO, assert_close, env, losses, train_args

from tinylm.data import resolve_data
from tinylm.data.loader import BatchLoader
from tinylm.eval.evaluate import OVERALL, EvalResult, evaluate_sets
from tinylm.train import checkpoint

STEPS = 6
# Seconds per launch (or per awaited event): ~15 s on idle cores; a load average of 20 on 2
# cores made single launches take over 120 s, so the bound is generous but still a bound.
TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(tmp_path: Path, corpus: Path, name: str, *extra: str) -> list[str]:
    return [
        "tiny",
        *train_args(
            tmp_path,
            corpus,
            name,
            f"train.max_steps={STEPS}",
            "eval.max_batches=3",
            "eval.batch_size=8",
            *extra,
        ),
    ]


def _agent_cmd(port: int, *args: object) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=tinylm-test",
        "-m", "tinylm.cli", "train", *map(str, args),
    ]  # fmt: skip


def _finish(procs: list[subprocess.Popen], logs: list[Path]) -> list[str]:
    """Wait for every launcher (killing all of them past TIMEOUT); their outputs."""
    deadline = time.monotonic() + TIMEOUT
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        child.kill()
                proc.kill()
                proc.wait()
    return [log.read_text() for log in logs]


def _two_agents(tmp_path: Path, args: list[object], prefixes=((), ())) -> list[str]:
    """Two torchrun agents on this machine standing in for two nodes (each agent's command after
    its prefix); their outputs, then their exit codes."""
    port = _free_port()
    procs, logs = [], []
    for i, prefix in enumerate(prefixes):
        logs.append(tmp_path / f"agent{i}.log")
        with open(logs[-1], "w") as log:
            procs.append(
                subprocess.Popen(
                    [*prefix, *_agent_cmd(port, *args)],
                    cwd=REPO,
                    env=env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    outputs = _finish(procs, logs)
    return outputs + [str(p.returncode) for p in procs]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """The latest checkpoint's weights, full or sharded (consolidated)."""
    return checkpoint.load_checkpoint(run).model_state


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, corpus):
    """The uninterrupted reference: one rank per agent, two agents (a two-node run)."""
    tmp = tmp_path_factory.mktemp("nodes")
    # Its own dataset cache: the per-test one (conftest) is not set yet for a module fixture,
    # and a cache another module filled would let rank 0 find the data prepared already.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TINYLM_CACHE", str(tmp / "cache"))
        outputs = _two_agents(tmp, _args(tmp, corpus, "nodes"))
    assert outputs[2:] == ["0", "0"], outputs
    return tmp / "nodes", outputs[:2]


def test_two_nodes_train_like_one_process_and_only_rank0_writes(
    two_nodes, tmp_path, corpus, capsys
):
    run, outputs = two_nodes
    joined = "\n".join(outputs)
    assert joined.count("run directory:") == 1 and "Traceback" not in joined, joined
    # Rank 0 prepared the data and said so; the other node found it (shared_files.check_visible)
    # and prepared nothing, and wrote nothing: one start event, each step once, no stray files.
    assert joined.count("data: play") and "using prepared" not in joined, joined
    events = read_metrics(run, "event")
    ends = ("start", "done", "stopped", "failed", "resumed")  # not warnings (`slow` on a busy CPU)
    assert [e["event"] for e in events if e["event"] in ends] == ["start", "done"]
    # data_check.json: the test corpus is templated, so the start-of-train data check warns
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "config.yaml", "data_check.json", "metrics.jsonl", "tokenizer.json",
    ]  # fmt: skip
    # Validation was spread over the ranks (3 batches: 2 on rank 0, 1 on rank 1) and summed once:
    # the val loss of one process scoring the same checkpoint alone.
    final = checkpoint.find_latest(run / "checkpoints")
    model, cfg, tok, _ = checkpoint.load_model(final)
    val = resolve_data(cfg.data, tok, cfg.model.context_length).val
    alone = evaluate_sets(
        model, val, batch_size=8, seq_len=32, max_batches=3, device="cpu",
        token_bytes=tok.token_bytes(),
    )[OVERALL]  # fmt: skip
    logged = read_metrics(run, "eval")[-1]
    assert logged["step"] == STEPS and alone.batches == 3
    assert logged["val/loss"] == pytest.approx(alone.loss, abs=1e-6, rel=0)
    assert logged["val/bits_per_byte"] == pytest.approx(alone.bits_per_byte, abs=1e-6, rel=0)
    # `tinylm eval` under torchrun: the same figures as in one process.
    eval_args = ["eval", run, "--checkpoint", "latest", "--max-batches", "3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tinylm.cli", *map(str, eval_args)]  # fmt: skip
    ranks = subprocess.run(
        cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    capsys.readouterr()
    assert run_cli(*eval_args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if ": loss " in line]
    assert (
        len(lines) == 2
        and [line for line in ranks.stdout.splitlines() if ": loss " in line] == lines
    )
    # Global batch 2 x 8 rows: the losses of one process reading 16 rows a step.
    assert run_cli("train", *_args(tmp_path, corpus, "one16", "train.batch_size=16")) == 0
    assert_close(losses(run), losses(tmp_path / "one16"))


def _rank_processes(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The launcher's live worker processes by global rank."""
    out = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error, KeyError, ValueError):
            if "tinylm.cli" in " ".join(child.cmdline()):
                out[int(child.environ()["RANK"])] = child
    return out


def _wait_for(what: str, condition, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert proc.poll() is None, f"torchrun exited while waiting for {what}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()}"
        time.sleep(0.02)


def test_elastic_restarts_resume_and_end_like_an_uninterrupted_run(two_nodes, tmp_path, corpus):
    """SIGKILL rank 0 while it writes a checkpoint, then rank 1 mid-step: torchrun restarts the
    group twice, each time it resumes the newest intact checkpoint in the same directory, and
    the run ends exactly as the uninterrupted two-node run did. Its checkpoints are sharded
    (checkpoint.format=sharded): a sharded write killed on one rank is never taken for a
    checkpoint, and resuming one at the same world size is bit-identical (the reference's
    trajectory does not depend on its checkpoints' format)."""
    reference, _ = two_nodes
    run, ckpts, log_path = (
        tmp_path / "elastic",
        tmp_path / "elastic" / "checkpoints",
        tmp_path / "log",
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "--max-restarts=2", "--monitor-interval=0.1", "-m", "tinylm.cli", "train",
        *_args(tmp_path, corpus, "elastic", "checkpoint.format=sharded"),
    ]  # fmt: skip
    slow = {"TINYLM_TEST_SLOW_CHECKPOINT": "1.0"}  # a window to kill rank 0 mid-write
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env={**env(), **slow}, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        # 1: rank 0 killed while writing step 6 (step 3 is complete): resumes at 3.
        _wait_for(
            "the write of step 6", lambda: list(ckpts.glob(".tmp-step_00000006-*")), proc, log_path
        )
        _rank_processes(proc)[0].kill()

        # 2: rank 1 killed in the middle of the restarted run's steps.
        def resumed_and_stepping() -> bool:
            resumed = [r for r in records(run, "event") if r.get("event") == "resumed"]
            return bool(resumed) and any(r["step"] == 5 for r in records(run, "train"))

        _wait_for("the first restart's step 5", resumed_and_stepping, proc, log_path)
        _rank_processes(proc)[1].kill()
        code = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.send_signal(signal.SIGKILL)
            proc.kill()
            proc.wait()
    output = log_path.read_text()
    assert code == 0, output
    # The survivors of each kill said so in one line; none reported a bug in itself.
    assert "another process of this run stopped" in output, output
    assert "internal error" not in output and not list(run.glob("internal-error-*")), output
    resumed = [e["message"] for e in read_metrics(run, "event") if e.get("event") == "resumed"]
    assert resumed == [f"resumed (elastic restart {n}) at step 3" for n in (1, 2)], output
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["cache", "elastic"]
    assert [p.name for p in ckpts.iterdir() if p.name.startswith(".")] == []
    assert checkpoint.read_meta(checkpoint.find_latest(ckpts))["format"] == "sharded"
    # Same metrics and the same weights, bit for bit, as the run nobody interrupted.
    assert losses(run) == losses(reference)
    val = [(r["step"], r["val/loss"]) for r in read_metrics(run, "eval")]
    assert val == [(r["step"], r["val/loss"]) for r in read_metrics(reference, "eval")]
    want = _weights(reference)
    got = _weights(run)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_rank_that_cannot_see_rank0s_files_stops_every_rank(tmp_path, corpus):
    """Node-local disks: rank 1 runs in its own mount namespace with an empty file system over
    out_dir, as on another node. Both ranks stop at once with one error naming the rank and the
    path, instead of waiting in a collective. One torchrun launch (`--no-python`, a shell that
    moves rank 1 alone into the namespace): two agents cost a second launcher and a rendezvous
    for nothing this test looks at (the two-agent path is the fixture's)."""
    out = tmp_path / "out"
    out.mkdir()
    hide = f'mount -t tmpfs none {out} && exec "$@"'
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", hide, "sh", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here (unshare -rm): {probe.stderr.decode()}")
    rank1_hidden = (
        'if [ "$RANK" = 1 ]; then exec unshare -rm sh -c "$0" sh "$@"; else exec "$@"; fi'
    )
    args = ["tiny", *train_args(out, corpus, "local", "train.max_steps=2")]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "--no-python", "sh", "-c", rank1_hidden, hide,
        sys.executable, "-m", "tinylm.cli", "train", *map(str, args),
    ]  # fmt: skip
    log = tmp_path / "log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT)
    joined = _finish([proc], [log])[0]
    assert proc.returncode == 1, joined
    message = f"error: rank 1 (host {socket.gethostname()}) cannot see {out / 'local' / '.lock'}"
    # said by both ranks (torchrun prefixes nothing: each rank's own line, twice)
    assert joined.count(message) == 2, joined
    assert "/tinylm/" not in joined, joined  # a one-line error, no traceback through tinylm


def test_slurm_script_launches_one_torchrun_per_node_with_slurms_rendezvous(tmp_path):
    """examples/slurm/train.sbatch under Slurm's environment, with `srun` and `scontrol` replaced
    by stubs: the torchrun command line it hands srun is one torchrun accepts, rendezvous on the
    job's first node, and a tinylm train command that resumes by itself on requeue (run_name)."""
    from torch.distributed.run import get_args_parser

    from tinylm.config import load_config

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/bin/bash\nprintf "%s\\0" "$@" > "$STUB_OUT"\n'
        'echo "$TORCH_DISABLE_SHARE_RDZV_TCP_STORE $OMP_NUM_THREADS" > "$STUB_OUT.env"\n'
    )
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\n[ "$*" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n'
    )
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "tinylm", "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32",
    }  # fmt: skip
    out = tmp_path / "srun-args"
    environ = {
        **os.environ,
        **slurm,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STUB_OUT": str(out),
    }
    environ.pop("OMP_NUM_THREADS", None)
    script = REPO / "examples" / "slurm" / "train.sbatch"
    subprocess.run(
        ["bash", script, "train.max_steps=100"], env=environ, check=True, timeout=30, cwd=tmp_path
    )
    argv = out.read_text().split("\0")[:-1]
    assert argv[:2] == ["--kill-on-bad-exit=1", "torchrun"]
    assert (tmp_path / "srun-args.env").read_text().split() == ["1", "8"]  # 32 CPUs / 4 GPUs
    launch = get_args_parser().parse_args(argv[2:])
    assert (launch.nnodes, launch.nproc_per_node) == ("2", "4")
    assert (launch.rdzv_backend, launch.rdzv_endpoint, launch.rdzv_id) == (
        "c10d", "gpu07:29500", "4242",
    )  # fmt: skip
    assert launch.max_restarts == 3 and launch.module
    assert [launch.training_script, *launch.training_script_args] == [
        "tinylm.cli", "train", "tinystories-15m", "run_name=tinylm-4242", "out_dir=runs",
        "train.max_steps=100",
    ]  # fmt: skip
    cfg = load_config("tinystories-15m", launch.training_script_args[2:])
    assert (cfg.run_name, cfg.train.resume, cfg.train.max_steps) == ("tinylm-4242", "auto", 100)


class _Mean(torch.nn.Module):
    """A stand-in model whose loss is a function of the batch alone (the mean target id)."""

    def forward(self, x, y):
        return None, y.double().mean()


def test_evaluation_spread_over_ranks_scores_each_batch_once():
    """Ranks score batches rank, rank + N, ...; the reduce adds their sums: the result equals one
    process's, with every batch counted once, also when the batches do not divide evenly (the
    rank left over re-scores one and discards it)."""
    tokens = np.arange(7 * 4 * 16 + 1) % 251
    kw = dict(batch_size=4, seq_len=16, max_batches=7, device="cpu", token_bytes=np.ones(256, int))
    want = evaluate_sets(_Mean(), {"v": tokens}, **kw)["v"]
    for world in (2, 3, 8):
        sums = []

        def reduce(t, sums=sums):
            sums.append(t.clone())
            return t

        parts = [evaluate_sets(_Mean(), {"v": tokens}, **kw, shard=(r, world), reduce=reduce)["v"]
                 for r in range(world)]  # fmt: skip
        total = torch.stack(sums).sum(0)  # what the all-reduce gives every rank
        got = EvalResult.from_sums(
            total[0].item(), int(total[1]), int(total[2]), int(total[3]), False
        )
        assert (got.tokens, got.num_bytes, got.batches) == (want.tokens, want.num_bytes, 7)
        assert got.loss == pytest.approx(want.loss, abs=1e-12)
        # (the fake reduce returns each rank's own sums) each rank scored only its share
        assert [p.batches for p in parts] == [len(range(r, 7, world)) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_an_epoch_under_n_ranks_visits_every_window_once(world):
    """data.sampling=sequential: the ranks' rows of one epoch are the set's windows, each once."""
    seq, windows = 8, 48
    tokens = np.arange(seq * windows + 1) % 100
    seen = Counter()
    steps = windows // (4 * 2 * world)  # batch 4, grad_accum 2
    for rank in range(world):
        loader = BatchLoader(
            [("a", tokens, 1.0)], batch_size=4, seq_len=seq, grad_accum=2, seed=3, rank=rank,
            world_size=world, sampling="sequential", prefetch=0,
        )  # fmt: skip
        for step in range(steps):
            for micro in range(2):
                seen.update((loader.rows(step, micro)[1] // seq).tolist())
    assert seen == Counter(range(windows))


def test_train_resume_modes_without_torchrun_and_under_a_restart(tmp_path, corpus, monkeypatch):
    """train.resume in one process: `auto` keeps today's behaviour outside torchrun (a named run
    with checkpoints is refused, an unnamed one gets a fresh -N directory), a torchrun restart
    (`TORCHELASTIC_RESTART_COUNT`) resumes, `always` resumes outside torchrun too (an unnamed
    run: its series' newest directory), `never` only with --resume."""
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)

    def train(name: str | None, steps: int, *extra: str) -> int:
        args = train_args(tmp_path, corpus, name or "x", f"train.max_steps={steps}", *extra)
        return run_cli("train", "tiny", *[a for a in args if name or not a.startswith("run_name")])

    def resumed(run: Path) -> list[str]:
        return [e["message"] for e in read_metrics(run, "event") if e.get("event") == "resumed"]

    assert train("named", 3) == 0
    assert train("named", 6) == 2  # refused: "already has checkpoints: continue it with --resume"
    assert train("named", 6, "train.resume=always") == 0
    assert resumed(tmp_path / "named") == ["resumed (run_name=named started again) at step 3"]

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert train("named", 9, "train.resume=never") == 2
    assert train("named", 9) == 0
    assert resumed(tmp_path / "named")[-1] == "resumed (elastic restart 1) at step 6"
    assert losses(tmp_path / "named")[-1][0] == 9

    assert train(None, 3) == 0  # unnamed, in a restarted group: its series' newest directory
    assert train(None, 6) == 0
    assert resumed(tmp_path / "tiny") == ["resumed (elastic restart 1) at step 3"]
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    assert train(None, 3) == 0 and (tmp_path / "tiny-2" / "checkpoints").is_dir()  # as today
    assert train(None, 6, "train.resume=always") == 0  # the newest of tiny, tiny-2
    assert resumed(tmp_path / "tiny-2") == ["resumed (train.resume=always) at step 3"]
    assert not (tmp_path / "tiny-3").exists()
