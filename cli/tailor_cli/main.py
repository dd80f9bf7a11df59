"""`tailor`: the local stack, pipelines, artifacts and direct stage commands."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import grpc
import yaml
from google.protobuf import json_format
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from tailor.client import Artifact, Client, Pipeline
from tailor.connection import DEFAULT_STATE_DIR
from tailor.errors import ClientError
from tailor.gateway.v1 import gateway_service_pb2 as pb
from tailor.specs import LocalSpec
from tailor_cli.admin import add_parsers as add_admin_parsers
from tailor_cli.admin import cmd_audit, cmd_tokens
from tailor_cli.render import human_bytes, plan_table, short_id, stages_table, summary_view
from tailor_cli.select import add_parser as add_select_parser
from tailor_cli.select import cmd_select
from tailor_cli.triton import add_parser as add_triton_parser
from tailor_cli.triton import cmd_triton
from tailor_runtime.errors import TailorError

# Piped output (CI logs, `make run | tee`) would otherwise wrap tables at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 140)


# --- the local stack ----------------------------------------------------------------------------
def stack_kit():
    """tailor_cli.stack, which runs the services themselves: it needs the workers' packages, which the
    light client (`pip install tailor`) leaves out."""
    try:
        from tailor_cli import stack
    except ModuleNotFoundError as exc:
        raise ClientError(
            f"the local stack runs every service here, and {exc.name} is not installed: install the "
            "workers' packages (`pip install '.[all]'` in the repository, or `make install`), or point "
            "this client at a running gateway with TAILOR_GATEWAY and TAILOR_TOKEN"
        ) from None
    return stack


def cmd_up(args) -> int:
    stack = stack_kit().Stack(args.state_dir, base_port=args.port, store_url=args.store, die_with_parent=True)
    stopping = []
    # Closing the terminal (SIGHUP) or `tailor down` (SIGTERM) stops the stack as Ctrl-C does; a SIGKILL
    # of this process stops the services too (die_with_parent), so none is left holding the ports.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stopping.append(1))
    with console.status("starting gateway, quantizer, trainer, benchmarker, exporter, selector..."):
        stack.start()
    table = Table(title="tailor local stack")
    table.add_column("service")
    table.add_column("address")
    table.add_column("pid", justify="right")
    for service, proc in stack.processes.items():
        table.add_row(service, stack.address(service), str(proc.pid))
    console.print(table)
    console.print(f"store: {args.store or args.state_dir / 'store'}   logs: {args.state_dir / 'logs'}")
    console.print(f"token in {args.state_dir / 'token'}; Ctrl-C or `tailor down` stops the stack")
    try:
        # A process that dies is restarted (bounded; logs/supervisor.log, stack.json); the rest keep running.
        stack.supervise(
            lambda: bool(stopping), report=lambda event: console.print(f"[yellow]{event}[/yellow]")
        )
    except KeyboardInterrupt:
        pass
    with console.status("stopping..."):
        stack.stop()
    return 0


def cmd_down(args) -> int:
    stopped = stack_kit().stop_running_stack(args.state_dir)
    console.print(
        f"stopped the local stack from {args.state_dir}: {', '.join(stopped) or 'nothing was left'}"
    )
    return 0


def cmd_status(args) -> int:
    kit = stack_kit()
    info = kit.running_stack(args.state_dir)
    if info is None:
        raise ClientError(f"no local stack is running from {args.state_dir}; start one with `tailor up`")
    addresses = {"gateway": info["gateway"], **info.get("services", {}), **info.get("replicas", {})}
    if args.json:
        return print_json({**info, "health": {s: kit.health_status(a) for s, a in addresses.items()}})
    table = Table(title=f"local stack ({args.state_dir})")
    for col in ("service", "address", "pid", "health"):
        table.add_column(col)
    for service, address in addresses.items():
        table.add_row(
            service, address, str(info.get("pids", {}).get(service, "")), kit.health_status(address)
        )
    console.print(table)
    if info.get("down"):
        console.print(f"[red]given up after repeated crashes: {', '.join(info['down'])}[/red]")
    return 0


def cmd_quickstart(args) -> int:
    read_spec_file(args.spec)  # a missing spec is said before six services start
    stack = stack_kit().Stack(args.state_dir, base_port=args.port, store_url=args.store, die_with_parent=True)
    started = time.monotonic()
    with console.status("starting the local stack (6 services)..."):
        stack.start()
    console.print(f"local stack up in {time.monotonic() - started:.1f}s (logs in {args.state_dir / 'logs'})")
    try:
        return run_pipeline(open_client(args), args.spec, watch=True, state_dir=args.state_dir)
    finally:
        with console.status("stopping the local stack..."):
            stack.stop()


# --- pipelines ----------------------------------------------------------------------------------
def open_client(args) -> Client:
    return Client(state_dir=args.state_dir)


def transfer_bar() -> Progress:
    """Bytes sent or received, the rate and the time left: for uploads and downloads."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


