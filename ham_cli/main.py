"""The ``ham`` command: one console script for every part of HAM.

    ham transfer CONTENT --style S -o OUT.png     one transfer in this process (needs the engine)
    ham eval --content DIR --style DIR            the paper's metrics table over a benchmark (needs the engine)
    ham api [--host H] [--port P] [--workers N]   the HTTP API (uvicorn)
    ham worker [...]                              a GPU worker (needs the engine)
    ham up [--host H] [--port P] [--model M ...]  Redis + API + one worker (per model) on this machine
    ham submit CONTENT --style S -o OUT.png       send a job to a running API, wait, download
    ham styles create|list|get|delete ...         the style library of a running API

Every sub-command's implementation is imported only when it runs, so ``ham --help``, ``ham
api`` and ``ham submit`` never import torch. Exit status: 0 success, 1 failure, 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from ham_core.output import OUTPUT_SPECS
from ham_engine.cli import add_param_arguments, params_from_args
from ham_engine.params import PARAM_SPECS

PROG = "ham"
DEFAULT_API = "http://127.0.0.1:8000"


# --- ham api -------------------------------------------------------------------------------------


def _run_api(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from ham_core.config import get_settings

    try:
        settings = get_settings()
    except ValidationError as exc:
        print(f"{PROG} api: error: invalid HAM_* settings: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    from ham_core.logs import configure_logging, logging_config

    configure_logging(settings, "api")
    uvicorn.run(
        "service.api.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level.lower(),
        # uvicorn applies this in every process it starts: its own lines (access log included) go through
        # our handler, so they are JSON under HAM_LOG_FORMAT=json and carry the request id.
        log_config=logging_config(settings, "api"),
        proxy_headers=True,
    )
    return 0


# --- ham up / ham worker (delegated) --------------------------------------------------------------


def _run_up(args: argparse.Namespace) -> int:
    from ham_cli.stack import run_stack

    return run_stack(args.host, args.port, data_dir=args.data_dir, models=args.model or ())


def _run_worker(argv: list[str]) -> int:
    try:
        from worker.main import main as worker_main
    except ImportError as exc:
        print(f"{PROG} worker: error: the worker needs the engine ({exc.name} missing): "
              "pip install 'ham-style-transfer[engine]'", file=sys.stderr)
        return 1
    return int(worker_main(argv) or 0)


# --- ham submit ----------------------------------------------------------------------------------


class SubmitError(Exception):
    """A failure ``ham submit`` reports as one line."""


class _Progress:
    """One status line, redrawn in place on a terminal, printed on change otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last = ""

    def show(self, job: Any) -> None:
        if self.quiet:
            return
        if job.status == "queued":
            line = "queued" if job.queue_position is None else f"queued (position {job.queue_position + 1})"
        elif job.status == "running":
            line = f"running {job.progress * 100:5.1f}%"
        else:
            line = job.status
        if line == self.last:
            return
        self.last = line
        if self.tty:
            print(f"\r{job.id}: {line:<30}", end="", file=sys.stderr, flush=True)
        else:
            print(f"{job.id}: {line}", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty and self.last and not self.quiet:
            print(file=sys.stderr)


def _image_argument(value: str, what: str) -> str | bytes:
    """A URL or data: URI as given (the server fetches it); a path is read here."""
    if value.startswith(("http://", "https://", "data:")):
        return value
    try:
        return Path(value).expanduser().read_bytes()
    except OSError as exc:
        raise SubmitError(f"{what}: cannot read {value!r}: {exc.strerror}") from None


def _checked_submit_arguments(args: argparse.Namespace) -> tuple[Path, Any, Any, str]:
    """``ham submit``'s arguments checked before anything is sent: (output, content, style, api URL)."""
    import httpx

    if not args.style and not args.style_prompt and not args.style_id:
        raise SubmitError("give --style, --style-prompt, or both (or --style-id)")
    output = Path(args.output).expanduser()
    if not output.parent.is_dir():
        raise SubmitError(f"output: folder {str(output.parent)!r} does not exist")
    content = _image_argument(args.content, "content")
    style = _image_argument(args.style, "style") if args.style else None
    for option, value in (("--key", args.key), ("--idempotency-key", args.idempotency_key)):
        # HTTP headers are ASCII: refuse here rather than let the client library raise mid-request.
        if value and not value.isascii():
            raise SubmitError(f"{option}: must be ASCII (it travels in an HTTP header)")
    api = args.api.rstrip("/")
    try:
        httpx.URL(api)
    except httpx.InvalidURL as exc:
        raise SubmitError(f"--api: not a valid URL {api!r}: {exc}") from None
    return output, content, style, api


def _submit(args: argparse.Namespace) -> int:
    import httpx

    from ham_client import ApiError, Client, JobFailed, NotTheApi, Unreachable, WaitTimeout

    output, content, style, api = _checked_submit_arguments(args)
    progress = _Progress(args.quiet)
    params = params_from_args(args, PARAM_SPECS + OUTPUT_SPECS)
    if args.model:
        params["model"] = args.model
    events = args.webhook_events.split(",") if args.webhook_events else None
    job = None
    with Client(api, api_key=args.key) as client:
        try:
            job = client.submit(content, style, args.style_prompt, style_id=args.style_id, webhook_url=args.webhook_url,
                                webhook_events=events, idempotency_key=args.idempotency_key, **params)
            progress.show(job)
            deadline = time.monotonic() + args.timeout
            while not job.terminal:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SubmitError(f"job {job.id} not finished after {args.timeout}s (still {job.status})")
                # Plain polls so the status line moves (wait() would block until the end).
                time.sleep(min(args.poll_interval, left))
                job = client.get(job.id)
                progress.show(job)
            progress.done()
            data = client.download(job)
        except KeyboardInterrupt:
            progress.done()
            if job is None:
                raise
            print(f"{PROG} submit: interrupted; job {job.id} continues on the server "
                  f"(cancel: POST {api}/v1/transfers/{job.id}/cancel)", file=sys.stderr)
            return 130
        except (ApiError, JobFailed, WaitTimeout) as exc:
            progress.done()
            raise SubmitError(str(exc)) from None
        except NotTheApi as exc:
            raise SubmitError(str(exc).replace("is it the HAM API?", "is --api the HAM API?")) from None
        except Unreachable as exc:
            progress.done()
            if job is not None and job.terminal:
                # The URL comes from HAM_PUBLIC_URL (or the S3 endpoint), which may not be reachable from here.
                raise SubmitError(f"downloading the result from {job.result_url}: {exc}") from None
            raise SubmitError(str(exc)) from None
        except httpx.HTTPError as exc:
            where = f"downloading the result of job {job.id}" if job is not None and job.terminal else api
            raise SubmitError(f"{where}: {type(exc).__name__}: {exc}") from None
    try:
        output.write_bytes(data)
    except OSError as exc:
        raise SubmitError(f"output: cannot write {str(output)!r}: {exc.strerror}") from None
    if not args.quiet:
        print(f"{job.id}: wrote {output}", file=sys.stderr)
    return 0


def _run_submit(args: argparse.Namespace) -> int:
    try:
        return _submit(args)
    except SubmitError as exc:
        print(f"{PROG} submit: error: {exc}", file=sys.stderr)
        return 1


def _add_submit_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="send a transfer to a running API, wait for it, download the result",
        description="POST a transfer job to the API, show its progress, and save the result.",
    )
    parser.add_argument("content", help="the content image (PNG, JPEG or WebP): a path, an http(s) URL or a data: URI")
    parser.add_argument("--style", help="the style image (a path, an http(s) URL or a data: URI)")
    parser.add_argument("--style-prompt", help="a text describing the style (with or without --style)")
    parser.add_argument("--model", help="a model the API serves (GET /v1/models); default: its default model")
    parser.add_argument("--style-id", action="append",
                        help="a style of your library (`ham styles list`); repeat for several (one result each)")
    parser.add_argument("-o", "--output", required=True, help="where to write the result (see --output-format)")
    parser.add_argument("--api", default=os.environ.get("HAM_API_URL", DEFAULT_API),
                        help=f"API base URL (default: $HAM_API_URL or {DEFAULT_API})")
    parser.add_argument("--key", default=os.environ.get("HAM_API_KEY"), help="API key (default: $HAM_API_KEY)")
    # The same parameters the API accepts (docs/api.md), from one list: ham_engine.params.PARAM_SPECS.
    add_param_arguments(parser, server_defaults=True, specs=PARAM_SPECS + OUTPUT_SPECS)
    parser.add_argument("--webhook-url", help="URL the server POSTs the job to (see --webhook-events)")
    parser.add_argument("--webhook-events", help="comma-separated: start, progress, completed (default completed)")
    parser.add_argument("--idempotency-key", help="retry-safe submission key")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the result (default 1800)")
    parser.add_argument("--poll-interval", type=float, default=1.0,
                        help="seconds between status checks")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    parser.set_defaults(handler=_run_submit)


