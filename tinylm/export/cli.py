"""`tinylm export RUN --format hf --out DIR`: argument parsing around `writer.export_hf`."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a run as a Hugging Face transformers model directory",
        description="Write a directory that stock transformers loads with "
        "AutoModelForCausalLM.from_pretrained(DIR) and AutoTokenizer.from_pretrained(DIR) "
        "(no trust_remote_code): config.json, model.safetensors, generation_config.json, "
        "tokenizer files and a model card. Architectures without an exact stock class are refused.",
    )
    p.add_argument("run", help="run directory or checkpoint directory")
    p.add_argument("--format", default="hf", choices=["hf"], help="output format")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weight dtype")
    p.add_argument(
        "--checkpoint", default="best", choices=["best", "latest"], help="which checkpoint of a run"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into an existing non-empty directory (replaces the exported files only)",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from tinylm.suggest import refuse_missing_path

    refuse_missing_path(
        args.run, "a run directory nor a checkpoint directory"
    )  # before torch is imported
    from tinylm.export.writer import export_hf

    result = export_hf(
        args.run, args.out, dtype=args.dtype, which=args.checkpoint, force=args.force
    )
    print(
        f"exported step {result.step} as {result.class_name} to {result.out} "
        f"({', '.join(result.files)})"
    )
    if result.left_alone:
        print(f"left alone in {result.out}: {', '.join(result.left_alone)}")
    return 0