class UploadBars:
    """One progress bar per uploaded input, and a line with its id once it is stored."""

    def __init__(self, bar: Progress):
        self.bar = bar
        self.tasks: dict[str, int] = {}

    def __call__(self, label: str, path: Path, done: int, total: int) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.bar.add_task(f"uploading {label} ({path.name})", total=total)
        self.bar.update(self.tasks[label], completed=done)


def read_spec_file(spec_path: Path) -> str:
    if not spec_path.is_file():
        raise ClientError(f"spec file {spec_path} does not exist")
    return spec_path.read_text()


def run_pipeline(client: Client, spec, watch: bool, state_dir: Path, key: str = "") -> int:
    """Submit (validated by the gateway first, then the local inputs uploaded) and, with watch, follow it."""
    with transfer_bar() as bar:
        p = client.submit(spec, idempotency_key=key, on_upload=UploadBars(bar))
    console.print(f"pipeline {p.name} submitted: {p.id}")
    if not watch:
        return 0
    return watch_pipeline(client, p.id, state_dir)


def follow(client: Client, pipeline_id: str) -> Pipeline:
    """The pipeline's stages live until it ends; Ctrl-C stops watching only (raises WatchStopped)."""
    try:
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            return client.wait(
                pipeline_id, on_update=lambda p: live.update(stages_table(p.proto)), check=False
            )
    except KeyboardInterrupt:
        # Watching is only a view: the gateway runs the pipeline whether anyone watches or not.
        console.print(
            f"stopped watching; pipeline {pipeline_id} goes on. Follow it again with "
            f"`tailor pipeline watch {pipeline_id}`, or stop it with `tailor pipeline cancel {pipeline_id}`"
        )
        raise WatchStopped from None


class WatchStopped(Exception):
    """The user pressed Ctrl-C while watching (exit 130; the pipeline goes on)."""


def watch_pipeline(client: Client, pipeline_id: str, state_dir: Path) -> int:
    started = time.monotonic()
    last = follow(client, pipeline_id)
    elapsed = time.monotonic() - started
    if last.state != "succeeded":
        console.print(f"[red]pipeline {last.state}: {escape(last.error)}[/red]")
        return 1
    report_path = None
    if last.report_id:
        files = client.download(last.report_id, state_dir / "reports" / last.id)
        report_path = next((str(f) for f in files if f.name == "report.html"), None)
    console.print(summary_view(last.summary, report_path))
    console.print(f"pipeline finished in {elapsed:.1f}s")
    return 0


def cmd_plan(args) -> int:
    """Every stage's predicted peak GPU and host memory, disk and rough time on each machine of its pool."""
    LocalSpec.load(args.spec)
    stages = open_client(args).plan(args.spec)
    if args.json:
        return print_json(
            [{"stage": s.name, "kind": s.kind, "plans": [vars(p) for p in s.plans]} for s in stages]
        )
    console.print(plan_table(stages))
    console.print(
        "memory in GiB; times are rough (FLOPs or bytes over the machine's figures: docs/planning.md)"
    )
    return 0


def cmd_pipeline(args) -> int:
    if args.action in ("run", "validate"):  # the file's own mistakes first, before any connection
        LocalSpec.load(args.spec)
    client = open_client(args)
    if args.action == "run":
        return run_pipeline(client, args.spec, args.watch, args.state_dir, args.idempotency_key)
    if args.action == "validate":
        p = client.validate(args.spec)
        console.print(f"{args.spec}: valid; pipeline {p.name} would run {len(p.stages)} stages:")
        console.print(", ".join(stage.name for stage in p.stages))
        return 0
    if args.action == "list":
        pipelines = client.pipelines()
        if args.json:
            return print_json([pipeline_to_dict(p.proto) for p in pipelines])
        table = Table(title="pipelines")
        for col in ("id", "name", "state", "created (UTC)"):
            table.add_column(col, no_wrap=col == "id")
        for p in pipelines:
            table.add_row(short_id(p.id), p.name, p.state, p.created.strftime("%Y-%m-%d %H:%M"))
        console.print(table)
        return 0
    if args.action == "status":
        p = client.pipeline(args.id)
        if args.json:
            return print_json(pipeline_to_dict(p.proto))
        console.print(stages_table(p.proto))
        if p.summary:
            console.print(summary_view(p.summary, None))
        return 0
    if args.action == "watch":
        return watch_pipeline(client, args.id, args.state_dir)
    if args.action == "cancel":
        p = client.cancel(args.id)
        console.print(f"pipeline {p.id}: {p.state}")
        return 0
    raise AssertionError(args.action)


