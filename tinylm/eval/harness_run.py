"""`tinylm eval RUN --tasks ...`: standard benchmarks through EleutherAI's lm-evaluation-harness.

Resolves task names (the harness's own, plus YAML task directories given with `--include-path`),
loads each task's data set with one clear error when it is missing (the harness downloads them
from the Hugging Face Hub into the `datasets` cache), runs them on a `TinyLMHarness`, prints the
harness's results table, writes the full results to `RUN/eval/harness-<UTC time>.json`
(temporary file, renamed when complete), and logs the headline metrics as a `kind: eval` line in
the run's `metrics.jsonl` and as `harness/<task>/<metric>` scalars in TensorBoard.

The checkpoint is loaded by the caller (`train/commands.py`, through `load`): checkpoints and
devices belong to `train/`, which sits above `eval/` (docs/DESIGN.md, "Layers").
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinylm.config import ConfigError
from tinylm.data.errors import DataError
from tinylm.fileio import atomic_write_text, open_append

HF_HOST = "huggingface.co"


@dataclass
class HarnessResult:
    """What a harness run produced: the harness's results dict, the JSON file, the metrics logged."""

    results: dict[str, Any]
    path: Path
    metrics: dict[str, float]
    table: str


@dataclass
class LoadedCheckpoint:
    """A checkpoint ready for the harness, loaded by the caller (the layer that owns checkpoints)."""

    model: Any  # tinylm.model.GPT, in eval mode on `device`
    cfg: Any  # the run's tinylm.config.Config
    tokenizer: Any
    path: Path  # the checkpoint directory (RUN/checkpoints/step_N)
    device: Any  # torch.device
    autocast: Callable[[], Any]  # a fresh autocast context for the run's precision
    metrics_file: Path  # the run's metrics.jsonl (where the headline metrics are appended)


# Examples per task: far more than any task has; past it `--limit 1e30` reached the harness
# as a 31-digit integer and crashed it (an internal error, issue 21).
MAX_LIMIT = 10**9


