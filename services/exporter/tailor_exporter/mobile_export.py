"""On-device exports beyond the ORT format: ExecuTorch (.pte, XNNPACK) and Core ML (.mlpackage).

Both compile the same decoder (mobile_decoder.StaticCacheDecoder): a Llama whose KV cache is a set of
fixed-shape buffers of `max_seq_len` slots, called as forward(input_ids [1, T], input_pos [T]) -> logits
[1, T, vocab] with 1 <= T <= max_seq_len (a whole prompt, then one token per call). It is torch.export'ed
once with T dynamic, then

  executorch  lowered to the XNNPACK backend (operators XNNPACK does not take run on ExecuTorch's
              portable kernels) and written as model.pte, with the metadata methods ExecuTorch's LLM runner
              reads (get_max_seq_len, get_vocab_size, get_bos_id, get_eos_ids, use_kv_cache,
              enable_dynamic_shape). Verified by RUNNING it: the .pte in ExecuTorch's runtime (the same C++
              runtime and XNNPACK kernels the Android and iOS libraries ship, here on x86-64 Linux) against
              the source's logits, prefill and decode; and ExecuTorch's TextLLMRunner generating greedily
              from the folder's tokenizer against the source's greedy tokens.
  coreml      converted by coremltools to an ML program (iOS 18 / macOS 15: the cache becomes model states,
              which Core ML keeps in float16; float32 compute). Core ML only runs on Apple's systems, so on
              Linux the converted file is NOT run: what is verified is the exact program handed to the
              converter, run in PyTorch with its cache in float16 as Core ML keeps it, against the source;
              plus the .mlpackage's spec (inputs, output, states, shapes, weights). Every result says
              `ran_converted_artifact: false`.

Over a tolerance, VerificationFailed carries the numbers and `out_dir` is never created (the export is
built in a folder beside it and renamed into place only after it passed). A tool that fails on a model
fails the export with the tool's message (FailedPrecondition). Sources: hf-safetensors Llama folders in any
dtype (exported in float32); int8-dynamic and bnb-nf4 only with dequantize=true, as their decoded weights
in float32 (neither file keeps a quantized layout).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tailor_exporter.dequantize import float32_model
from tailor_exporter.mobile_decoder import (
    check_architecture,
    compare_stepwise,
    export_program,
    first_line,
    program_step,
    sample_sequences,
)
from tailor_exporter.registry import (
    ExportFormat,
    ExportJob,
    Tolerance,
    check_destination,
    move_into_place,
    register,
    staged,
)
from tailor_runtime.errors import FailedPrecondition, InvalidArgument, VerificationFailed
from tailor_runtime.stage import library_versions

SOURCE_FORMATS = ("hf-safetensors", "int8-dynamic", "bnb-nf4")
PTE_FILE = "model.pte"
MLPACKAGE = "model.mlpackage"
# Core ML takes int32 where ExecuTorch takes int64 (coremltools converts the program's int64 inputs).
INPUTS = {
    "executorch": ["input_ids [1, T] int64", "input_pos [T] int64 (1 <= T <= max_seq_len)"],
    "coreml": ["input_ids [1, T] int32", "input_pos [T] int32 (1 <= T <= max_seq_len)"],
}
RUNNER_TOKENIZER = "runner_tokenizer.json"
OUTPUTS = ["logits [1, T, vocab] float32"]
EXECUTORCH_LIBRARIES = ("torch", "transformers", "executorch")
COREML_LIBRARIES = ("torch", "transformers", "coremltools")
# Prompts of the ExecuTorch runner check: the beginnings of the sentences the logits are compared on.
PROMPTS = ("Once upon a time", "One day, a small dog", "The sun was warm")

# The .pte computes in float32 in another engine: measured max |diff| 1.3e-5 and top-1 1.0 on stories260K
# (logits up to ~20), prefill and decode, and the runner's greedy tokens equal the source's.
EXECUTORCH_TOLERANCE = Tolerance(atol=1e-3, min_top1_agreement=0.99)
MIN_GREEDY_AGREEMENT = 0.9
# The program converted to Core ML, run in PyTorch with its cache rounded to float16 (Core ML's states are
# float16): measured max |diff| 0.011 and top-1 1.0 on stories260K (logits up to ~20).
COREML_TOLERANCE = Tolerance(atol=0.05, min_top1_agreement=0.99)


class MobileExportConfig(BaseModel):
    """Options of both mobile formats (the `config` Struct of an ExportRequest)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    max_seq_len: int | None = Field(
        None,
        ge=8,
        le=32768,
        description="KV cache slots: the most tokens (prompt and generated) one sequence holds, and the "
        "most one call takes. Default: the model's max_position_embeddings, at most 512.",
    )
    dequantize: bool = Field(
        False,
        description="Export an int8-dynamic or bnb-nf4 model as its decoded weights in float32 (required "
        "for them: neither on-device file keeps their quantized layout).",
    )
    atol: float | None = Field(
        None, ge=0, description="Max |logit difference| against the source; default: the format's."
    )
    min_top1_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Min share of positions with the same next token; default: the format's.",
    )
    verify_texts: int = Field(
        3, ge=1, le=7, description="Sentences of real text to verify on (prefill + decode)."
    )

    @field_validator("max_seq_len", "verify_texts", mode="before")
    @classmethod
    def _whole_floats_are_ints(cls, value: Any) -> Any:
        # A protobuf Struct carries every number as a double: accept 256.0 for 256, still refuse 256.5.
        return int(value) if isinstance(value, float) and value.is_integer() else value

    def tolerance(self, default: Tolerance) -> Tolerance:
        return Tolerance(
            atol=default.atol if self.atol is None else self.atol,
            min_top1_agreement=default.min_top1_agreement
            if self.min_top1_agreement is None
            else self.min_top1_agreement,
        )


