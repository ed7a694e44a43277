"""`tinylm serve`: argument parsing around `tinylm.serve.app` and uvicorn (imported lazily)."""

from __future__ import annotations

import argparse
import os
import sys

from tinylm.cli_args import device, int_in

API_KEY_ENV = "TINYLM_API_KEY"
# Mirrors tinylm.serve.registry.DEFAULT_MAX_MODELS (not imported: that pulls in torch at parse time).
DEFAULT_MAX_MODELS = 4


def is_loopback(host: str) -> bool:
    """Whether `--host` reaches this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


def check_api_key(key: str | None) -> None:
    """Refuse a key that cannot protect anything: empty (an unset `$KEY` in `--api-key "$KEY"`)
    or with characters an HTTP header cannot carry as typed."""
    from tinylm.config import ConfigError

    if key is None:
        return
    if not key.strip():
        raise ConfigError(
            f"--api-key (or ${API_KEY_ENV}) is empty, which would turn authentication off: "
            f"give a key, or unset {API_KEY_ENV} and leave --api-key out to serve without one"
        )
    if not key.isascii() or not key.isprintable() or key != key.strip() or " " in key:
        raise ConfigError(
            "--api-key: use printable ASCII without spaces (it travels in the Authorization "
            "header), e.g. the output of: python -c 'import secrets; print(secrets.token_hex(16))'"
        )


def check_root(path: str) -> None:
    """A runs directory or a run directory, refused at start when it is not one."""
    from pathlib import Path

    from tinylm.config import ConfigError

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{path}: no such run or runs directory")
    if not root.is_dir():
        raise ConfigError(
            f"{path} is a file: tinylm serve takes a runs directory or one run's directory "
            f"(e.g. tinylm serve {root.parent})"
        )


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `tinylm serve`."""
    p = sub.add_parser(
        "serve",
        help="HTTP server: OpenAI-compatible completions, runs dashboard and playground",
        description="Serve the runs under PATH (or the run PATH): an OpenAI-compatible API "
        "(/v1/models, /v1/completions), /health, and a page at / with a live runs dashboard "
        "and a playground. Needs the 'serve' extra: pip install 'tinylm[serve]'.",
    )
    p.add_argument(
        "path", nargs="?", default="runs", help="runs directory or one run (default: runs)"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only)",
    )
    p.add_argument("--port", type=int_in(0, 65535), default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help="require 'Authorization: Bearer KEY' on /v1 and /api routes (default: "
        f"${API_KEY_ENV}; an empty key is refused, so an unset $KEY cannot turn the check off)",
    )
    p.add_argument(
        "--truncate",
        action="store_true",
        help="cut prompts too long for the context from the left instead of refusing them (400)",
    )
    p.add_argument(
        "--max-batch",
        type=int_in(1, 256),
        default=16,
        help="requests decoded together per model (default 16)",
    )
    p.add_argument(
        "--no-auto-reload",
        action="store_true",
        help="keep serving the checkpoint first loaded for a run (POST /api/reload still switches)",
    )
    p.add_argument(
        "--max-body-kb", type=int_in(1, 2**20), default=1024, help="largest request body (KiB)"
    )
    p.add_argument(
        "--threads",
        type=int_in(0, 1024),
        default=0,
        help="torch CPU threads (default 0: torch's choice; 1 suits tiny models on a busy machine)",
    )
    p.add_argument(
        "--max-models",
        type=int_in(1, 1024),
        default=DEFAULT_MAX_MODELS,
        help=f"checkpoints kept loaded at once, least recently used first out "
        f"(default {DEFAULT_MAX_MODELS})",
    )
    p.add_argument("--device", type=device, default="auto")
    p.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn log level (default: warning)",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tinylm.config import ConfigError

    check_root(args.path)
    check_api_key(args.api_key)
    try:
        import uvicorn

        from tinylm.serve.app import ServeSettings, create_app
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"tinylm serve needs the 'serve' extra ({e.name} is missing): "
            "pip install 'tinylm[serve]'"
        ) from e
    import torch

    from tinylm.train import runtime

    if args.threads:
        torch.set_num_threads(args.threads)
    device, _ = runtime.select_device(args.device)
    settings = ServeSettings(
        root=Path(args.path),
        api_key=args.api_key,
        truncate=args.truncate,
        max_body_bytes=args.max_body_kb * 1024,
        max_batch=args.max_batch,
        auto_reload=not args.no_auto_reload,
        device=str(device),
        max_models=args.max_models,
    )
    if not args.api_key and not is_loopback(args.host):
        print(
            f"warning: serving on {args.host} without an API key: anyone who can reach this "
            f"port can use the models and read the runs; set --api-key or ${API_KEY_ENV}",
            file=sys.stderr,
            flush=True,
        )
    app = create_app(settings)
    print(f"tinylm serve: {settings.root} at http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
