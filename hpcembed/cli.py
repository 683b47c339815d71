"""Command line: `hpcembed run|tokenize [--config job.toml] [options]`, `hpcembed serve`, and `hpcembed launch`
for Slurm batch scripts. Parses, builds a JobConfig, runs, reports.

Errors meant for the user print as one line and exit with a code from hpcembed.errors; set HPCEMBED_DEBUG=1
for tracebacks."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import sys

from . import __version__
from .config import FIELDS, TOKENIZE_FIELDS, build_config, load_toml
from .errors import EXIT_FAILED, EXIT_INVALID_INPUT, EXIT_STOPPED, EXIT_USAGE, ConfigError, HpcEmbedError
from .serve.options import SERVE_FIELDS, SERVE_OPTIONS

log = logging.getLogger("hpcembed")

RUN_EPILOG = """\
Every long option can also be a key of the --config TOML job file (with '_' or '-'); the command line wins.
Output: Parquet shards (id, embedding) in OUTPUT, _manifest.json, _rejects.jsonl when rows were skipped, and
_SUCCESS last, only when every input row was embedded or recorded as rejected.
Exit codes: 0 done, 1 failed, 2 bad usage or job file, 3 invalid input (fail-fast mode), 75 stopped early by
SIGTERM/SIGUSR1/SIGUSR2 with committed work kept (rerun the same command to resume)."""


TOKENIZE_EPILOG = """\
Writes a token directory: Arrow IPC shards (id, input_ids list<int32>, truncated, special tokens included),
_manifest.json naming the tokenizer, _rejects.jsonl when rows were skipped, and _SUCCESS last. Embed it on GPU
nodes with `hpcembed run --input TOKDIR --output DIR`, which refuses it if the model's tokenizer differs.
Repeated ids are checked by that embedding job. Exit codes as for `hpcembed run`."""


def _add_job_options(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    for name, f in FIELDS.items():
        if only is not None and name not in only:
            continue
        flag = "--" + name.replace("_", "-")
        kwargs = {"dest": name, "default": None, "help": f.metadata["help"]}
        if f.metadata.get("choices"):
            kwargs["choices"] = [c for c in f.metadata["choices"] if c]
        if f.type in ("bool", bool) or f.default is False:
            kwargs["action"] = "store_true"
        elif "bool" in str(f.type):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "nargs" in f.metadata:
            kwargs["nargs"] = f.metadata["nargs"]
            if f.metadata.get("repeatable"):
                kwargs["action"] = "extend"
            kwargs["metavar"] = "PATH"
        else:
            default = f.default
            kwargs["type"] = type(default) if default not in (None, "") else str
            kwargs["metavar"] = name.split("_")[-1].upper()
        if f.default not in (None, "", [], 0, dataclasses.MISSING) and "action" not in kwargs:
            kwargs["help"] += f" (default: {f.default})"
        parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcembed", description="Embed very large text corpora as one job: "
                                     "corpus in (Parquet/JSONL/CSV/text), Parquet embeddings with ids out.")
    parser.add_argument("--version", action="version", version=f"hpcembed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="embed a corpus", description="Embed a corpus into Parquet shards.",
                         epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", metavar="JOB.toml", help="TOML job file with the same keys as the long options")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_job_options(run)
    tokenize = sub.add_parser("tokenize", help="tokenize a corpus into a token directory (CPU nodes)",
                              description="Tokenize a corpus into Arrow IPC token shards, on CPU-only nodes, for a "
                              "later `hpcembed run --input TOKDIR` on GPU nodes.", epilog=TOKENIZE_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    tokenize.add_argument("--config", metavar="JOB.toml", help="TOML job file (keys of `hpcembed run` are accepted; "
                          "those that concern the encoder are ignored)")
    tokenize.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_job_options(tokenize, TOKENIZE_FIELDS)
    launch = sub.add_parser("launch", help="run a job step from a Slurm batch script: pass signals to it, requeue "
                            "the job if it stopped early", description="Run COMMAND (srun/mpiexec ... hpcembed "
                            "run ...) as a child, pass SIGUSR1/SIGUSR2/SIGTERM to it, and requeue the Slurm job "
                            "when it exits 75 (stopped early, resumable). See slurm/README.md.")
    launch.add_argument("--no-requeue", dest="requeue", action="store_false", help="pass exit 75 on instead")
    launch.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    launch.add_argument("step", nargs=argparse.REMAINDER, metavar="COMMAND", help="the job step to run")
    verify = sub.add_parser("verify", help="check an output directory before loading it anywhere",
                            description="Check an embedding output directory: every shard against the ledger "
                            "(size, rows, checksum), no stray shards, no id twice, dimensions, finite values and "
                            "norms. Prints a summary; exit 3 if there is any problem, naming the shard.")
    verify.add_argument("output", metavar="OUTPUT")
    verify.add_argument("--input", nargs="+", metavar="PATH", dest="inputs",
                        help="also check the ids against the job's inputs (give its --input): every valid input row "
                        "is in the output or in _rejects.jsonl, and the output holds no other id")
    serve = sub.add_parser("serve", help="serve the model over HTTP (OpenAI-compatible embeddings API)",
                           description="Serve live queries with the same model, tokenizer and engine as `hpcembed "
                           "run`: POST /v1/embeddings (OpenAI embeddings API), GET /health, GET /metrics "
                           "(Prometheus). SIGTERM drains: accepted requests are answered, then it exits 0.")
    serve.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_serve_options(serve)
    _add_job_options(serve, SERVE_FIELDS)
    from .scaling.cli import add_parser as add_scaling
    add_scaling(sub)
    return parser


def _add_serve_options(parser: argparse.ArgumentParser) -> None:
    for name, f in SERVE_OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest="serve_" + name, type=type(f.default),
                            default=f.default, metavar=name.split("_")[-1].upper(),
                            help=f"{f.metadata['help']} (default: {f.default})")


def _serve(args) -> int:
    from .serve.options import ServeOptions
    cli_values = {name: getattr(args, name, None) for name in SERVE_FIELDS}
    cfg = build_config({}, cli_values, serving=True)
    if cfg.dtype == "fp8":
        raise ConfigError("--dtype fp8 is not served: its fidelity check needs a job's own texts; serve in bf16")
    opts = ServeOptions(**{name: getattr(args, "serve_" + name) for name in SERVE_OPTIONS})
    for module in ("aiohttp", "prometheus_client"):
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"hpcembed serve needs its HTTP stack ({module} is missing): "
                              "pip install 'hpcembed[serve]'")
    from .serve.main import serve
    return serve(cfg, opts)


def _reported(command) -> int:
    """Run a command; a mistake of the user's is one line and its exit code."""
    try:
        return command()
    except HpcEmbedError as exc:
        print(f"hpcembed: error: {exc}", file=sys.stderr)
        return exc.exit_code


