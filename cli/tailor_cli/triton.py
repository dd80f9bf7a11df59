"""`tailor triton ...`: a `triton` export on a Triton Inference Server, over its KServe v2 gRPC port.

tailor triton status   --url localhost:8001 [--model NAME]
tailor triton deploy   --url localhost:8001 --model NAME      (the repository API's load)
tailor triton infer    --url localhost:8001 --model NAME --ids 1,403,407 [--max-new-tokens 8]
tailor triton infer    ... --text "Once upon a time" --tokenizer EXPORT_FOLDER
tailor triton undeploy --url localhost:8001 --model NAME
tailor triton repository-url ARTIFACT_ID --store s3://bucket/prefix   (Triton's --model-repository)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tailor_runtime.errors import InvalidArgument


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "triton",
        help="deploy, check and run a `triton` export on a Triton Inference Server (gRPC)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", required=True)
    for name, text in (
        ("status", "server liveness and readiness, the repository index, a model's metadata"),
        ("deploy", "load a model from the server's repository (Triton's --model-control-mode=explicit)"),
        ("undeploy", "unload a model"),
        ("infer", "greedy next tokens from a deployed decoder"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("--url", default="localhost:8001", help="the server's gRPC host:port")
        action.add_argument("--model", required=name != "status", default="", help="the model's name")
        action.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    infer = actions.choices["infer"]
    infer.add_argument("--ids", default="", help="prompt token ids, comma-separated")
    infer.add_argument("--text", default="", help="prompt text (needs --tokenizer)")
    infer.add_argument("--tokenizer", type=Path, help="a folder with the tokenizer (the export's own)")
    infer.add_argument("--max-new-tokens", type=int, default=8)
    infer.add_argument("--json", action="store_true", help="print the result as JSON")
    url = actions.add_parser("repository-url", help="the --model-repository of a published triton export")
    url.add_argument("artifact")
    url.add_argument("--store", required=True, help="the artifact store URL (s3://bucket/prefix or a folder)")


def cmd_triton(args: argparse.Namespace, console: Console) -> int:
    from tailor_runtime.serving.triton import TritonClient, model_repository_url

    if args.action == "repository-url":
        console.print(model_repository_url(_store(args.store), args.artifact), soft_wrap=True)
        return 0
    with TritonClient(args.url, timeout_s=args.timeout) as client:
        if args.action == "status":
            return _status(client, args.model, console)
        if args.action == "deploy":
            client.deploy(args.model)
            console.print(f"{args.model} is loaded and ready on {args.url}")
        elif args.action == "undeploy":
            client.undeploy(args.model)
            console.print(f"{args.model} is unloaded from {args.url}")
        else:
            return _infer(client, args, console)
    return 0


def _status(client, model: str, console: Console) -> int:
    live = client.live()
    ready = client.ready()
    console.print(f"server {client.url}: live={live} ready={ready}")
    table = Table("model", "version", "state", "reason")
    for entry in client.index():
        table.add_row(
            entry.get("name", ""), entry.get("version", ""), entry.get("state", ""), entry.get("reason", "")
        )
    console.print(table)
    if model:
        console.print_json(json.dumps(client.metadata(model)))
    return 0 if live and ready else 1


def _infer(client, args: argparse.Namespace, console: Console) -> int:
    tokenizer = None
    if args.text:
        if args.tokenizer is None:
            raise InvalidArgument("--text needs --tokenizer (a folder with the model's tokenizer files)")
        from tailor_runtime.ml.model_io import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        ids = tokenizer(args.text)["input_ids"]
    elif args.ids:
        try:
            ids = [int(token) for token in args.ids.split(",")]
        except ValueError:
            raise InvalidArgument(f"--ids must be comma-separated integers, not {args.ids!r}") from None
    else:
        raise InvalidArgument("give the prompt as --ids 1,2,3 or as --text with --tokenizer")
    tokens = client.generate(args.model, [ids], args.max_new_tokens)[0].tolist()
    result = {"model": args.model, "prompt_ids": ids, "new_ids": tokens}
    if tokenizer is not None:
        result["text"] = tokenizer.decode(ids + tokens)
    if args.json:
        console.print_json(json.dumps(result))
    else:
        console.print(result.get("text") or " ".join(map(str, tokens)), soft_wrap=True)
    return 0


def _store(url: str):
    if url.startswith("s3://"):
        from tailor_runtime.store.base import open_store

        return open_store(url)

    class _Folder:  # a local store's layout, without creating its folder
        root = Path(url.removeprefix("file://")).resolve()

    return _Folder()
