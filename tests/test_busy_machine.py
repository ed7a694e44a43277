"""Issue 24: a run on a busy machine: its thread count (decided, checkpointed, kept on resume),
bit-identical resumes under another OMP_NUM_THREADS, an ETA from the recent pace, fail-fast
refusals of missing paths, and `--resume` of a finished run."""

from __future__ import annotations

import json
import time
import types
from pathlib import Path

import pytest
import torch
from helpers import SMALL, read_metrics, run_cli

from tinylm.config import ConfigError, resolve_preset
from tinylm.train import checkpoint as ck
from tinylm.train import threads
from tinylm.train.eta import EtaEstimator

CPU = torch.device("cpu")

# ---------------------------------------------------------------- the thread decision


def test_thread_count_comes_from_config_then_env_then_a_probe(monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    choice = threads.decide(2, CPU)
    assert (choice.count, choice.source) == (
        2,
        "config",
    ) and "OMP_NUM_THREADS=3 ignored" in choice.reason
    assert (threads.decide("auto", CPU).count, threads.decide("auto", CPU).source) == (3, "env")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: (4, "4 in its CPU affinity"))
    monkeypatch.setattr(threads, "load_average", lambda: 3.0)  # 2 cores held by others
    monkeypatch.setattr(threads, "busy_cores", lambda: None)  # no /proc/stat: the load average
    seen = []

    def fake_probe(counts, rows, width):
        seen.append(counts)
        return {1: 1.0, 2: 0.55, 4: 0.52}  # 4 is not 10% faster than 2: fewer threads win

    monkeypatch.setattr(threads, "probe", fake_probe)
    choice = threads.decide("auto", CPU)
    assert seen == [[1, 2, 4]] and choice.count == 2 and choice.source == "auto"
    assert "load average 3.0" in choice.reason and "probe 1: 1000.0 ms" in choice.reason


def test_cgroup_quota_and_affinity_bound_the_cores(tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert threads.cgroup_cpu_limit(v1) == 1.0
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1.5)
    assert threads.usable_cores() == (2, "4 in its CPU affinity, cgroup quota 1.5 CPUs")


def test_the_probe_times_each_count_and_leaves_the_thread_count_alone():
    before = torch.get_num_threads()
    timings = threads.probe([1, 2], rows=64, width=16)
    assert set(timings) == {1, 2} and all(t > 0 for t in timings.values())
    assert torch.get_num_threads() == before
    assert threads.pick({1: 1.0, 2: 0.95}) == 1 and threads.pick({1: 1.0, 2: 0.5}) == 2


def test_governor_ignores_compile_waits_for_a_trend_then_settles():
    g = threads.ThreadGovernor(2, settled=False, adjustable=True)
    # the session's first interval (compile, allocations: one thread's work) is never starved
    assert g.observe(first_step=1, session_start=0, share=0.3) is None and g.checks == 0
    assert g.observe(first_step=11, session_start=0, share=0.3) is None  # one busy moment
    assert g.observe(first_step=21, session_start=0, share=0.2) == 1  # a trend: drop
    assert g.settled and g.observe(first_step=31, session_start=0, share=0.1) is None
    calm = threads.ThreadGovernor(2, settled=False, adjustable=True)
    for i in range(threads.SETTLE_CHECKS):
        assert calm.observe(first_step=10 * i + 11, session_start=0, share=0.9) is None
    assert calm.settled and calm.observe(first_step=99, session_start=0, share=0.1) is None
    assert threads.ThreadGovernor(2, settled=False, adjustable=False).settled  # train.threads=N


