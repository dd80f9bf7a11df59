"""`tailor`: the local stack, pipelines, artifacts and direct stage commands."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import uuid
from pathlib import Path

import grpc
import yaml
from google.protobuf import json_format
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tailor.common.v1 import common_pb2 as common
from tailor.common.v1 import common_pb2_grpc as common_grpc
from tailor.gateway.v1 import gateway_service_pb2 as pb
from tailor.quantizer.v1 import quantizer_service_pb2 as quant_pb
from tailor.quantizer.v1 import quantizer_service_pb2_grpc as quant_grpc
from tailor_cli.admin import add_parsers as add_admin_parsers
from tailor_cli.admin import cmd_audit, cmd_tokens
from tailor_cli.client import (
    DEFAULT_STATE_DIR,
    CliError,
    Connection,
    download,
    import_hub,
    resolve_model,
    upload,
)
from tailor_cli.render import human_bytes, pipeline_state, render_gate, short_id, stages_table, summary_view
from tailor_cli.select import add_parser as add_select_parser
from tailor_cli.select import cmd_select
from tailor_cli.stack import Stack, StackError, health_status, running_stack, stop_running_stack
from tailor_cli.triton import add_parser as add_triton_parser
from tailor_cli.triton import cmd_triton
from tailor_gateway.spec import parse_spec
from tailor_runtime.errors import TailorError
from tailor_runtime.operations import to_struct

# Piped output (CI logs, `make run | tee`) would otherwise wrap tables at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 140)
TERMINAL = (pb.PIPELINE_STATE_SUCCEEDED, pb.PIPELINE_STATE_FAILED, pb.PIPELINE_STATE_CANCELLED)


# --- the local stack ----------------------------------------------------------------------------
def cmd_up(args) -> int:
    stack = Stack(args.state_dir, base_port=args.port, store_url=args.store, die_with_parent=True)
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
    stopped = stop_running_stack(args.state_dir)
    console.print(
        f"stopped the local stack from {args.state_dir}: {', '.join(stopped) or 'nothing was left'}"
    )
    return 0


def cmd_status(args) -> int:
    info = running_stack(args.state_dir)
    if info is None:
        raise CliError(f"no local stack is running from {args.state_dir}; start one with `tailor up`")
    addresses = {"gateway": info["gateway"], **info.get("services", {}), **info.get("replicas", {})}
    if args.json:
        return print_json({**info, "health": {s: health_status(a) for s, a in addresses.items()}})
    table = Table(title=f"local stack ({args.state_dir})")
    for col in ("service", "address", "pid", "health"):
        table.add_column(col)
    for service, address in addresses.items():
        table.add_row(service, address, str(info.get("pids", {}).get(service, "")), health_status(address))
    console.print(table)
    if info.get("down"):
        console.print(f"[red]given up after repeated crashes: {', '.join(info['down'])}[/red]")
    return 0


def cmd_quickstart(args) -> int:
    read_spec_file(args.spec)  # a missing spec is said before six services start
    stack = Stack(args.state_dir, base_port=args.port, store_url=args.store, die_with_parent=True)
    started = time.monotonic()
    with console.status("starting the local stack (6 services)..."):
        stack.start()
    console.print(f"local stack up in {time.monotonic() - started:.1f}s (logs in {args.state_dir / 'logs'})")
    try:
        conn = Connection.discover(args.state_dir)
        return run_pipeline(conn, args.spec, watch=True, state_dir=args.state_dir)
    finally:
        with console.status("stopping the local stack..."):
            stack.stop()


# --- pipelines ----------------------------------------------------------------------------------
def upload_spec_inputs(conn: Connection, spec_path: Path) -> str:
    """Upload every `path:` input of the spec and return the spec with artifact ids instead."""
    text = read_spec_file(spec_path)
    parse_spec(text, require_artifacts=False)  # fail fast on a bad spec, before uploading
    raw = yaml.safe_load(text)
    base = spec_path.parent

    def resolve(node: dict, label: str) -> None:
        if isinstance(node, dict) and "path" in node:
            path = (base / node["path"]).resolve()
            with console.status(f"uploading {label} from {path}..."):
                reply = upload(conn, path)
            console.print(f"uploaded {label}: {short_id(reply.artifact.id)} ({reply.artifact.kind})")
            node.pop("path")
            node["artifact"] = reply.artifact.id

    resolve(raw.get("model"), "model")
    for key in ("train", "eval"):
        resolve((raw.get("data") or {}).get(key), f"data.{key}")
    for i, candidate in enumerate(raw.get("quantize") or []):
        resolve(((candidate or {}).get("calibration") or {}).get("data"), f"quantize[{i}].calibration.data")
    return yaml.safe_dump(raw, sort_keys=False)


def _local_inputs(raw: dict) -> list[tuple[str, str]]:
    """(label, path) of every `path:` input of a parsed spec file."""
    found = []
    nodes = [("model", raw.get("model"))]
    nodes += [(f"data.{k}", (raw.get("data") or {}).get(k)) for k in ("train", "eval")]
    for i, candidate in enumerate(raw.get("quantize") or []):
        nodes.append(
            (f"quantize[{i}].calibration.data", ((candidate or {}).get("calibration") or {}).get("data"))
        )
    for label, node in nodes:
        if isinstance(node, dict) and "path" in node:
            found.append((label, node["path"]))
    return found


def validate_spec(conn: Connection, spec_path: Path) -> pb.Pipeline:
    """The gateway's whole check of the spec (names, stage configs against the workers' schemas, artifact
    inputs), with local paths checked here; nothing is uploaded or created."""
    text = read_spec_file(spec_path)
    parse_spec(text, require_artifacts=False)  # malformed YAML and unknown keys, named, before any call
    raw = yaml.safe_load(text)
    for label, path in _local_inputs(raw):
        if not (spec_path.parent / path).exists():
            raise CliError(f"{label}.path: {path} does not exist (relative to {spec_path.parent or '.'})")
    return conn.gateway_stub().CreatePipeline(
        pb.CreatePipelineRequest(spec_yaml=text, validate_only=True), metadata=conn.metadata()
    )


def read_spec_file(spec_path: Path) -> str:
    if not spec_path.is_file():
        raise CliError(f"spec file {spec_path} does not exist")
    return spec_path.read_text()


def run_pipeline(conn: Connection, spec_path: Path, watch: bool, state_dir: Path, key: str = "") -> int:
    validate_spec(conn, spec_path)  # a bad name or config is refused before anything is uploaded
    spec_yaml = upload_spec_inputs(conn, spec_path)
    stub = conn.gateway_stub()
    p = stub.CreatePipeline(
        pb.CreatePipelineRequest(spec_yaml=spec_yaml, idempotency_key=key or uuid.uuid4().hex),
        metadata=conn.metadata(),
    )
    console.print(f"pipeline {p.name} submitted: {p.id}")
    if not watch:
        return 0
    return watch_pipeline(conn, p.id, state_dir)


def watch_pipeline(conn: Connection, pipeline_id: str, state_dir: Path) -> int:
    stub = conn.gateway_stub()
    started = time.monotonic()
    last = None
    try:
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            for event in stub.WatchPipeline(
                pb.WatchPipelineRequest(pipeline_id=pipeline_id), metadata=conn.metadata()
            ):
                last = event.pipeline
                live.update(stages_table(last))
    except KeyboardInterrupt:
        # Watching is only a view: the gateway runs the pipeline whether anyone watches or not.
        console.print(
            f"stopped watching; pipeline {pipeline_id} goes on. Follow it again with "
            f"`tailor pipeline watch {pipeline_id}`, or stop it with `tailor pipeline cancel {pipeline_id}`"
        )
        return 130
    if last is None:
        raise CliError("the gateway closed the stream without news of the pipeline")
    elapsed = time.monotonic() - started
    if last.state != pb.PIPELINE_STATE_SUCCEEDED:
        console.print(f"[red]pipeline {pipeline_state(last.state).lower()}: {last.error.message}[/red]")
        return 1
    summary = json_format.MessageToDict(last.summary)
    report_path = None
    if last.report.id:
        files = download(conn, last.report.id, state_dir / "reports" / pipeline_id)
        report_path = next((str(f) for f in files if f.name == "report.html"), None)
    console.print(summary_view(summary, report_path))
    console.print(f"pipeline finished in {elapsed:.1f}s")
    return 0


def cmd_pipeline(args) -> int:
    if args.action in ("run", "validate"):  # the file's own mistakes first, before any connection
        parse_spec(read_spec_file(args.spec), require_artifacts=False)
    conn = Connection.discover(args.state_dir)
    stub = conn.gateway_stub()
    if args.action == "run":
        return run_pipeline(conn, args.spec, args.watch, args.state_dir, args.idempotency_key)
    if args.action == "validate":
        p = validate_spec(conn, args.spec)
        console.print(f"{args.spec}: valid; pipeline {p.name} would run {len(p.stages)} stages:")
        console.print(", ".join(stage.name for stage in p.stages))
        return 0
    if args.action == "list":
        pipelines = stub.ListPipelines(pb.ListPipelinesRequest(), metadata=conn.metadata()).pipelines
        if args.json:
            return print_json([pipeline_to_dict(p) for p in pipelines])
        table = Table(title="pipelines")
        for col in ("id", "name", "state", "created (UTC)"):
            table.add_column(col, no_wrap=col == "id")
        for p in pipelines:
            created = p.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M")
            table.add_row(short_id(p.id), p.name, pipeline_state(p.state).lower(), created)
        console.print(table)
        return 0
    if args.action == "status":
        p = stub.GetPipeline(pb.GetPipelineRequest(pipeline_id=args.id), metadata=conn.metadata())
        if args.json:
            return print_json(pipeline_to_dict(p))
        console.print(stages_table(p))
        if p.summary.fields:
            console.print(summary_view(json_format.MessageToDict(p.summary), None))
        return 0
    if args.action == "watch":
        return watch_pipeline(conn, args.id, args.state_dir)
    if args.action == "cancel":
        p = stub.CancelPipeline(pb.CancelPipelineRequest(pipeline_id=args.id), metadata=conn.metadata())
        console.print(f"pipeline {p.id}: {pipeline_state(p.state).lower()}")
        return 0
    raise AssertionError(args.action)


# --- artifacts ----------------------------------------------------------------------------------
def cmd_artifacts(args) -> int:
    conn = Connection.discover(args.state_dir)
    stub = conn.gateway_stub()
    if args.action == "ls":
        rows = []
        for ref in stub.ListArtifacts(
            pb.ListArtifactsRequest(kind=args.kind or ""), metadata=conn.metadata()
        ).artifacts:
            m = json.loads(
                stub.GetArtifact(
                    pb.GetArtifactRequest(artifact_id=ref.id), metadata=conn.metadata()
                ).manifest_json
            )
            made_by = m.get("recipe", {}).get("stage", "upload")
            size = sum(f["size"] for f in m["files"])
            rows.append({"id": ref.id, "kind": ref.kind, "name": m.get("name", ""), "format": m.get("format", ""),
                         "made_by": made_by, "bytes": size, "parents": m.get("parents", [])})  # fmt: skip
        if args.json:
            return print_json(rows)
        table = Table(title="artifacts")
        for col in ("id", "kind", "name", "format", "made by", "size"):
            table.add_column(col, no_wrap=col in ("id", "size"), overflow="fold")
        for r in rows:
            table.add_row(
                short_id(r["id"]), r["kind"], r["name"], r["format"], r["made_by"], human_bytes(r["bytes"])
            )
        console.print(table)
    elif args.action == "get":
        files = download(conn, args.id, args.dest)
        console.print(f"{len(files)} files written to {args.dest} (sha256 checked by the store)")
    elif args.action == "show":
        reply = stub.GetArtifact(pb.GetArtifactRequest(artifact_id=args.id), metadata=conn.metadata())
        console.print_json(reply.manifest_json)
    elif args.action == "put":
        reply = upload(conn, args.path, args.kind, args.format)
        console.print(f"{reply.artifact.id} ({reply.artifact.kind})")
    return 0


def cmd_models(args) -> int:
    """`tailor models import PATH | --hub ORG/NAME [--revision R]`: prints the model's artifact id."""
    conn = Connection.discover(args.state_dir)
    if (args.path is None) == (args.hub is None):
        raise CliError("give a local folder (PATH) or --hub ORG/NAME, not both")
    if args.revision and args.hub is None:
        raise CliError("--revision goes with --hub")
    if args.hub is not None:
        with console.status(f"the gateway is importing {args.hub} from the Hugging Face Hub..."):
            reply = import_hub(conn, args.hub, args.revision or "")
        note = "already in the store, nothing downloaded" if reply.cached else "downloaded and stored"
        console.print(f"{args.hub}@{reply.commit[:12]}: {note}", style="dim")
    else:
        if not args.path.is_dir():
            raise CliError(f"{args.path} is not a folder: give a Hugging Face model folder")
        with console.status(f"uploading {args.path}..."):
            reply = upload(conn, args.path, kind="model")
    manifest = json.loads(reply.manifest_json)
    size = sum(f["size"] for f in manifest["files"])
    console.print(f"{manifest['format']}, {len(manifest['files'])} files, {size} bytes", style="dim")
    print(reply.artifact.id)
    return 0