def _verify(args) -> int:
    from .verify import print_report, verify
    problems, summary = verify(args.output, args.inputs)
    print_report(problems, summary, sys.stderr)
    return EXIT_INVALID_INPUT if problems else 0


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("hpcembed: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose or os.environ.get("HPCEMBED_DEBUG") else logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    _setup_logging(getattr(args, "verbose", False))
    if args.command == "scaling":
        from .scaling.cli import main as scaling_main
        return _reported(lambda: scaling_main(args))
    if args.command == "verify":
        return _reported(lambda: _verify(args))
    if args.command == "launch":
        from .slurm import launch
        step = args.step[1:] if args.step[:1] == ["--"] else args.step
        return _reported(lambda: launch(step, requeue=args.requeue))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")        # never reach for a model hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if args.command == "serve":
        return _reported(lambda: _serve(args))
    try:
        cli_values = {name: getattr(args, name, None) for name in FIELDS}
        cfg = build_config(load_toml(args.config) if args.config else {}, cli_values)
        from .launch import KINDS, run
        manifest = run(cfg, KINDS[args.command])
        if manifest is None:          # not the conductor: it reports for the job
            return 0
    except HpcEmbedError as exc:
        print(f"hpcembed: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hpcembed: interrupted; no _SUCCESS written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("HPCEMBED_DEBUG"):
            raise
        print(f"hpcembed: internal error: {type(exc).__name__}: {exc} (set HPCEMBED_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return EXIT_FAILED
    if manifest.get("already_complete"):
        return 0
    if manifest.get("stopped_early"):
        log.info("stopped by %s: %s of %s rows committed (%s this run); rerun the same command to resume "
                 "(exit %d)", manifest["stopped_early"], f"{manifest['rows_written']:,}", f"{manifest['rows']:,}",
                 f"{manifest['rows_written_this_run']:,}", EXIT_STOPPED)
        return EXIT_STOPPED
    if manifest.get("texts_truncated"):
        log.warning("%s texts were longer than %s tokens and were truncated; --chunk-tokens N embeds them whole, "
                    "in windows", f"{manifest['texts_truncated']:,}",
                    manifest.get("max_seq_length") or manifest.get("tokenizer", {}).get("max_seq_length"))
    status = "complete" if manifest["complete"] else "INCOMPLETE (no _SUCCESS)"
    if manifest.get("rehearsal") and manifest["complete"]:
        status = "rehearsal complete (zero embeddings, no _SUCCESS)"
    log.info("%s: %s rows %s, %s rejected, %s texts/s, %s tokens/s -> %s", status,
             f"{manifest['rows_written']:,}", "tokenized" if manifest.get("kind") == "tokens" else
             "rehearsed" if manifest.get("rehearsal") else "embedded",
             f"{manifest['rejected_rows']:,}", f"{manifest['texts_per_s']:,}",
             f"{manifest['tokens_per_s']:,}", cfg.output)
    return 0 if manifest["complete"] else EXIT_FAILED