def test_start_decision_reads_the_cores_busy_now_not_the_lagging_load_average(monkeypatch):
    """Two spinners started just before the run: the load average still reads 1.4 (measured:
    1.38), but both CPUs are busy right now, so the run starts on 1 thread without a probe."""
    for name in threads.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: (2, "2 in its CPU affinity"))
    monkeypatch.setattr(threads, "load_average", lambda: 1.38)
    probed: list[list[int]] = []

    def fake_probe(counts, rows, width):
        probed.append(counts)
        return {1: 1.0, 2: 0.6}

    monkeypatch.setattr(threads, "probe", fake_probe)
    views = {"busy": (2.0, 2), "one busy": (1.0, 2), "idle": (0.05, 2), "mostly idle": (0.4, 2)}
    chosen = {}
    for name, view in views.items():
        monkeypatch.setattr(threads, "busy_cores", lambda view=view: view)
        chosen[name] = threads.decide("auto", CPU)
    assert {k: c.count for k, c in chosen.items()} == {
        "busy": 1, "one busy": 1, "idle": 2, "mostly idle": 2,
    }  # fmt: skip
    assert probed == [[1, 2], [1, 2]]  # only where a second core is free
    assert "kept 2.0 of its 2 CPUs busy just now, load average 1.4" in chosen["busy"].reason
    assert chosen["idle"].ceiling == 2 and "re-checked" in chosen["idle"].reason
    assert chosen["busy"].ceiling == 2  # held down by busy cores: may rise if they go idle
    monkeypatch.setattr(threads, "busy_cores", lambda: (0.0, 2))
    monkeypatch.setattr(threads, "probe", lambda counts, rows, width: {1: 1.0, 2: 0.95})
    no_gain = threads.decide("auto", CPU)
    assert (no_gain.count, no_gain.ceiling) == (1, 1)  # the probe's call: an idle core stays so
    # a 2-CPU cgroup quota on a 64-CPU host: 40 busy host CPUs still leave it its 2 cores
    assert threads.free_cores(2, busy=40.0, watched=64) == 2
    assert threads.free_cores(2, busy=63.5, watched=64) == 1


def test_busy_cores_come_from_the_per_cpu_counters_of_this_process_cpus(tmp_path):
    stat = tmp_path / "stat"
    #                 user nice system idle iowait irq softirq steal
    stat.write_text(
        "cpu  30 0 0 30 0 0 0 0 0 0\n"
        "cpu0 10 0 5 70 5 0 0 10 0 0\n"
        "cpu1 99 0 0 1 0 0 0 0 0 0\n"
        "cpu2 1 1 1 50 0 0 0 0 0 0\n"
        "intr 1 2 3\n"
    )
    assert threads.cpu_ticks({0}, stat) == (25, 75)  # steal is busy: not ours either
    assert threads.cpu_ticks({0, 2}, stat) == (28, 125)  # cpu1 is not in the affinity
    assert threads.cpu_ticks({0}, tmp_path / "missing") is None
    view = threads.busy_cores(0.05)  # the real counters: a fraction of the CPUs watched
    assert view is None or 0.0 <= view[0] <= view[1]


def _governed(ticks, *, threads_now=2, ceiling=2):
    """Feed a governor (step seconds, CPU seconds, idle seconds) per step; the steps where it
    changed the count."""
    g = threads.ThreadGovernor(threads_now, settled=False, adjustable=True, ceiling=ceiling)
    wall = cpu = idle = 0.0
    changes = {}
    for step, (w, c, i) in enumerate(ticks, start=1):
        wall, cpu, idle = wall + w, cpu + c, idle + i
        count = g.tick(step=step, session_start=0, wall=wall, cpu=cpu, idle=idle)
        if count is not None:
            changes[step] = count
    return g, changes