class ExecuTorchConfig(MobileExportConfig):
    greedy_tokens: int = Field(
        16,
        ge=1,
        le=256,
        description="Tokens ExecuTorch's LLM runner generates per prompt to compare with the source.",
    )
    min_greedy_agreement: float = Field(
        MIN_GREEDY_AGREEMENT,
        ge=0,
        le=1,
        description="Min share of the runner's greedy tokens equal to the source's.",
    )

    @field_validator("greedy_tokens", mode="before")
    @classmethod
    def _whole_float_tokens(cls, value: Any) -> Any:
        return int(value) if isinstance(value, float) and value.is_integer() else value


class CoreMLConfig(MobileExportConfig):
    pass


def export_mobile(
    model_dir: Path, out_dir: Path, cfg: MobileExportConfig, job: ExportJob, target: str
) -> dict[str, Any]:
    """Export `model_dir` to `out_dir` (which must not exist yet, or be empty) as a verified `target`."""
    from tailor_runtime.ml.model_io import folder_size_bytes, load_causal_lm, read_format, write_format
    from tailor_runtime.ml.onnx.folder import write_config

    model_dir, out_dir, progress = Path(model_dir), Path(out_dir), job.progress
    name = "ExecuTorch" if target == "executorch" else "Core ML"
    source_format = read_format(model_dir)["format"]
    _check_source(source_format, cfg, name)
    config = json.loads((model_dir / "config.json").read_text())
    check_architecture(config, name)
    max_seq_len = _max_seq_len(cfg, config)
    _require_tool(target)
    check_destination(out_dir)

    started = time.monotonic()
    progress(2.0, "loading", f"loading {model_dir.name} ({source_format})")
    source, tokenizer = load_causal_lm(model_dir)
    float_model = float32_model(source, source_format).requires_grad_(False)
    sequences = sample_sequences(tokenizer, cfg.verify_texts, max_seq_len)
    with staged(out_dir) as work:
        write_config(work, model_dir, tokenizer)  # config.json (float32), tokenizer files, licence
        progress(10.0, "exporting", f"torch.export of the static-cache decoder, max_seq_len {max_seq_len}")
        build = _build_executorch if target == "executorch" else _build_coreml
        checks, fields, stats, step = build(
            work, float_model, tokenizer, cfg, max_seq_len, sequences, progress
        )
        if source is not float_model:
            # For information: against the quantized source itself (whose int8 layers quantize activations).
            checks["source"] = {**compare_stepwise(step, source, sequences), "enforced": False}
        progress(95.0, "writing", "format and verification")
        fmt = write_format(
            work,
            target,
            max_seq_len=max_seq_len,
            source_format=source_format,
            inputs=INPUTS[target],
            outputs=OUTPUTS,
            **fields,
        )
        headline = _headline(checks, target)
        versions = library_versions(*(EXECUTORCH_LIBRARIES if target == "executorch" else COREML_LIBRARIES))
        _write_json(
            work / "verification.json",
            {
                **headline,
                "checks": checks,
                "texts": [len(s) for s in sequences],
                "versions": versions,
                **stats,
            },
        )
        files = {str(p.relative_to(work)): p.stat().st_size for p in sorted(work.rglob("*")) if p.is_file()}
        move_into_place(work, out_dir)

    progress(100.0, "done", f"exported {out_dir.name}")
    return {
        "out_dir": str(out_dir),
        "format": fmt,
        "files": files,
        "size_on_disk_mb": folder_size_bytes(out_dir) / 2**20,
        "verification": {**headline, "checks": checks},
        "versions": versions,
        "export_s": time.monotonic() - started,
        **stats,
    }