# --- artifacts ----------------------------------------------------------------------------------
def download_with_bar(client: Client, artifact_id: str, dest: Path) -> list[Path]:
    with transfer_bar() as bar:
        task = bar.add_task(f"downloading {short_id(artifact_id)}", total=None)
        return client.download(
            artifact_id, dest, on_progress=lambda done, total: bar.update(task, completed=done, total=total)
        )


def upload_with_bar(client: Client, path: Path, kind: str | None = None, fmt: str | None = None) -> Artifact:
    with transfer_bar() as bar:
        task = bar.add_task(f"uploading {path.name}", total=None)
        return client.upload(
            path, kind, fmt, on_progress=lambda done, total: bar.update(task, completed=done, total=total)
        )


def cmd_artifacts(args) -> int:
    client = open_client(args)
    if args.action == "ls":
        artifacts = client.artifacts(args.kind or "")
        if args.json:
            return print_json(
                [{"id": a.id, "kind": a.kind, "name": a.name, "format": a.format, "made_by": a.made_by,
                  "bytes": a.size, "parents": a.parents, "pipeline_id": a.pipeline_id,
                  "pipeline": a.pipeline_name, "stored": a.stored.isoformat() + "Z" if a.stored else ""}
                 for a in artifacts]
            )  # fmt: skip
        table = Table(title="artifacts")
        for col in ("id", "kind", "name", "format", "pipeline", "size", "stored (UTC)"):
            table.add_column(col, no_wrap=col in ("id", "size", "stored (UTC)"), overflow="fold")
        for a in artifacts:
            made_in = a.pipeline_name or ("upload" if a.made_by == "upload" else a.made_by)
            stored = a.stored.strftime("%Y-%m-%d %H:%M") if a.stored else ""
            table.add_row(short_id(a.id), a.kind, a.name, a.format, made_in, human_bytes(a.size), stored)
        console.print(table)
    elif args.action == "get":
        files = download_with_bar(client, args.id, args.dest)
        console.print(f"{len(files)} files written to {args.dest} (sha256 checked by the store)")
    elif args.action == "show":
        console.print_json(json.dumps(client.artifact(args.id).manifest))
    elif args.action == "put":
        artifact = upload_with_bar(client, args.path, args.kind, args.format)
        console.print(f"{artifact.id} ({artifact.kind})")
    return 0


def cmd_models(args) -> int:
    """`tailor models import PATH | --hub ORG/NAME [--revision R]`: prints the model's artifact id."""
    client = open_client(args)
    if (args.path is None) == (args.hub is None):
        raise ClientError("give a local folder (PATH) or --hub ORG/NAME, not both")
    if args.revision and args.hub is None:
        raise ClientError("--revision goes with --hub")
    if args.hub is not None:
        with console.status(f"the gateway is importing {args.hub} from the Hugging Face Hub..."):
            artifact = client.import_model(args.hub, args.revision or "")
        console.print(f"{args.hub}: in the store", style="dim")
    else:
        if not args.path.is_dir():
            raise ClientError(f"{args.path} is not a folder: give a Hugging Face model folder")
        artifact = upload_with_bar(client, args.path, kind="model")
    files = artifact.manifest["files"]
    console.print(f"{artifact.format}, {len(files)} files, {artifact.size} bytes", style="dim")
    print(artifact.id)
    return 0