def test_governor_acts_on_its_own_clock_and_never_on_compile_time():
    compile_steps = [(30.0, 15.0, 15.0)] * 2  # one thread busy compiling: 25% share
    starved = [(0.5, 0.2, 0.0)] * 20  # 2 threads beside 2 spinners: 20% share (measured 19-27%)
    g, changes = _governed(compile_steps + starved)
    assert changes == {6: 1} and g.settled  # 2 windows of 1 s after the warm-up: step 6
    g, changes = _governed(compile_steps + [(0.5, 0.95, 0.0)] * 20)  # alone: no change
    # a low share with the cores idle is waiting (data, disk, a lock), not other processes
    g, changes = _governed(compile_steps + [(0.5, 0.2, 0.3)] * 20)
    assert changes == {} and g.settled
    assert changes == {} and g.settled and g.checks == threads.SETTLE_CHECKS
    # one busy moment is not a trend; calm windows settle it: later load changes nothing
    g, changes = _governed(compile_steps + [(1.0, 0.4, 0)] + [(1.0, 1.9, 0)] * 3 + starved)
    assert changes == {} and g.settled and g.checks == threads.SETTLE_CHECKS
    # started on 1 thread while another job held a core; it left: a whole core idle twice
    g, changes = _governed(compile_steps + [(0.5, 0.5, 0.45)] * 20, threads_now=1)
    assert changes == {6: 2} and g.threads == 2 and g.settled
    g, changes = _governed(compile_steps + [(0.5, 0.5, 0.3)] * 20, threads_now=1)  # 0.6 idle
    assert changes == {}
    g, changes = _governed(compile_steps + [(0.5, 0.5, 0.45)] * 20, threads_now=1, ceiling=1)
    assert changes == {} and g.settled  # train.threads=1 or a rank's share: never raised
    # an evaluation inside a window is not a step: the window restarts after it
    g = threads.ThreadGovernor(2, settled=False, adjustable=True)
    for step, wall in [(1, 30.0), (2, 60.0), (3, 60.5)]:
        assert g.tick(step=step, session_start=0, wall=wall, cpu=wall / 4, idle=0.0) is None
    g.restart()  # 20 s of a one-thread evaluation follow
    assert g.tick(step=4, session_start=0, wall=81.0, cpu=25.0, idle=0.0) is None
    assert g.checks == 0 and g.window == (4, 81.0, 25.0, 0.0)


def test_monitor_changes_the_count_within_seconds_whatever_the_log_interval(tmp_path, monkeypatch):
    """log.interval=50: the first version could not act within a 100-step run."""
    from tinylm.config import load_config
    from tinylm.train import monitor as monitor_mod
    from tinylm.train.distributed import DistInfo
    from tinylm.train.runtime import Precision
    from tinylm.train.sinks import RunLogger

    cfg = load_config("tiny", [*SMALL, "log.interval=50"])
    log = RunLogger(tmp_path, cfg.log, enabled=False, run_name="r", config_dict={}, max_steps=100)
    events: list[tuple[str, int, int]] = []
    monkeypatch.setattr(
        log,
        "event",
        lambda message, **kw: events.append((kw["event"], kw.get("step"), kw.get("threads"))),
    )
    clock = {"wall": 0.0, "cpu": 0.0}
    monkeypatch.setattr(
        monitor_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock["wall"])
    )
    monkeypatch.setattr(monitor_mod.TrainMonitor, "_cpu_seconds", lambda self: clock["cpu"])
    monkeypatch.setattr(monitor_mod, "idle_seconds", lambda: 0.0)
    mon = monitor_mod.TrainMonitor(
        log, cfg, optimizer=types.SimpleNamespace(param_groups=[{"lr": 0.1}]), device=CPU,
        precision=Precision("fp32", "test"), dist=DistInfo(), flops_per_token=1.0,
        governor=threads.ThreadGovernor(2, settled=False, adjustable=True),
    )  # fmt: skip
    with threads.restored():
        torch.set_num_threads(2)
        mon.log_start(0, tmp_path, [])
        counts = []
        for _ in range(12):  # 1.2 s per step at 2 threads, 20% of their CPU time
            clock["wall"] += 1.2
            clock["cpu"] += 0.48
            mon.record(torch.tensor(1.0), torch.tensor(False))
            counts.append(torch.get_num_threads())
    assert counts == [2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # step 4: two 1.2 s windows
    assert events == [("start", 0, 2), ("slow", 4, 1)] and mon.governor.settled


# ---------------------------------------------------------------- resume under another count

# Big enough that 1 and 2 threads round differently (the batch-reducing matmuls and RMSNorm's
# backward split their sums per thread); tiny's default optimizer is Muon (issue 21 item 8).
SHAPE = [
    "model.context_length=32", "model.n_layer=1", "model.n_head=2", "model.d_model=64",
    "train.batch_size=8", "eval.max_batches=1", "eval.sample_tokens=8", "log.tensorboard=false",
    "log.progress=false", "data.num_workers=1", "log.interval=1", "eval.interval=0",
    "eval.samples=0", "optim.warmup_steps=1", "optim.decay_steps=4", "model.dropout=0.1",
]  # fmt: skip


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run, "train")]