def _enforce(what: str, name: str, check: dict[str, Any], tolerance: Tolerance) -> None:
    from tailor_runtime.ml.onnx.verify import enforce

    enforce(
        name,
        check,
        tolerance.atol,
        tolerance.min_top1_agreement,
        what=f"the {what}",
        scope=", prefill and decode",
    )


def _build_executorch(work, float_model, tokenizer, cfg, max_seq_len, sequences, progress):
    program = export_program(float_model, max_seq_len, "float32", "ExecuTorch")
    tolerance = cfg.tolerance(EXECUTORCH_TOLERANCE)
    checks = {"exported": compare_stepwise(program_step(program), float_model, sequences)}
    _enforce("exported program", "exported", checks["exported"], tolerance)

    progress(30.0, "lowering", "to ExecuTorch's XNNPACK backend")
    metadata = _runner_metadata(float_model, tokenizer, max_seq_len)
    pte, stats = lower_to_executorch(program, metadata)
    (work / PTE_FILE).write_bytes(pte)
    runner_tokenizer = write_runner_tokenizer(work)

    progress(80.0, "verifying", "the .pte in ExecuTorch's runtime against PyTorch")
    checks["published"] = compare_stepwise(executorch_step(work / PTE_FILE), float_model, sequences)
    _enforce("ExecuTorch program", "published", checks["published"], tolerance)
    progress(88.0, "verifying", "greedy generation with ExecuTorch's LLM runner")
    checks["runner"] = compare_runner(
        work / PTE_FILE,
        work / runner_tokenizer,
        float_model,
        tokenizer,
        cfg.greedy_tokens,
        cfg.min_greedy_agreement,
    )
    fields = {
        "model_file": PTE_FILE,
        "backend": "xnnpack",
        "weights": "float32",
        "kv_cache": "static",
        "methods": sorted(["forward", *metadata]),
        "tokenizer": runner_tokenizer,
        "verified_by": "running (ExecuTorch runtime, x86-64 Linux)",
    }
    return checks, fields, stats, executorch_step(work / PTE_FILE)


def _build_coreml(work, float_model, tokenizer, cfg, max_seq_len, sequences, progress):
    # Core ML keeps states in float16 only: the program verified here keeps its cache in float16 too.
    program = export_program(float_model, max_seq_len, "float16", "Core ML")
    tolerance = cfg.tolerance(COREML_TOLERANCE)
    checks = {"exported": compare_stepwise(program_step(program), float_model, sequences)}
    _enforce("program converted to Core ML", "exported", checks["exported"], tolerance)
    progress(40.0, "converting", "coremltools: ML program, iOS 18 states")
    package = work / MLPACKAGE
    convert_to_coreml(program, package)
    progress(85.0, "checking", "the .mlpackage spec")
    checks["converted"] = inspect_mlpackage(package, float_model.config, max_seq_len)
    if not checks["converted"]["passed"]:
        raise VerificationFailed(
            f"the Core ML package does not have the converted program's interface: "
            f"{'; '.join(checks['converted']['problems'])}; nothing was published"
        )
    fields = {
        "model_file": MLPACKAGE,
        "weights": "float32",
        "compute_precision": "float32",
        "kv_cache": "static (Core ML states, float16)",
        "states": [f"k_cache_{{i}}, v_cache_{{i}} [1, kv_heads, {max_seq_len}, head_dim] float16"],
        "minimum_deployment_target": "iOS18",
        "tokenizer": "tokenizer.json",
        "verified_by": "conversion (the converted program run in PyTorch; the .mlpackage not run)",
    }
    return checks, fields, {"mil_ops": checks["converted"]["mil_ops"]}, program_step(program)


