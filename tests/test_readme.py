"""The README's commands, walked as a newcomer would: each exits as the README says and prints
what its comment quotes.

Every `tinylm ...` line of the README's bash blocks runs in order, in process, in a fresh copy of
the repository (a temporary directory holding its tracked files), with local stand-ins for the
downloads (`TINYLM_DATA_TINYSHAKESPEARE`) and for the user's files (`path/to/input.txt`,
`corpus/`, `other.txt`). Training commands get a small model and a few steps through overrides,
so the walk takes seconds, not the quickstart's minutes: what is checked is that every command
works as written and says what the README quotes ("..." in its comment), not the figures.
"""

from __future__ import annotations

import gzip
import re
import shlex
import shutil
import subprocess

import pytest
from helpers import SMALL, run_cli

from tinylm.data.registry import CORPORA_DIR
from tinylm.paths import REPO_ROOT

# Appended to every `tinylm train` command (a later key=value wins, so README values for these
# keys are replaced): a model that steps in milliseconds, and evaluations that still happen.
FAST = [
    *SMALL,
    "model.context_length=64",
    "optim.warmup_steps=1",
    "eval.interval=3",
    "checkpoint.interval=3",
    "log.interval=2",
]
STEPS = {"train": 4, "resume": 6}
SKIP = ("bash ", "source ", "tensorboard ", "pip ")


# Sections whose commands the walk does not run, and where they are tested instead.
NOT_WALKED = {
    "Files, locks and interrupts": "shell job control and signals: tests/test_files_hardening.py, "
    "tests/test_concurrency.py, tests/test_interrupts.py",
    "Serve and watch": "a server that runs until stopped: tests/serve/",
    "Several processes, nodes and restarts": "torchrun, two nodes, Slurm: tests/test_scaleout.py",
    "Sweeps": "minutes of training per trial by design: tests/test_sweep.py (a killed study "
    "resumed end to end, pruning, best.yaml trained, two sweeps sharing a study), "
    "tests/test_scaling.py, tests/serve/test_sweep_page.py",
    "Standard benchmarks (lm-evaluation-harness)": "task data from the Hugging Face Hub: "
    "tests/test_harness.py (local tasks)",
    "TPUs (PyTorch/XLA) and FP8": "a TPU or torch_xla's own environment: tests/xla/ (XLA's CPU "
    "device, in .venv-xla), tests/test_fp8.py (emulated FP8), tests/test_tpu_estimate.py",
}
REFUSALS = "Bad input, limits and errors"  # every command there is refused (exit 2), as written


def readme_commands() -> list[tuple[str, str, str]]:
    """(section, command, trailing comment) for each `tinylm` line in the README's bash blocks."""
    text = (REPO_ROOT / "README.md").read_text()
    out = []
    for section, body in re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M):
        if section in NOT_WALKED:
            continue
        for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
            for line in block.splitlines():
                line = line.strip()
                if "&& .venv/bin/tinylm " in line:  # "set up && run": the set-up is the CI's own
                    line = line.split("&&", 1)[1].strip()
                if not line or line.startswith("#") or line.startswith(SKIP):
                    continue
                command, _, comment = line.partition("  #")
                command = command.strip().removeprefix(".venv/bin/")
                assert command.startswith("tinylm "), f"README command not walked: {line}"
                out.append((section, command, comment.strip()))
    return out


def fresh_copy(dest):
    """The repository's tracked files (the working tree's versions) under `dest`."""
    try:
        files = subprocess.run(
            ["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = ["README.md"]
    for name in files:
        src = REPO_ROOT / name
        if src.is_file() and not src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def with_fast_settings(argv: list[str], comment: str) -> list[str]:
    """A README `tinylm train` command with the small model and few steps."""
    resume = "--resume" in argv
    if "--cooldown" in argv:  # a cool-down of 2 steps, not hundreds
        argv[argv.index("--cooldown") + 1] = "2"
    argv = [a for a in argv if not a.startswith("train.max_steps=")]
    if "--list" in argv or "--print-config" in argv:
        return argv
    # "Ctrl+C it": a time limit stops the run after one step instead (a stop like Ctrl+C's,
    # which the next resume lifts).
    limit = "1e-9" if "Ctrl+C" in comment else "0"
    if "train.fit_steps_to_time=true" in argv:  # a run fitted to its time: 3 seconds of it
        argv = [a for a in argv if not a.startswith("train.max_time_minutes=")]
        limit = "0.05"
    steps = STEPS["resume" if resume else "train"]
    return [*argv, *FAST, f"train.max_steps={steps}", f"train.max_time_minutes={limit}"]


def test_readme_commands_work_as_written(tmp_path, monkeypatch, capfd):
    repo = fresh_copy(tmp_path / "repo")
    monkeypatch.chdir(repo)
    # Stand-ins for what the README assumes the user has: their files, and a download.
    play = gzip.decompress((CORPORA_DIR / "shakespeare-val.txt.gz").read_bytes()).decode()
    (repo / "path" / "to").mkdir(parents=True)
    (repo / "path" / "to" / "input.txt").write_text(play[:40_000])
    (repo / "other.txt").write_text(play[40_000:60_000] + "Café, naïve: ½ ☃\n")
    (repo / "corpus").mkdir()
    (repo / "corpus" / "a.txt").write_text(play[:50_000])
    (repo / "corpus" / "b.txt").write_text(play[50_000:])
    (repo / "tinyshakespeare.txt").write_text(play)
    monkeypatch.setenv("TINYLM_DATA_TINYSHAKESPEARE", str(repo / "tinyshakespeare.txt"))

    commands = readme_commands()
    assert len(commands) >= 20, "the README walk found too few commands"
    for section, command, comment in commands:
        argv = shlex.split(command)[1:]
        refused = section == REFUSALS or comment.startswith("refused")
        if argv[0] == "train" and section != REFUSALS:
            argv = with_fast_settings(argv, comment)
        capfd.readouterr()
        code = run_cli(*argv)
        expected_code = 2 if refused else 0
        captured = capfd.readouterr()
        output = captured.out + captured.err
        with open(repo / "walk.log", "a") as log:  # the walk as a reader would see it
            log.write(f"$ {command}\n{output}\n")
        assert code == expected_code, f"`{command}` exited {code}:\n{output[-3000:]}"
        expected = re.findall(r'"([^"]+)"', comment)
        if refused and comment.startswith("..."):  # "# ... the end of the error line"
            expected.append(comment.removeprefix("...").strip())
        for quoted in expected:
            assert quoted in output, f"`{command}` did not print {quoted!r}:\n{output[-3000:]}"
    # What the walk left behind is what the README describes.
    assert (repo / "runs" / "first" / "checkpoints").is_dir()
    assert (repo / "compare.png").stat().st_size > 10_000
    assert (repo / "data" / "corpus" / "meta.json").is_file()


@pytest.mark.parametrize("command", ["train", "eval", "generate", "runs", "plot", "estimate"])
def test_every_command_has_help(command, capsys):
    assert run_cli(command, "--help") == 0
    assert "usage: tinylm " + command in capsys.readouterr().out