def test_resume_under_another_omp_num_threads_is_bit_identical(
    tmp_path, corpus, monkeypatch, capsys
):
    common = [f"data.train={corpus}", f"out_dir={tmp_path}", *SHAPE]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert run_cli("train", "tiny", "run_name=full", "train.max_steps=4", *common) == 0
    assert run_cli("train", "tiny", "run_name=split", "train.max_steps=2", *common) == 0
    meta = json.loads(
        (ck.find_latest(tmp_path / "split" / "checkpoints") / "meta.json").read_text()
    )
    assert meta["loop"]["threads"] == 2 and meta["loop"]["threads_settled"]
    capsys.readouterr()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the machine got busy: the user asks for 1
    assert run_cli("train", "--resume", tmp_path / "split", "train.max_steps=4") == 0
    out = capsys.readouterr().out
    assert "threads: 2, this run's own count" in out and "OMP_NUM_THREADS=1 ignored" in out
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full")  # exact floats
    # ... and the count matters: the same run on 1 thread computes other numbers
    assert run_cli("train", "tiny", "run_name=one", "train.max_steps=4", *common) == 0
    assert _losses(tmp_path / "one") != _losses(tmp_path / "full")
    assert torch.get_num_threads() == 1  # the test process's own count is given back
    # a changed train.threads on resume is a changed run: refused, saying why
    code = run_cli("train", "--resume", tmp_path / "split", "train.max_steps=5", "train.threads=1")
    assert code == 2 and "train.threads: 'auto' -> 1" in capsys.readouterr().err


# ---------------------------------------------------------------- ETA


def test_eta_follows_a_slowdown_that_ends_within_a_few_intervals():
    eta = EtaEstimator(1000, eval_interval=100, checkpoint_interval=0)
    step = 0
    for _ in range(5):  # 0.1 s per step
        step += 10
        eta.steps(10, 1.0)
    assert eta.remaining(step) == pytest.approx(950 * 0.1 + 10 * 0.0)
    for _ in range(5):  # the machine gets busy: 1 s per step
        step += 10
        eta.steps(10, 10.0)
    assert eta.remaining(step) == pytest.approx(900 * 1.0)
    eta.overhead("eval", 5.0)
    truth = (1000 - step - 3 * 10) * 0.1 + 9 * 5.0  # after 3 more intervals: fast again
    estimates = []
    for _ in range(3):
        step += 10
        eta.steps(10, 1.0)
        estimates.append(eta.remaining(step))
    assert estimates[0] > 2 * truth  # still remembers the slow intervals
    assert estimates[-1] == pytest.approx(truth)  # forgotten after WINDOW intervals
    assert eta.remaining(1000) == 0


# ---------------------------------------------------------------- fail fast


@pytest.mark.parametrize("command", [["generate"], ["eval"], ["export", "--out", "{tmp}/x"]])
def test_a_missing_run_path_is_refused_in_well_under_a_second(command, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in command]
    start = time.perf_counter()
    code = run_cli(argv[0], tmp_path / "no-such-run", *argv[1:])
    assert time.perf_counter() - start < 1.0
    assert code == 2 and "no-such-run" in capsys.readouterr().err
    (tmp_path / "empty-run").mkdir()  # a run directory that never had a checkpoint
    start = time.perf_counter()
    with pytest.raises(ck.CheckpointError, match="no intact checkpoint"):
        ck.load_checkpoint(tmp_path / "empty-run")
    assert time.perf_counter() - start < 1.0


def test_a_missing_data_path_is_refused_before_torch_work(tmp_path, monkeypatch, capsys):
    import tinylm.preflight

    def not_reached(*args, **kwargs):
        raise AssertionError("the memory preflight ran before the data path was checked")

    monkeypatch.setattr(tinylm.preflight, "check_memory", not_reached)
    code = run_cli("train", "tiny", f"data.train={tmp_path}/nope.txt", f"out_dir={tmp_path}")
    assert code == 2 and "nope.txt' not found" in capsys.readouterr().err