def _headline(checks: dict[str, Any], target: str) -> dict[str, Any]:
    """Flat numbers: the artifact that was run (ExecuTorch), else the program that was converted."""
    check = checks["published"] if target == "executorch" else checks["exported"]
    keys = ("max_abs_diff", "top1_agreement", "positions", "atol", "min_top1_agreement")
    flat = {k: check[k] for k in keys if k in check}
    flat["passed"] = all(c.get("passed", True) for c in checks.values() if c.get("enforced", True))
    flat["ran_converted_artifact"] = target == "executorch"
    if target == "executorch":
        flat["greedy_agreement"] = checks["runner"]["greedy_agreement"]
        flat["min_greedy_agreement"] = checks["runner"].get("min_greedy_agreement")
    return flat


# --- ExecuTorch -------------------------------------------------------------------------------------------


def _runner_metadata(model: Any, tokenizer: Any, max_seq_len: int) -> dict[str, Any]:
    """The constant methods ExecuTorch's LLM runner reads from a .pte."""
    eos = _ids(getattr(model.generation_config, "eos_token_id", None)) or _ids(model.config.eos_token_id)
    metadata = {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_seq_len,
        "get_vocab_size": model.config.vocab_size,
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
    }
    if tokenizer.bos_token_id is not None:
        metadata["get_bos_id"] = tokenizer.bos_token_id
    if eos:
        metadata["get_eos_ids"] = eos
    return metadata


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def lower_to_executorch(program: Any, metadata: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """(.pte bytes, statistics) of `program` lowered to XNNPACK; FailedPrecondition with the tool's message."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        edge = to_edge_transform_and_lower(
            program, partitioner=[XnnpackPartitioner()], constant_methods=metadata
        )
        nodes = [n for n in edge.exported_program().graph.nodes if n.op == "call_function"]
        pte = edge.to_executorch().buffer
    except Exception as exc:
        raise FailedPrecondition(
            f"ExecuTorch could not lower this model to XNNPACK: {first_line(exc)}"
        ) from exc
    delegates = sum(1 for n in nodes if "executorch_call_delegate" in str(n.target))
    portable = sum(
        1 for n in nodes if "executorch_call_delegate" not in str(n.target) and "getitem" not in str(n.target)
    )
    return pte, {"xnnpack_partitions": delegates, "portable_ops": portable}


def executorch_step(pte: Path) -> Any:
    """A step function running the .pte's forward in ExecuTorch's runtime (its cache kept between calls)."""
    from executorch.runtime import Runtime

    try:
        method = Runtime.get().load_program(str(pte)).load_method("forward")
    except Exception as exc:
        raise FailedPrecondition(
            f"ExecuTorch's runtime could not load the exported program: {first_line(exc)}"
        ) from exc

    def step(ids: Any, pos: Any) -> Any:
        return method.execute([ids, pos])[0][0].float().numpy()

    return step


def write_runner_tokenizer(work: Path) -> str:
    """The tokenizer file for ExecuTorch's LLM runner: tokenizer.json, or a copy without its decoder's
    leading Strip, where it has one (SentencePiece-style tokenizers): the runner decodes one token at a
    time, and that Strip, meant for the start of a whole text, would drop every token's leading space."""
    config = json.loads((work / "tokenizer.json").read_text())
    decoder = config.get("decoder") or {}
    decoders = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else []
    kept = [d for d in decoders if not (d.get("type") == "Strip" and d.get("start", 0) > 0)]
    if len(kept) == len(decoders):
        return "tokenizer.json"
    config["decoder"]["decoders"] = kept
    text = json.dumps(config, ensure_ascii=False, indent=2, sort_keys=True)
    (work / RUNNER_TOKENIZER).write_text(text + "\n", encoding="utf-8")
    return RUNNER_TOKENIZER


def compare_runner(
    pte: Path, tokenizer_file: Path, reference: Any, tokenizer: Any, new_tokens: int, min_agreement: float
) -> dict:
    """ExecuTorch's TextLLMRunner (the C++ runner its Android and iOS LLM libraries wrap), from the .pte
    and the runner's tokenizer file, generating greedily against the source's greedy tokens, by prompt."""
    import torch
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    try:
        runner = TextLLMRunner(str(pte), str(tokenizer_file))
    except Exception as exc:
        raise FailedPrecondition(
            f"ExecuTorch's LLM runner could not load the export: {first_line(exc)}"
        ) from exc
    eos = set(
        _ids(getattr(reference.generation_config, "eos_token_id", None))
        or _ids(reference.config.eos_token_id)
    )
    pad = next(iter(eos), 0)
    same = total = 0
    prompts, problems = [], []
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        with torch.inference_mode():
            out = reference.generate(
                torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
            )[0, len(ids) :].tolist()
        want = [tokenizer.decode([t]).strip() for t in out if t not in eos]
        pieces: list[str] = []
        stats: list[Any] = []
        bos = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
        settings = GenerationConfig(echo=False, max_new_tokens=new_tokens, temperature=0.0, num_bos=bos)
        try:
            runner.generate(prompt, settings, token_callback=pieces.append, stats_callback=stats.append)
            runner.reset()
        except Exception as exc:
            raise FailedPrecondition(
                f"ExecuTorch's LLM runner failed to generate from the export: {first_line(exc)}"
            ) from exc
        got = [p.strip() for p in pieces]
        prompt_tokens = stats[-1].num_prompt_tokens if stats else -1
        if prompt_tokens != len(ids):
            problems.append(
                f"the runner's tokenizer made {prompt_tokens} prompt tokens of {prompt!r}, the source's {len(ids)}"
            )
        width = max(len(got), len(want))
        agree = sum(1 for a, b in zip(got, want, strict=False) if a == b)
        same, total = same + agree, total + width
        prompts.append(
            {
                "prompt": prompt,
                "runner": "".join(pieces),
                "source": tokenizer.decode(out, skip_special_tokens=True),
                "agreement": agree / max(width, 1),
            }
        )
    agreement = same / max(total, 1)
    if agreement < min_agreement:
        problems.append(f"greedy agreement {agreement:.3f} < {min_agreement:g}")
    check = {
        "greedy_agreement": agreement,
        "tokens": total,
        "min_greedy_agreement": min_agreement,
        "prompts": prompts,
        "passed": not problems,
    }
    if problems:
        raise VerificationFailed(
            f"ExecuTorch's LLM runner does not generate what the source generates: {'; '.join(problems)}; "
            "nothing was published"
        )
    return check


# --- Core ML ----------------------------------------------------------------------------------------------


def convert_to_coreml(program: Any, package: Path) -> None:
    """The ExportedProgram as a Core ML ML program (float32 compute, states for the cache), written
    reproducibly: no conversion date, Manifest identifiers derived from the item paths."""
    import coremltools as ct

    try:
        model = ct.convert(
            program.run_decompositions({}),
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT32,
            outputs=[ct.TensorType(name="logits")],
            skip_model_load=True,  # Core ML's runtime exists only on Apple's systems
        )
        model.save(str(package))
    except Exception as exc:
        raise FailedPrecondition(f"coremltools could not convert this model: {first_line(exc)}") from exc
    _normalize_mlpackage(package)


def _normalize_mlpackage(package: Path) -> None:
    from coremltools.proto import Model_pb2

    spec_file = package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    spec.description.metadata.userDefined.pop("com.github.apple.coremltools.conversion_date", None)
    spec_file.write_bytes(spec.SerializeToString(deterministic=True))  # map fields in a fixed order
    manifest_file = package / "Manifest.json"
    manifest = json.loads(manifest_file.read_text())
    renamed = {
        old: str(uuid.uuid5(uuid.NAMESPACE_URL, f"tailor-mlpackage:{entry['path']}")).upper()
        for old, entry in manifest["itemInfoEntries"].items()
    }
    manifest["itemInfoEntries"] = {renamed[k]: v for k, v in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_file.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")
    # coremltools writes a debug map for ExecuTorch's Core ML delegate beside a torch.export'ed model; it
    # is no item of the package (Manifest.json does not list it) and a standalone app never reads it.
    (package / "executorch_debug_handle_mapping.json").unlink(missing_ok=True)


def inspect_mlpackage(package: Path, config: Any, max_seq_len: int) -> dict[str, Any]:
    """The .mlpackage read back by coremltools (its spec, without Core ML's runtime): its interface."""
    from collections import Counter

    import coremltools as ct

    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    problems = []
    inputs = {i.name: i.type.multiArrayType for i in spec.description.input}
    if sorted(inputs) != ["input_ids", "input_pos"]:
        problems.append(f"inputs {sorted(inputs)}, expected input_ids and input_pos")
    else:
        upper = [r.upperBound for r in inputs["input_ids"].shapeRange.sizeRanges]
        if upper != [1, max_seq_len]:
            problems.append(f"input_ids takes up to {upper} tokens, expected [1, {max_seq_len}]")
    outputs = [o.name for o in spec.description.output]
    if outputs != ["logits"]:
        problems.append(f"outputs {outputs}, expected logits")
    states = {s.name: list(s.type.stateType.arrayType.shape) for s in spec.description.state}
    want_states = {
        f"{kind}_cache_{i}": [1, kv_heads, max_seq_len, head_dim]
        for i in range(config.num_hidden_layers)
        for kind in ("k", "v")
    }
    if states != want_states:
        problems.append(f"states {states}, expected {want_states}")
    weights = sum(p.stat().st_size for p in (package / "Data" / "com.apple.CoreML" / "weights").glob("*"))
    parameters = config.vocab_size * config.hidden_size  # at least the embedding, in float32
    if weights < 4 * parameters:
        problems.append(f"weights of {weights} bytes, fewer than the float32 embedding's {4 * parameters}")
    ops: Counter[str] = Counter()
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            ops.update(op.type for op in block.operations)
    return {
        "specification_version": spec.specificationVersion,
        "inputs": sorted(inputs),
        "outputs": outputs,
        "states": len(states),
        "weights_bytes": weights,
        "mil_ops": sum(ops.values()),
        "problems": problems,
        "passed": not problems,
        "ran_converted_artifact": False,
    }


# --- shared -----------------------------------------------------------------------------------------------


def _check_source(source_format: str, cfg: MobileExportConfig, name: str) -> None:
    if source_format not in SOURCE_FORMATS:
        raise InvalidArgument(
            f"cannot export a model in format {source_format!r} to {name}", choices=SOURCE_FORMATS
        )
    if source_format == "bnb-nf4" and not cfg.dequantize:
        raise InvalidArgument(
            f"a bnb-nf4 model cannot be exported to {name} as NF4 (neither runtime has NF4 kernels). Either set "
            "dequantize=true to export its NF4-rounded weights in float32, or export its parent "
            "(hf-safetensors) model"
        )
    if source_format == "int8-dynamic" and not cfg.dequantize:
        raise InvalidArgument(
            f"an int8-dynamic model cannot be exported to {name} with its int8 layers (this export writes "
            "float32 weights). Either set dequantize=true to export its int8 weights decoded to float32, or "
            "export it with format ort and int8=true for an int8 model on ONNX Runtime Mobile"
        )


def _max_seq_len(cfg: MobileExportConfig, config: dict[str, Any]) -> int:
    limit = int(config.get("max_position_embeddings") or 512)
    if cfg.max_seq_len is None:
        return min(limit, 512)
    if cfg.max_seq_len > limit:
        raise InvalidArgument(
            f"max_seq_len {cfg.max_seq_len} is longer than the model's max_position_embeddings ({limit}); "
            f"ask for at most {limit}"
        )
    return cfg.max_seq_len


def _require_tool(target: str) -> None:
    from tailor_runtime.libraries import importable

    modules = ("executorch.exir", "executorch.runtime") if target == "executorch" else ("coremltools",)
    ok, why = importable(*modules)
    if not ok:
        package = "executorch" if target == "executorch" else "coremltools"
        raise FailedPrecondition(f"the {target} export needs {package} (requirements.txt): {why}")


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _run_executorch(model_dir: Path, out_dir: Path, cfg: ExecuTorchConfig, job: ExportJob) -> dict[str, Any]:
    return export_mobile(model_dir, out_dir, cfg, job, "executorch")


def _run_coreml(model_dir: Path, out_dir: Path, cfg: CoreMLConfig, job: ExportJob) -> dict[str, Any]:
    return export_mobile(model_dir, out_dir, cfg, job, "coreml")


register(
    ExportFormat(
        name="executorch",
        Config=ExecuTorchConfig,
        run=_run_executorch,
        tolerance=EXECUTORCH_TOLERANCE,
        description="ExecuTorch .pte for Android and iOS: float32 Llama decoder lowered to XNNPACK, static KV "
        "cache of max_seq_len slots, 1..max_seq_len tokens per call, with the metadata ExecuTorch's LLM runner "
        "reads; verified by running it in ExecuTorch's runtime and LLM runner (x86-64 Linux)",
        output_format="executorch",
        libraries=EXECUTORCH_LIBRARIES,
    )
)
register(
    ExportFormat(
        name="coreml",
        Config=CoreMLConfig,
        run=_run_coreml,
        tolerance=COREML_TOLERANCE,
        description="Core ML .mlpackage (ML program, iOS 18 / macOS 15) for Apple devices: float32 Llama "
        "decoder, static KV cache as float16 Core ML states; verified by conversion, not run (Core ML runs "
        "only on Apple's systems): the converted program is checked in PyTorch and the package's spec read back",
        output_format="coreml",
        libraries=COREML_LIBRARIES,
    )
)