# --- direct stage commands ----------------------------------------------------------------------
def parse_sets(items: list[str]) -> dict:
    config = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--set {item!r}: expected key=value")
        try:
            config[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise CliError(f"--set {item!r}: the value is not a number, word or YAML list/map") from None
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


def follow_operation(channel: grpc.Channel, op: common.Operation) -> common.Operation:
    stub = common_grpc.OperationsServiceStub(channel)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(op.kind, total=100)
        for event in stub.WatchOperation(common.WatchOperationRequest(operation_id=op.id)):
            op = event.operation
            bar.update(
                task,
                completed=op.progress.percent,
                description=f"{op.kind} {op.progress.phase} {op.progress.message}".strip(),
            )
    return op


def cmd_quantize(args) -> int:
    config = parse_sets(args.set)  # before any upload: a typo should cost nothing
    conn = Connection.discover(args.state_dir)
    model_id = resolve_model(conn, args.model)
    request = quant_pb.QuantizeRequest(
        model=common.ArtifactRef(id=model_id),
        method=args.method,
        config=to_struct(config),
        seed=args.seed,
        calibration=quant_pb.CalibrationOptions(samples=args.samples, seq_len=args.seq_len),
        gate=quant_pb.AccuracyGate(max_perplexity_increase_pct=args.max_ppl_increase, disabled=args.no_gate),
    )
    for path, field in ((args.calibration, request.calibration_data), (args.eval, request.eval_data)):
        if path is not None:
            field.id = upload(conn, path).artifact.id
    channel = conn.service_channel("quantizer")
    op = follow_operation(channel, quant_grpc.QuantizerServiceStub(channel).Quantize(request))
    if op.state != common.OPERATION_STATE_SUCCEEDED:
        numbers = json_format.MessageToDict(op.metrics)
        if numbers.get("gate") == "rejected":
            console.print(render_gate(numbers))
        raise CliError(f"quantize failed: {in_cli_terms(op.error.message)}")
    if "perplexity_increase_pct" in op.metrics:
        console.print(render_gate(json_format.MessageToDict(op.metrics)))
    result = op.results[0]
    console.print(f"quantized model {result.id}{' (cached)' if op.cached else ''}")
    if args.out:
        download(conn, result.id, args.out)
        console.print(f"written to {args.out}")
    return 0


def _capabilities(conn: Connection) -> pb.ListCapabilitiesResponse:
    """What the gateway's worker pools offer (works against the local stack, a remote gateway, the chart)."""
    reply = conn.gateway_stub().ListCapabilities(pb.ListCapabilitiesRequest(), metadata=conn.metadata())
    if reply.unanswered_pools:
        console.print(f"[yellow]no worker answered in: {', '.join(reply.unanswered_pools)}[/yellow]")
    return reply


def _listings(conn: Connection) -> list[tuple[str, object]]:
    """(what, MethodInfo) for every quantizer and trainer method and export format the pools list."""
    reply = _capabilities(conn)
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
    conn = Connection.discover(args.state_dir)
    if getattr(args, "action", None) == "describe":
        return _describe_method(conn, args.name, args.json)
    methods = _capabilities(conn).quantize_methods
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


def _describe_method(conn: Connection, name: str, as_json: bool = False) -> int:
    """A method's or format's settings, from the JSON Schema its worker publishes (what the gateway checks)."""
    import json

    from tailor_runtime.config_schema import schema_rows

    listed = _listings(conn)
    found = [(what, info) for what, info in listed if info.name == name]
    if not found:
        names = sorted({info.name for _, info in listed})
        raise CliError(f"no worker lists a method or format named {name!r}; known: {', '.join(names)}")
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
    pipe.add_parser("list").add_argument("--json", action="store_true", help="JSON on stdout, whole ids")
    for action in ("status", "watch", "cancel"):
        pipe.add_parser(action).add_argument("id", help="a pipeline id or a unique prefix of 8+ characters")
    pipe.choices["status"].add_argument("--json", action="store_true", help="JSON on stdout")

    art = sub.add_parser("artifacts", help="the artifact store").add_subparsers(dest="action", required=True)
    ls = art.add_parser("ls")
    ls.add_argument("--kind", default="")
    ls.add_argument("--json", action="store_true", help="JSON on stdout, whole ids")
    get = art.add_parser("get")
    get.add_argument("id")
    get.add_argument("dest", type=Path)
    art.add_parser("show").add_argument("id")
    put = art.add_parser("put")
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
    "artifacts": cmd_artifacts,
    "models": cmd_models,
    "quantize": cmd_quantize,
    "methods": cmd_methods,
    "tokens": cmd_tokens,
    "audit": cmd_audit,
    "select": lambda args: cmd_select(args, console),
    "triton": lambda args: cmd_triton(args, console),
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (CliError, TailorError, StackError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except grpc.RpcError as exc:
        console.print(f"[red]error ({exc.code().name}):[/red] {exc.details()}")
        return 2
    except RuntimeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