# --- the parser ----------------------------------------------------------------------------------

# Sub-commands whose own implementation parses the rest of the command line.
_DELEGATED = {"worker": _run_worker}


def build_parser() -> argparse.ArgumentParser:
    """The ``ham`` argument parser (imports no engine code)."""
    from ham_engine.cli import add_transfer_parser  # torch-free at import time
    from ham_engine.evaluation.cli import add_eval_parser  # torch-free at import time

    parser = argparse.ArgumentParser(prog=PROG, description="HAM style transfer: engine, HTTP service, workers.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_transfer_parser(subparsers)
    add_eval_parser(subparsers)

    api = subparsers.add_parser("api", help="serve the HTTP API (settings from HAM_* variables)")
    api.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    api.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    api.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    api.set_defaults(handler=_run_api)

    subparsers.add_parser(
        "worker", help="run a transfer worker (model loaded once; `ham worker --help` for options)", add_help=False
    )

    up = subparsers.add_parser("up", help="run Redis, the API and one worker on this machine")
    up.add_argument("--host", default="127.0.0.1", help="API bind address (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=8000, help="API port (default 8000)")
    up.add_argument("--data-dir", type=Path, default=None,
                    help="Redis data, file storage and logs (default ./ham-data)")
    up.add_argument("--model", action="append", metavar="MODEL",
                    help="serve this model with a worker of its own; repeat for several (the first is the default): "
                    "--model tiny --model tiny-xl. Default: one worker of $HAM_MODEL")
    up.set_defaults(handler=_run_up)

    _add_submit_parser(subparsers)
    from ham_client.styles_cli import add_styles_parser  # httpx + pydantic only

    add_styles_parser(subparsers, PROG)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ham`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        return _DELEGATED[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