def test_unknown_harness_tasks_are_all_named_at_once(tmp_path):
    from tinylm.eval.task_names import check_names, names_in

    assert names_in("task: arc_easy\ntag:\n  - ai2_arc\n  - science # c\ngroup: [a, 'b']\n") == {
        "arc_easy", "ai2_arc", "science", "a", "b",
    }  # fmt: skip
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text("task: my_task\ndataset_path: x\n")
    check_names(["my_task"], [str(tasks)], include_defaults=False)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        check_names(["my_tsak", "other", "my_task"], [str(tasks)], include_defaults=False)
    assert time.perf_counter() - start < 3.0
    assert "'my_tsak' (did you mean my_task?)" in str(e.value) and "'other'" in str(e.value)


# ---------------------------------------------------------------- finished, small items


def test_resume_of_a_finished_run_says_so_and_writes_nothing(tmp_path, corpus, capsys):
    common = [f"data.train={corpus}", f"out_dir={tmp_path}", "run_name=r", *SMALL]
    assert run_cli("train", "tiny", "train.max_steps=2", "eval.interval=0", *common) == 0
    before = (tmp_path / "r" / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert run_cli("train", "--resume", tmp_path / "r") == 0
    out = capsys.readouterr().out
    assert "already finished at step 2 (best val " in out and "raise train.max_steps" in out
    assert (tmp_path / "r" / "metrics.jsonl").read_bytes() == before


def test_small_items(capsys):
    with pytest.raises(ConfigError, match="Did you mean the preset 'tiny'") as e:
        resolve_preset("tiny.yaml")
    assert "'tinylm'" not in str(e.value)
    assert run_cli("datasets", "--help") == 0
    from tinylm.data.registry import REGISTRY

    shown = capsys.readouterr().out
    assert all(name.split("-")[0] in shown for name in REGISTRY)
    repo = Path(__file__).resolve().parents[1]
    assert "sweeps/" in (repo / ".gitignore").read_text().split()


def test_monitor_does_not_read_compile_time_as_contention(tmp_path, monkeypatch):
    """A compile=true run's first interval (one thread compiling) once dropped it to 1 thread."""
    from tinylm.config import load_config
    from tinylm.train import monitor as monitor_mod
    from tinylm.train.distributed import DistInfo
    from tinylm.train.runtime import Precision
    from tinylm.train.sinks import RunLogger

    cfg = load_config("tiny", [*SMALL, "log.interval=1"])
    log = RunLogger(tmp_path, cfg.log, enabled=False, run_name="r", config_dict={}, max_steps=100)
    events: list[str] = []
    monkeypatch.setattr(log, "event", lambda message, **kw: events.append(kw["event"]))
    clock = {"wall": 0.0, "cpu": 0.0}
    fake_time = types.SimpleNamespace(perf_counter=lambda: clock["wall"])
    monkeypatch.setattr(monitor_mod, "time", fake_time)  # the monitor's clock only
    monkeypatch.setattr(monitor_mod.TrainMonitor, "_cpu_seconds", lambda self: clock["cpu"])
    governor = threads.ThreadGovernor(2, settled=False, adjustable=True)
    mon = monitor_mod.TrainMonitor(
        log, cfg, optimizer=types.SimpleNamespace(param_groups=[{"lr": 0.1}]), device=CPU,
        precision=Precision("fp32", "test"), dist=DistInfo(), flops_per_token=1.0,
        governor=governor,
    )  # fmt: skip
    mon.log_start(0, tmp_path, [])
    with threads.restored():
        torch.set_num_threads(2)
        for step, (wall, cpu) in enumerate([(30.0, 15.0), (30.0, 15.0), (1.0, 0.4), (1.0, 0.4)]):
            clock["wall"] += wall  # steps 1-2: compiling, one thread busy
            clock["cpu"] += cpu
            mon.record(torch.tensor(1.0), torch.tensor(False))
            mon.flush(step + 1, 0, torch.tensor(1.0))
            assert torch.get_num_threads() == (1 if step == 3 else 2), step
        assert events == ["start", "slow"]  # once, when the trend was real: steps 3-4 at 20%