def parse_limit(text: str | None) -> int | float | None:
    """`--limit`: a number of examples per task (>= 1) or a fraction of each task (0 < x < 1)."""
    if text in (None, ""):
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value <= MAX_LIMIT) or (value >= 1 and value != int(value)):
        raise ConfigError(
            f"--limit {text}: give a whole number of examples per task (e.g. 100, at most "
            f"{MAX_LIMIT:,}) or a fraction between 0 and 1 (e.g. 0.1)"
        )
    return int(value) if value >= 1 else value


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--tasks needs EleutherAI's lm-evaluation-harness: pip install 'tinylm[eval]'"
        ) from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection (bounded, even if DNS hangs)."""
    host = os.environ.get("HF_ENDPOINT", f"https://{HF_HOST}").split("://")[-1].split("/")[0]
    ok: list[bool] = []

    def probe() -> None:
        with contextlib.suppress(OSError), socket.create_connection((host, 443), timeout=timeout):
            ok.append(True)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return bool(ok)


def _go_offline_if_unreachable() -> None:
    """Without the network, make the Hub libraries use their caches at once.

    Otherwise every missing data set costs ~25 s of retries (measured here: five retries with
    back-off before `datasets` gives up) and a screen of retry warnings. Data sets already in the
    cache load the same in offline mode. Must run before `datasets` is imported: it reads the
    setting once.
    """
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return
    if not _hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"


def datasets_cache_dir() -> str:
    """Where `datasets` keeps downloaded data sets (HF_DATASETS_CACHE, else HF_HOME/datasets)."""
    try:
        import datasets

        return str(datasets.config.HF_DATASETS_CACHE)
    except ImportError:  # pragma: no cover - lm_eval depends on datasets
        home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
        return os.environ.get("HF_DATASETS_CACHE", str(Path(home) / "datasets"))


def _task_manager(names: list[str], include_path: list[str], include_defaults: bool = True):
    """A TaskManager that knows every name asked for.

    Indexing the harness's ~14,700 built-in task configs takes ~60-70 s on this shared 2-core
    machine, so when every name is found in the `--include-path` directories alone, those are
    all that is indexed.
    """
    from lm_eval.tasks import TaskManager

    if include_path:
        for path in include_path:
            if not Path(path).is_dir():
                raise ConfigError(f"--include-path {path}: no such directory of task YAML files")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if not include_defaults or all(
            name in local.all_tasks or Path(name).is_file() for name in names
        ):
            return local
    return TaskManager(include_path=include_path or None)


def _unknown_task(name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(
        f"unknown harness task '{name}'{hint}: list the task names with `lm-eval ls tasks` "
        "(or see the lm-evaluation-harness task list), or add your own task YAML directory "
        "with --include-path DIR"
    )


def _unreadable_task_file(name: str, include_path: list[str]) -> ConfigError | None:
    """The error for a task missing because its YAML file under `--include-path` is malformed
    (the harness skips a file it cannot read, so the task looked unknown); None if none is.
    A broken file that names the task is preferred; else the first broken file is named."""
    import yaml

    from tinylm.yamlio import load as load_yaml

    broken: list[tuple[Path, str, bool]] = []
    for directory in include_path:
        for file in sorted(Path(directory).rglob("*.y*ml")):
            try:
                text = file.read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                broken.append((file, e.strerror or str(e), False))
                continue
            try:
                load_yaml(text, str(file), any_tags=True)
            except yaml.YAMLError as e:
                problem = " ".join(str(e).replace('in "<unicode string>", ', "").split())
                broken.append((file, problem[:200], name in text))
    if not broken:
        return None
    file, problem, names_it = max(broken, key=lambda b: b[2])  # first one naming the task
    which = "defines it" if names_it else "may define it"
    return ConfigError(
        f"harness task '{name}' not found: {file} under --include-path {which} but is not "
        f"valid YAML ({problem}); fix that file"
    )


def _missing_dataset(name: str, error: Exception) -> DataError:
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
    reason = "no network" if offline else f"{type(error).__name__}: {error}"
    return DataError(
        f"task '{name}': its data set is not in the Hugging Face datasets cache "
        f"({datasets_cache_dir()}) and could not be downloaded ({reason}); run once with the "
        "network to fill the cache, or set HF_DATASETS_CACHE to a cache that has it"
    )


def load_tasks(
    names: list[str], include_path: list[str], include_defaults: bool = True
) -> tuple[Any, list[Any]]:
    """The TaskManager and the Task/Group objects for `names`, each data set loaded, or one
    clear error.

    Tasks are loaded one name at a time so that a missing data set names its task.
    `include_defaults=False` looks only in the `include_path` directories.
    """
    import datasets

    manager = _task_manager(names, include_path, include_defaults)
    loaded: list[Any] = []
    for name in names:
        if name not in manager.all_tasks and not Path(name).is_file():
            raise _unreadable_task_file(name, include_path) or _unknown_task(
                name, manager.all_tasks
            )
        try:
            result = manager.load([name])
        except FileNotFoundError as e:
            if not isinstance(e, datasets.exceptions.DatasetNotFoundError):
                raise DataError(f"task '{name}': a data file is missing ({e})") from None
            raise _missing_dataset(name, e) from None
        except OSError as e:  # ConnectionError and the Hub clients' request errors
            raise _missing_dataset(name, e) from None
        if name in result["groups"]:
            loaded.append(result["groups"][name])
        else:
            loaded.extend(result["tasks"].values())
    return manager, loaded


def _leaf_tasks(obj: Any) -> list[Any]:
    """The harness Task objects in what `load_tasks` returned (groups hold lists and dicts)."""
    if hasattr(obj, "fewshot_docs"):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _leaf_tasks(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _leaf_tasks(v)]
    return []


def check_fewshot(loaded: list[Any], num_fewshot: int) -> None:
    """Refuse `--num-fewshot` above the examples a task can draw them from (the harness
    crashed mid-run with "Sample larger than population"). When few-shot examples come from
    the evaluated split, the document being scored is excluded, so one fewer is available."""
    for task in _leaf_tasks(loaded):
        try:
            docs = task.fewshot_docs()
            available = len(docs) if docs is not None else 0
            fewshot_split = getattr(getattr(task, "fewshot_cfg", None), "split", None)
            if fewshot_split == getattr(task.config, "test_split", None):
                available -= 1
            name = getattr(task.config, "task", None) or type(task).__name__
        except Exception:  # a task type this check does not understand: the harness decides
            continue
        if num_fewshot > available:
            raise ConfigError(
                f"--num-fewshot {num_fewshot}: task '{name}' has only {max(available, 0)} "
                f"example(s) to draw few-shot examples from; use at most {max(available, 0)}"
            )


_NOT_METRICS = {"alias", "name", "sample_len"}  # per-task bookkeeping in the results dict


def headline_metrics(results: dict[str, Any]) -> dict[str, float]:
    """`{"harness/<task>/<metric>": value}` for every finite number the harness reports
    (standard errors included), tasks and groups alike."""
    out: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, metrics in results.get(section, {}).items():
            for key, value in metrics.items():
                if (
                    key in _NOT_METRICS
                    or isinstance(value, bool)
                    or not isinstance(value, (int, float))
                ):
                    continue
                if math.isfinite(value):
                    metric = key.replace(",none", "").replace(",", "/")
                    out[f"harness/{task}/{metric}"] = float(value)
    return out


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory of a checkpoint (`RUN/checkpoints/step_N` -> `RUN`)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


def write_results(results: dict[str, Any], run_dir: Path) -> Path:
    """The results as `run_dir/eval/harness-<UTC time>.json`, written whole or not at all."""
    from lm_eval.utils import handle_non_serializable

    out_dir = run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = out_dir / f"harness-{stamp}.json"
    n = 1
    while path.exists():  # two runs in the same second keep both files
        path = out_dir / f"harness-{stamp}-{n}.json"
        n += 1
    return atomic_write_text(path, json.dumps(results, indent=2, default=handle_non_serializable))


def log_metrics(metrics_file: Path, step: int, metrics: dict[str, Any], tensorboard: bool) -> None:
    """Append a `kind: eval` line to the run's metrics.jsonl and the scalars to TensorBoard.

    Appended, never truncated: a harness evaluation of an older checkpoint must not cut the
    history after it (which is what a resuming `RunLogger` would do).
    """
    record = {"kind": "eval", "step": step, "time": round(time.time(), 3), **metrics}
    with open_append(metrics_file) as f:
        f.write(json.dumps(record) + "\n")
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with contextlib.closing(SummaryWriter(str(metrics_file.parent / "tb"))) as writer:
            for key, value in metrics.items():
                if isinstance(value, float):
                    writer.add_scalar(key, value, step)


def run_harness(
    load: Callable[[], LoadedCheckpoint],
    tasks: list[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 0,
    include_path: list[str] | None = None,
    log: bool = True,
) -> HarnessResult:
    """Evaluate the checkpoint `load()` gives on harness tasks; write and log the results."""
    _require_lm_eval()
    if not tasks:
        raise ConfigError("--tasks: give at least one task name, e.g. --tasks hellaswag,arc_easy")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot {num_fewshot}: must be >= 0")
    if batch_size < 0:
        raise ConfigError(
            f"--batch-size {batch_size}: must be >= 1 (0 = the run's eval batch size)"
        )
    # Before anything expensive: every task name (a cached index, no harness import), the
    # model, then the task data sets (network), then the run.
    from tinylm.eval.task_names import check_names

    check_names(tasks, list(include_path or []))
    loaded = load()
    cfg, path = loaded.cfg, loaded.path
    _go_offline_if_unreachable()
    # The harness logs every step at INFO; keep its warnings.
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    manager, task_objs = load_tasks(tasks, list(include_path or []))
    if num_fewshot:
        check_fewshot(task_objs, num_fewshot)

    from lm_eval import simple_evaluate
    from lm_eval.utils import make_table

    from tinylm.eval.harness import TinyLMHarness

    lm = TinyLMHarness(
        loaded.model,
        loaded.tokenizer,
        batch_size=batch_size or cfg.eval.batch_size or cfg.train.batch_size,
        autocast=loaded.autocast,
    )
    results = simple_evaluate(
        model=lm,
        tasks=task_objs,
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=lm.batch_size,
        device=str(loaded.device),
        log_samples=False,
        task_manager=manager,  # without it the harness indexes its built-in tasks again (~60 s)
    )
    step = int(path.name.split("_")[-1])
    results["tinylm"] = {"checkpoint": str(path), "step": step, "tasks": tasks}
    table = make_table(results) + (make_table(results, "groups") if results.get("groups") else "")
    run_dir = run_dir_of(path)
    out = write_results(results, run_dir)
    metrics = headline_metrics(results)
    if log:
        log_metrics(loaded.metrics_file, step, metrics, tensorboard=cfg.log.tensorboard)
    return HarnessResult(results, out, metrics, table)