# --- quantize: a one-candidate pipeline ---------------------------------------------------------
def parse_sets(items: list[str]) -> dict:
    config = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ClientError(f"--set {item!r}: expected key=value")
        try:
            config[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ClientError(f"--set {item!r}: the value is not a number, word or YAML list/map") from None
    return config


# The quantizer's advice names request fields; `tailor quantize` users set them with these flags.
_CLI_FLAGS = {
    "gate.max_perplexity_increase_pct": "--max-ppl-increase",
    "gate.disabled": "--no-gate",
    "calibration_data": "--calibration",
    "eval_data": "--eval",
}


def in_cli_terms(message: str) -> str:
    for field, flag in _CLI_FLAGS.items():
        message = message.replace(field, flag)
    return message


def model_input(client: Client, value: str) -> dict:
    """--model as a spec's model input: a local folder, hub:ORG/NAME[@REV], or an artifact id (any unique
    prefix of 8+ characters, made whole by the gateway)."""
    if value.startswith("hub:"):
        repo, _, revision = value.removeprefix("hub:").partition("@")
        return {"hub": repo, **({"revision": revision} if revision else {})}
    if Path(value).exists():
        return {"path": str(Path(value).resolve())}
    if 8 <= len(value) <= 64 and all(c in "0123456789abcdef" for c in value):
        return {"artifact": client.artifact(value).id}
    raise ClientError(
        f"--model {value}: no such folder, and not an artifact id (8-64 hex characters) or hub:ORG/NAME"
    )


def quantize_spec(client: Client, args, config: dict) -> dict:
    """`tailor quantize`'s flags as a pipeline: the model, one quantize candidate, its benchmark."""
    calibration = {
        key: value
        for key, value in (
            ("data", {"path": str(args.calibration.resolve())} if args.calibration else None),
            ("samples", args.samples or None),
            ("seq_len", args.seq_len or None),
        )
        if value is not None
    }
    candidate = {
        "method": args.method,
        "config": config,
        "seed": args.seed,
        "gate": {"max_perplexity_increase_pct": args.max_ppl_increase, "disabled": args.no_gate},
        **({"calibration": calibration} if calibration else {}),
    }
    name = "quantize-" + "".join(c if c.isalnum() or c in "._-" else "-" for c in args.method.lower())
    return {
        "name": name[:63],
        "model": model_input(client, args.model),
        "data": {"eval": {"path": str(args.eval.resolve())}},
        "quantize": [candidate],
    }


def cmd_quantize(args) -> int:
    """A pipeline through the gateway (so it works against any gateway and the artifact is the project's):
    quantize, the accuracy gate, a benchmark beside the original, the report."""
    config = parse_sets(args.set)  # before any upload: a typo should cost nothing
    if args.eval is None:
        raise ClientError(
            "give --eval TEXT: held-out text that the accuracy gate and the benchmark measure perplexity on "
            "(for example examples/data/tinystories_eval.txt)"
        )
    client = open_client(args)
    spec = quantize_spec(client, args, config)
    with transfer_bar() as bar:
        submitted = client.submit(spec, on_upload=UploadBars(bar))
    console.print(f"pipeline {submitted.name} submitted: {submitted.id}")
    last = follow(client, submitted.id)
    stage = next((s for s in last.stages if s.kind == "quantize"), None)
    if last.summary:
        console.print(summary_view(last.summary, None))
    if stage is None or stage.state != "succeeded":
        reason = stage.error if stage is not None and stage.error else last.error
        raise ClientError(f"quantize {stage.state if stage else last.state}: {in_cli_terms(reason)}")
    result = stage.results[0]
    console.print(f"quantized model {result}{' (cached)' if stage.cached else ''}; pipeline {last.id}")
    if args.out:
        download_with_bar(client, result, args.out)
        console.print(f"written to {args.out}")
    return 0


def _capabilities(client: Client) -> pb.ListCapabilitiesResponse:
    """What the gateway's worker pools offer (works against the local stack, a remote gateway, the chart)."""
    reply = client.capabilities()
    if reply.unanswered_pools:
        console.print(f"[yellow]no worker answered in: {', '.join(reply.unanswered_pools)}[/yellow]")
    return reply


def _listings(client: Client) -> list[tuple[str, object]]:
    """(what, MethodInfo) for every quantizer and trainer method and export format the pools list."""
    reply = _capabilities(client)
    return [
        *(("quantize method", m) for m in reply.quantize_methods),
        *(("finetune method", m) for m in reply.finetune_methods),
        *(("export format", m) for m in reply.export_formats),
    ]


def pipeline_to_dict(p: pb.Pipeline) -> dict:
    return json_format.MessageToDict(p, preserving_proto_field_name=True)


def print_json(value) -> int:
    """Machine-readable output for scripts: plain JSON on stdout, no colours, whole ids."""
    print(json.dumps(value, indent=2, sort_keys=True))
    return 0


def cmd_methods(args) -> int:
    client = open_client(args)
    if getattr(args, "action", None) == "describe":
        return _describe_method(client, args.name, args.json)
    methods = _capabilities(client).quantize_methods
    if args.json:
        return print_json([json_format.MessageToDict(m, preserving_proto_field_name=True) for m in methods])
    table = Table(title="quantization methods of the quantizer pool")
    for col in ("method", "bits", "available", "description"):
        table.add_column(col)
    for m in methods:
        table.add_row(
            m.name,
            ",".join(map(str, m.bits)),
            "yes" if m.available else f"no: {m.unavailable_reason}",
            m.description,
        )
    console.print(table)
    console.print("settings of one: tailor methods describe NAME")
    return 0


def _describe_method(client: Client, name: str, as_json: bool = False) -> int:
    """A method's or format's settings, from the JSON Schema its worker publishes (what the gateway checks)."""
    import json

    from tailor_runtime.config_schema import schema_rows

    listed = _listings(client)
    found = [(what, info) for what, info in listed if info.name == name]
    if not found:
        names = sorted({info.name for _, info in listed})
        raise ClientError(f"no worker lists a method or format named {name!r}; known: {', '.join(names)}")
    if as_json:
        return print_json(
            [{"kind": what, "name": info.name, "available": info.available, "description": info.description,
              "architectures": list(info.architectures),
              "config_schema": json.loads(info.config_schema_json or "{}")} for what, info in found]
        )  # fmt: skip
    for what, info in found:
        state = "available" if info.available else f"unavailable here: {info.unavailable_reason}"
        console.print(f"[bold]{info.name}[/bold] ({what}, {state})\n{info.description}")
        if info.architectures:
            console.print(f"families: {', '.join(info.architectures)}")
        if not info.config_schema_json:
            console.print("this worker publishes no config schema (an older version)")
            continue
        table = Table(title=f"config of {info.name}")
        for col in ("key", "type", "default", "bounds", "meaning"):
            table.add_column(col, overflow="fold")
        for row in schema_rows(json.loads(info.config_schema_json)):
            table.add_row(*row)
        console.print(table)
    return 0


def count(text: str) -> int:
    """An argparse type: a whole number >= 0 (argparse prints the message and exits 2, no traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def port(text: str) -> int:
    value = count(text)
    if not 1 <= value <= 65535 - 6:
        raise argparse.ArgumentTypeError(
            f"{value} is not a port for the gateway (1-65529: services use the next five)"
        )
    return value


def percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a finite percentage >= 0")
    return value


def cmd_completion(args) -> int:
    """The shell's completion script, generated from this CLI's own parser (so it never goes stale)."""
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tailor", description=__doc__)
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"local stack state, one per user (default {DEFAULT_STATE_DIR}; TAILOR_STATE_DIR sets it)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the local stack (every service as its own process)")
    sub.add_parser("down", help="stop the local stack that `tailor up` started")
    status = sub.add_parser("status", help="the local stack's services, addresses and health")
    status.add_argument("--json", action="store_true", help="JSON on stdout")
    quick = sub.add_parser("quickstart", help="start the stack, run a pipeline on it, stop the stack")
    quick.add_argument("--spec", type=Path, default=Path("examples/quickstart.yaml"))
    for p in (up, quick):
        p.add_argument("--port", type=port, default=50051, help="gateway port; services use the next five")
        p.add_argument(
            "--store", default=None, help="artifact store URL (default: a directory in the state dir)"
        )

    pipe = sub.add_parser("pipeline", help="run and follow pipelines").add_subparsers(
        dest="action", required=True
    )
    run = pipe.add_parser("run", help="upload the spec's local inputs and submit it")
    run.add_argument("spec", type=Path)
    run.add_argument("--watch", action="store_true", help="follow progress and print the result")
    run.add_argument(
        "--idempotency-key", default="", help="a retried submission with the same key is not duplicated"
    )
    validate = pipe.add_parser(
        "validate", help="check a spec as the gateway would (names, stage configs), create nothing"
    )
    validate.add_argument("spec", type=Path)
    pipe.add_parser("list", help="this project's pipelines").add_argument(
        "--json", action="store_true", help="JSON on stdout, whole ids"
    )
    for action, text in (
        ("status", "a pipeline's stages and, once done, its candidates"),
        ("watch", "follow a pipeline live until it ends (Ctrl-C stops watching only)"),
        ("cancel", "stop a pipeline and its running stages"),
    ):
        pipe.add_parser(action, help=text).add_argument(
            "id", help="a pipeline id or a unique prefix of 8+ characters"
        )
    pipe.choices["status"].add_argument("--json", action="store_true", help="JSON on stdout")

    art = sub.add_parser("artifacts", help="the artifact store").add_subparsers(dest="action", required=True)
    ls = art.add_parser("ls", help="this project's artifacts: kind, name, format, maker, size")
    ls.add_argument("--kind", default="")
    ls.add_argument("--json", action="store_true", help="JSON on stdout, whole ids")
    get = art.add_parser("get", help="download an artifact, every file checked against its sha256")
    get.add_argument("id", help="an artifact id or a unique prefix of 8+ characters")
    get.add_argument("dest", type=Path)
    art.add_parser("show", help="an artifact's manifest (files, hashes, recipe, parents)").add_argument("id")
    put = art.add_parser("put", help="upload a file or folder")
    put.add_argument("path", type=Path)
    put.add_argument("--kind", default=None)
    put.add_argument("--format", default=None)

    models = sub.add_parser("models", help="bring a model into the store").add_subparsers(
        dest="action", required=True
    )
    imp = models.add_parser(
        "import",
        help="a local Hugging Face folder (pytorch_model.bin converted) or a Hub repo; prints the id",
    )
    imp.add_argument("path", type=Path, nargs="?", help="a folder as save_pretrained writes it")
    imp.add_argument("--hub", default=None, metavar="ORG/NAME", help="a model on the Hugging Face Hub")
    imp.add_argument("--revision", default=None, help="branch, tag or commit of --hub (default main)")

    quant = sub.add_parser("quantize", help="quantize a model directly on the quantizer service")
    quant.add_argument(
        "--model", required=True, help="a model folder, an artifact id, or hub:ORG/NAME[@REVISION]"
    )
    quant.add_argument("--method", required=True)
    quant.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method config")
    quant.add_argument("--seed", type=count, default=0)
    quant.add_argument("--out", type=Path, default=None, help="download the result here")
    quant.add_argument("--calibration", type=Path, help="calibration text or JSONL (methods that need it)")
    quant.add_argument("--samples", type=count, default=0, help="calibration sequences (default 128)")
    quant.add_argument(
        "--seq-len", type=count, default=0, help="tokens per calibration sequence (default 512)"
    )
    quant.add_argument("--eval", type=Path, help="held-out text for the accuracy gate")
    quant.add_argument(
        "--max-ppl-increase", type=percent, default=5.0, help="accuracy gate, percent (default 5)"
    )
    quant.add_argument("--no-gate", action="store_true", help="skip the accuracy gate (not recommended)")
    methods = sub.add_parser("methods", help="list the quantizer's methods and why some cannot run here")
    methods.add_argument("--json", action="store_true", help="JSON on stdout")
    methods_sub = methods.add_subparsers(dest="action")
    describe = methods_sub.add_parser("describe", help="a method's or export format's settings")
    describe.add_argument("name", help="a quantize or finetune method, or an export format")
    describe.add_argument("--json", action="store_true", help="JSON on stdout (the schema itself)")
    plan = sub.add_parser(
        "plan", help="predict each stage's peak GPU/host memory, disk and time on the workers' hardware"
    )
    plan.add_argument("spec", type=Path)
    plan.add_argument("--json", action="store_true", help="JSON on stdout")
    completion = sub.add_parser(
        "completion",
        help="print a shell completion script",
        description='bash: eval "$(tailor completion bash)" in ~/.bashrc; '
        'zsh: tailor completion zsh > "${fpath[1]}/_tailor"',
    )
    completion.add_argument("shell", choices=["bash", "zsh"])
    add_admin_parsers(sub)
    add_select_parser(sub)
    add_triton_parser(sub)
    return parser


COMMANDS = {
    "up": cmd_up,
    "down": cmd_down,
    "status": cmd_status,
    "quickstart": cmd_quickstart,
    "pipeline": cmd_pipeline,
    "plan": cmd_plan,
    "artifacts": cmd_artifacts,
    "models": cmd_models,
    "quantize": cmd_quantize,
    "methods": cmd_methods,
    "completion": cmd_completion,
    "tokens": cmd_tokens,
    "audit": cmd_audit,
    "select": lambda args: cmd_select(args, console),
    "triton": lambda args: cmd_triton(args, console),
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except WatchStopped:
        return 130
    except grpc.RpcError as exc:  # the gateway's refusals (tailor.RequestRefused) and plain gRPC errors
        console.print(f"[red]error ({exc.code().name}):[/red] {escape(exc.details() or '')}")
        return 2
    except (ClientError, TailorError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2
    except RuntimeError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
