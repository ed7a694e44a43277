"""`tinylm train`, `tinylm eval` and `tinylm generate`: argument parsing around the library calls."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tinylm.cli_args import device, float_in, int_in, utf8_text
from tinylm.config import MAX_NEW_TOKENS, SEED_MAX


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a preset or YAML config",
        description="Train a model. CONFIG is a preset name (see `tinylm train --list`) or a YAML file; "
        "overrides are section.key=value (e.g. train.max_steps=2000 data.train=input.txt). "
        "The run goes to out_dir/run_name (default runs/<preset>, or runs/<preset>-N when that one "
        "has checkpoints; a run_name with checkpoints is refused: --resume it instead).",
    )
    p.add_argument(
        "config", nargs="?", help="preset name or YAML file (omit with --resume RUN_DIR)"
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN_DIR",
        help="continue a run from its latest intact checkpoint (the run named by the config, or RUN_DIR)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="resume even if the config changed in ways that alter the run (never the model's "
        "shape); start even if the memory preflight says the run will not fit",
    )
    p.add_argument(
        "--cooldown",
        # 0 would be a plain resume said as a cool-down: refused rather than silently ignored
        type=int_in(1, 10**9, note="a cool-down of 0 steps is a plain resume: drop --cooldown"),
        default=None,
        metavar="N",
        help="with --resume: decay the LR to optim.min_lr over N more steps from the latest "
        "checkpoint (a WSD cool-down; the checkpoint must be in its stable phase)",
    )
    p.add_argument(
        "--list",
        action="store_true",
        help="list the presets (description, parameters, hardware) and exit",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build data, tokenizer and model, print sizes, memory and time per step, and exit",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval", help="evaluate a trained run on its validation data (or another source)"
    )
    p.add_argument("run", help="run directory or checkpoint directory")
    p.add_argument(
        "--checkpoint", default="best", choices=["best", "latest"], help="which checkpoint of a run"
    )
    p.add_argument(
        "--data", default="", help="evaluate on this source instead of the run's validation split"
    )
    p.add_argument(
        "--full", action="store_true", help="score every validation token (not a bounded sample)"
    )
    p.add_argument(
        "--stride",
        type=int_in(0, 2**20),
        default=0,
        help="with --full: sliding window stride, at most the context (0 = non-overlapping)",
    )
    p.add_argument(
        "--max-batches",
        type=int_in(0, 10**6),
        default=0,
        help="bounded evaluation size (0 = the run's eval.max_batches)",
    )
    p.add_argument("--batch-size", type=int_in(0, 65536), default=0, help="0 = the run's")
    p.add_argument("--device", type=device, default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument(
        "--tasks",
        default="",
        help="comma-separated lm-evaluation-harness tasks (e.g. hellaswag,arc_easy,lambada_openai) "
        "instead of validation loss; needs tinylm[eval]",
    )
    p.add_argument(
        "--num-fewshot", type=int_in(0, 1000), default=None, help="with --tasks: few-shot examples"
    )
    p.add_argument(
        "--limit", default=None, help="with --tasks: examples per task (N, or a fraction < 1)"
    )
    p.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="with --tasks: a directory of your own task YAML files (repeatable)",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample text from a trained run")
    p.add_argument("run", help="run directory or checkpoint directory")
    p.add_argument(
        "--prompt",
        type=utf8_text,
        default="",
        help="text to continue (default: start of a document)",
    )
    p.add_argument("--max-new-tokens", type=int_in(1, MAX_NEW_TOKENS), default=200)
    p.add_argument("--temperature", type=float_in(ge=0, le=100), default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int_in(0, 2**24), default=50, help="0 = off")
    p.add_argument(
        "--top-p",
        type=float_in(gt=0, le=1),
        default=1.0,
        help="nucleus sampling mass (1.0 = off)",
    )
    p.add_argument(
        "--num-samples", type=int_in(1, 1000), default=1, help="how many samples to print"
    )
    p.add_argument(
        "--seed", type=int_in(0, SEED_MAX), default=None, help="sampling seed (default: random)"
    )
    p.add_argument(
        "--checkpoint", default="best", choices=["best", "latest"], help="which checkpoint of a run"
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute attention over the whole context each token",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STRING",
        help="end a sample before this text (repeatable; matched on the decoded text)",
    )
    p.add_argument("--device", type=device, default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.set_defaults(func=cmd_generate)


def cmd_train(args: argparse.Namespace) -> int:
    from tinylm.config import (
        ConfigError,
        load_config,
        load_config_file,
        parse_override,
    )
    from tinylm.train.signals import enable_stack_dumps

    enable_stack_dumps()  # `kill -USR1 PID`, or a native crash, shows where each thread is
    if args.list:
        from tinylm.train.preview import preset_table

        print(preset_table())
        return 0
    config, overrides = args.config, list(args.overrides)
    # `tinylm train --resume runs/x key=value`: argparse sees the first override as CONFIG.
    if config and "=" in config:
        config, overrides = None, [config, *overrides]
    for text in overrides:
        parse_override(text)  # fail fast on malformed overrides
    resume_dir = args.resume if isinstance(args.resume, str) else None
    resume_reason = None  # set when train.resume continues a run without --resume
    if resume_dir:
        config_file = Path(resume_dir) / "config.yaml"
        if not config_file.is_file():
            raise ConfigError(
                f"--resume {resume_dir}: no config.yaml there; is it a run directory?"
            )
        base = load_config_file(config_file)
        cfg = load_config(None, _as_overrides(base.to_dict()) + overrides) if overrides else base
        run_dir = Path(resume_dir)
        cfg.run_name = run_dir.name
    else:
        if not config:
            raise ConfigError(
                "give a preset or config file (e.g. `tinylm train tiny`), or --resume RUN_DIR"
            )
        cfg = load_config(config, overrides)
        from tinylm.data.precheck import check_local_sources

        check_local_sources(cfg.data)  # a mistyped data path, before torch is imported
        from tinylm.train.resume import default_run_dir

        explicit_name = bool(cfg.run_name)
        run_dir = (
            default_run_dir(cfg, config)
            if not args.resume
            else Path(cfg.out_dir) / (cfg.run_name or Path(config).stem)
        )
        cfg.run_name = run_dir.name
        if not args.resume and not (args.print_config or args.dry_run):
            from tinylm.train.auto_resume import decide  # train.resume: elastic restarts

            decision = decide(cfg, run_dir, explicit_name, config)
            run_dir, args.resume, resume_reason = (
                decision.run_dir,
                decision.resume,
                decision.reason,
            )

    def preflight(cfg) -> None:
        # Before any data or weights (and before --dry-run builds them): a run that cannot fit
        # is refused at once. --print-config only prints.
        if not args.force and not args.print_config:
            from tinylm.preflight import check_memory
            from tinylm.train.runtime import select_device

            device = select_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", 0)))[0]
            check_memory(cfg, device)

    init = None
    if cfg.train.init_from and not args.resume:
        from tinylm.train.init_from import apply_init_from

        # Before the run directory exists: errors first; the preflight before the weights load.
        init = apply_init_from(cfg, overrides, preflight)

    args.run_dir = run_dir  # where an internal-error report goes (tinylm/crash.py)
    preflight(cfg)

    if args.cooldown is not None:
        if not args.resume:
            raise ConfigError("--cooldown N continues a run: use it with --resume RUN_DIR")
        from tinylm.train.resume import apply_cooldown

        print(apply_cooldown(run_dir, cfg, args.cooldown))

    if args.print_config or args.dry_run:
        from tinylm.train import preview

        print(preview.resolved_yaml(cfg) if args.print_config else preview.dry_run(cfg, run_dir))
        return 0
    from tinylm.train.trainer import train

    result = train(
        cfg,
        run_dir,
        resume=bool(args.resume),
        force=args.force,
        init=init,
        resume_reason=resume_reason,
    )
    if os.environ.get("RANK", "0") != "0":  # under torchrun, the main process reports
        return 0
    if result.stop_reason != "reached train.max_steps":
        print(f"stopped: {result.stop_reason}", file=sys.stderr)
    print(f"run directory: {result.run_dir}")
    return 0


def _as_overrides(tree: dict, prefix: str = "") -> list[str]:
    """A config dict as dotted overrides (so a saved run's config can take more overrides)."""
    import yaml

    out = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(_as_overrides(value, f"{name}."))
        else:
            out.append(
                f"{name}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            )
    return out


def _load_for_harness(run: str, checkpoint: str, device: str):
    """The checkpoint `tinylm eval --tasks` scores (eval/ sits below train/: it is handed this)."""
    from tinylm.eval.harness_run import LoadedCheckpoint, run_dir_of
    from tinylm.train import runtime
    from tinylm.train.checkpoint import load_model
    from tinylm.train.sinks import METRICS_FILE

    dev, _ = runtime.select_device(device)
    model, cfg, tokenizer, path = load_model(run, checkpoint, dev)
    precision = runtime.select_precision("auto", dev)
    return LoadedCheckpoint(
        model,
        cfg,
        tokenizer,
        path,
        dev,
        autocast=lambda: runtime.autocast(dev, precision),
        metrics_file=run_dir_of(path) / METRICS_FILE,
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from tinylm.suggest import refuse_missing_path

    refuse_missing_path(
        args.run, "a run directory nor a checkpoint directory"
    )  # before torch is imported
    if args.tasks:
        from tinylm.eval.harness_run import parse_limit, run_harness

        if args.data or args.full or args.stride or args.max_batches:
            from tinylm.config import ConfigError

            raise ConfigError(
                "--tasks runs harness benchmarks; --data, --full, --stride and --max-batches "
                "are for validation loss: drop them or run `tinylm eval` twice"
            )

        result = run_harness(
            lambda: _load_for_harness(args.run, args.checkpoint, args.device),
            [t.strip() for t in args.tasks.split(",") if t.strip()],
            num_fewshot=args.num_fewshot,
            limit=parse_limit(args.limit),
            batch_size=args.batch_size,
            include_path=args.include_path,
        )
        print(result.table)
        print(f"results: {result.path}")
        return 0
    import torch

    from tinylm.config import ConfigError
    from tinylm.data import resolve_data
    from tinylm.eval.evaluate import evaluate_sets
    from tinylm.train import distributed, runtime
    from tinylm.train.checkpoint import load_model

    # Under torchrun every rank scores its share of the batches (evaluate.score_windows).
    dist_info = distributed.setup()
    device, _ = runtime.select_device(args.device, dist_info.local_rank)
    model, cfg, tokenizer, path = load_model(args.run, args.checkpoint, device)
    if args.stride > cfg.model.context_length:  # windows would skip tokens between them
        raise ConfigError(
            f"--stride {args.stride} is past the model's context ({cfg.model.context_length}): "
            f"use 1..{cfg.model.context_length} (0 = non-overlapping windows)"
        )
    precision = runtime.select_precision("auto", device)
    quiet = {} if dist_info.is_main else {"log": lambda _: None}
    if not dist_info.is_main:  # rank 0 prepares the data (once), the others then open it
        distributed.barrier(dist_info)
    if args.data:
        cfg.data.train, cfg.data.mix, cfg.data.val, cfg.data.val_fraction = args.data, [], "", 0.0
        data = resolve_data(
            cfg.data, tokenizer, cfg.model.context_length, train_label="eval data", **quiet
        )
        val_sets = {name: tokens for name, tokens, _ in data.train}
    else:
        val_sets = resolve_data(cfg.data, tokenizer, cfg.model.context_length, **quiet).val
    if dist_info.is_main:
        distributed.barrier(dist_info)
    if not val_sets:
        from tinylm.data.errors import DataError

        raise DataError(
            "this run has no validation split (data.val_fraction=0); pass --data SOURCE"
        )
    if dist_info.is_main:
        print(f"checkpoint: {path} (step {int(path.name.split('_')[-1])})")
    batch_size = args.batch_size or cfg.eval.batch_size or cfg.train.batch_size
    token_bytes = tokenizer.token_bytes()
    with torch.no_grad():
        # A full pass scores every validation token once; otherwise a bounded, fixed sample.
        results = evaluate_sets(
            model,
            val_sets,
            batch_size=batch_size,
            seq_len=cfg.model.context_length,
            max_batches=None if args.full else (args.max_batches or cfg.eval.max_batches),
            stride=args.stride or None,
            device=device,
            autocast=lambda: runtime.autocast(device, precision),
            token_bytes=token_bytes,
            shard=(dist_info.rank, dist_info.world_size),
            reduce=lambda sums: distributed.all_reduce_sum(sums, dist_info),
        )
    distributed.teardown(dist_info)
    for name, r in results.items():
        if dist_info.is_main:
            _print_result(name, r)
    return 0


def _print_result(name: str, r) -> None:
    bpb = f"  bits/byte {r.bits_per_byte:.4f}" if r.bits_per_byte is not None else ""
    print(
        f"{name:>12}: loss {r.loss:.4f}  perplexity {r.perplexity:.3f}{bpb}  ({r.tokens:,} tokens)"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from tinylm.suggest import refuse_missing_path

    refuse_missing_path(
        args.run, "a run directory nor a checkpoint directory"
    )  # before torch is imported
    from tinylm.generate import generate, generate_stream
    from tinylm.train import runtime
    from tinylm.train.checkpoint import load_model

    if any(s == "" for s in args.stop):
        from tinylm.config import ConfigError

        raise ConfigError("--stop: a stop string cannot be empty")
    device, _ = runtime.select_device(args.device)
    model, cfg, tokenizer, _path = load_model(args.run, args.checkpoint, device)
    if args.max_new_tokens > cfg.model.context_length:
        print(
            f"note: {args.max_new_tokens} new tokens is past the model's context "
            f"({cfg.model.context_length}); beyond it each token recomputes the whole window",
            file=sys.stderr,
        )
    prompt = tokenizer.encode(args.prompt) if args.prompt else []
    from tinylm.tokenizer.char import CharTokenizer, replaced_note

    if isinstance(tokenizer, CharTokenizer) and (n := prompt.count(tokenizer.unk_id)):
        print(replaced_note(n, len(prompt), "prompt"), file=sys.stderr)
    if not prompt:
        prompt = [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
        shown_prompt = ""
    else:
        shown_prompt = args.prompt
    for i in range(args.num_samples):
        kwargs = dict(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p if args.top_p < 1.0 else None,
            eot_id=tokenizer.eot_id,
            seed=None if args.seed is None else args.seed + i,
            use_cache=not args.no_cache,
        )
        if args.stop:
            text = _until_stop(generate_stream(model, prompt, **kwargs), tokenizer, args.stop)
        else:
            ids = generate(model, prompt, **kwargs)
            text = tokenizer.decode([t for t in ids if t != tokenizer.eot_id])
        if args.num_samples > 1:
            print(f"--- sample {i} ---")
        print(shown_prompt + text)
    return 0


def _until_stop(ids, tokenizer, stops: list[str]) -> str:
    """The decoded text of `ids` up to (not including) the first stop string; stops sampling there."""
    from contextlib import closing

    from tinylm.stops import TextStream

    text = TextStream(tokenizer, stops)
    with closing(ids):
        for token in ids:
            text.push(token)
            if text.stopped:
                break
    return text.text
