"""Transformations of an exported decoder graph, each from one file to another, with ONNX Runtime's tools.

  optimize_transformer   onnxruntime.transformers.optimizer (portable fusions, no hardware-specific ops)
  to_fp16                float16 weights and compute (onnxruntime.transformers.float16)
  quantize_int8_dynamic  int8 weights, activations quantized per call (quantize_dynamic)
  quantize_int8_static   int8 weights and activations with calibrated ranges, QDQ format (quantize_static)
  to_ort_format          the ORT format that ONNX Runtime Mobile loads on Android and iOS

Each is deterministic (the same input file and calibration data give the same bytes), except
to_ort_format: ONNX Runtime 1.31's ORT serializer lays the same graph out differently on every run.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from tailor_runtime.ml.onnx import EXTERNAL_DATA_BYTES, INPUTS, past_names

Calibrator = Literal["minmax", "entropy", "percentile"]


def load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path))


def save(model: Any, path: Path) -> None:
    """Save `model`; weights of a large model go to one `<name>.data` file beside it."""
    import onnx

    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    big = weights >= EXTERNAL_DATA_BYTES
    onnx.save(model, str(path), save_as_external_data=big, location=f"{Path(path).name}.data")


def remove(path: Path) -> None:
    """Delete a graph and its external data file, if any."""
    for p in Path(path).parent.glob(Path(path).name + "*"):
        p.unlink()


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def optimize_transformer(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """ONNX Runtime's transformer optimizer; returns the fused operators it made (name -> count).

    model_type "gpt2" is what ONNX Runtime's own Llama exporter (models/llama/convert_to_onnx.py) uses.
    On graphs from torch's dynamo exporter with transformers 5 it fuses every RMSNorm with the residual
    add before it (SkipSimplifiedLayerNormalization); its attention and rotary patterns do not match
    this graph's shape, so attention stays in plain ops (measured: no Attention/RotaryEmbedding fused;
    model_type "qwen3", the other decoder type with RMSNorm and RoPE in 1.31, fuses exactly the same).
    opt_level 0: only these Python fusions, no ONNX Runtime optimizations specific to this machine, so
    the file runs on any execution provider; sessions apply their own optimizations when they load it.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    with contextlib.redirect_stdout(io.StringIO()):  # it prints its statistics
        optimized = optimize_model(
            str(src),
            model_type="gpt2",
            num_heads=num_heads,
            hidden_size=hidden_size,
            opt_level=0,
            optimization_options=FusionOptions("gpt2"),
            only_onnxruntime=False,
        )
    # Its own save: it sorts the nodes and declares the com.microsoft domain of the fused operators.
    big = sum(len(t.raw_data) for t in optimized.model.graph.initializer) >= EXTERNAL_DATA_BYTES
    optimized.save_model_to_file(str(dst), use_external_data_format=big)
    return {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}


def fold_weight_transposes(model: Any) -> int:
    """Replace Transpose(initializer) nodes by a transposed initializer; returns how many were folded.

    A tied output embedding is exported as MatMul(hidden, Transpose(embedding)): the quantizers only
    quantize a MatMul whose weight is a constant, so without this the largest layer would stay float.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    folded = [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in initializers]
    for node in folded:
        weight = numpy_helper.to_array(initializers[node.input[0]])
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        graph.initializer.append(
            numpy_helper.from_array(np.ascontiguousarray(weight.transpose(perm)), node.output[0])
        )
        graph.node.remove(node)
    return len(folded)


def weight_matmuls(model: Any) -> list[str]:
    """Names of the MatMul nodes that multiply by a constant weight (the Linear layers, lm_head)."""
    initializers = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers]


def _with_folded_weights(src: Path, work: Path, fold: bool = True) -> tuple[Path, list[str]]:
    """`src` saved in `work` with its weight transposes folded; and its MatMuls by a weight."""
    model = load(src)
    if fold:
        fold_weight_transposes(model)
    save(model, work / "folded.onnx")
    return work / "folded.onnx", weight_matmuls(model)


def to_fp16(src: Path, dst: Path) -> None:
    """Float16 weights and compute, inputs and outputs included (past/present in float16 halve the cache).

    The attention mask's "minus infinity" (float32's lowest value) becomes -inf in float16, which the
    softmax handles; verified against PyTorch float32 on CPU and within the fp16 tolerance.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    save(convert_float_to_float16(load(src), keep_io_types=False, disable_shape_infer=True), dst)


def quantize_int8_dynamic(src: Path, dst: Path, per_channel: bool, nodes: Sequence[str] | None = None) -> int:
    """Int8 weights (symmetric), activations quantized per call; returns the MatMuls quantized.

    `nodes` limits it to those MatMuls (a source that is already int8 keeps exactly its own layers);
    by default every MatMul by a weight, the output embedding included.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="tailor-int8-") as tmp:
        # With `nodes`, the output embedding stays float: folding its transpose would only copy it.
        folded, matmuls = _with_folded_weights(src, Path(tmp), fold=nodes is None)
        chosen = list(nodes) if nodes is not None else matmuls
        quantize_dynamic(
            model_input=str(folded),
            model_output=str(dst),
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_quantize=chosen,
            per_channel=per_channel,
            reduce_range=False,
            weight_type=QuantType.QInt8,
            use_external_data_format=(Path(tmp) / "folded.onnx.data").exists(),
            extra_options={"MatMulConstBOnly": True},
        )
    return len(chosen)


class TokenReader:
    """ONNX Runtime's CalibrationDataReader over token sequences: each one a prompt with an empty past."""

    def __init__(self, sequences: Sequence[Sequence[int]], layers: int, kv_heads: int, head_dim: int):
        self.sequences, self.shape = list(sequences), (1, kv_heads, 0, head_dim)
        self.layers = layers
        self._rows: Iterator[Sequence[int]] = iter(self.sequences)

    def get_next(self) -> dict[str, Any] | None:
        import numpy as np

        row = next(self._rows, None)
        if row is None:
            return None
        ids = np.asarray([row], dtype=np.int64)
        feeds = dict(zip(INPUTS, (ids, np.ones_like(ids), np.arange(ids.shape[1])[None]), strict=True))
        empty = np.zeros(self.shape, dtype=np.float32)
        return feeds | {name: empty for name in past_names(self.layers)}

    def rewind(self) -> None:
        self._rows = iter(self.sequences)


def quantize_int8_static(
    src: Path,
    dst: Path,
    reader: TokenReader,
    calibrator: Calibrator,
    percentile: float,
    per_channel: bool,
) -> dict[str, Any]:
    """Int8 weights and activations (QDQ), activation ranges calibrated on `reader`; returns statistics.

    Only the MatMuls by a weight are quantized (their inputs get calibrated QuantizeLinear/
    DequantizeLinear pairs, their weights int8 initializers); attention's activation-by-activation
    MatMuls, softmax and the norms stay float, and MatMul outputs are not re-quantized (ONNX Runtime
    then runs each as one int8 matmul with a float result, MatMulIntegerToFloat). Activations uint8
    (asymmetric), weights int8 (symmetric): with int8 activations ONNX Runtime 1.31 on x86 fused only 11
    of stories260K's 36 MatMuls and ran the rest as DequantizeLinear + float MatMul (measured 6x slower
    than dynamic int8 on an 11M model); with uint8 all 36 fuse. On x86 without AVX512-VNNI, uint8 x int8
    can saturate (ONNX Runtime's documentation); the bench machine has VNNI.

    The calibrator is run here rather than inside quantize_static, which cannot pass it histogram
    sizes: its entropy calibrator's defaults (128 bins, 128 quantized bins) leave one candidate
    threshold, the full range, so "entropy" would silently be min-max (measured: identical graphs).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    method, options = {
        "minmax": (CalibrationMethod.MinMax, {}),
        # KL divergence over 512 histogram bins, thresholds searched in steps of one bin (TensorRT: 2048).
        "entropy": (CalibrationMethod.Entropy, {"num_bins": 512, "num_quantized_bins": 128}),
        "percentile": (CalibrationMethod.Percentile, {"num_bins": 2048, "percentile": percentile}),
    }[calibrator]
    with tempfile.TemporaryDirectory(prefix="tailor-qdq-") as tmp:
        folded, matmuls = _with_folded_weights(src, Path(tmp))
        external = (Path(tmp) / "folded.onnx.data").exists()
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print per tensor
            collector = create_calibrator(
                folded,
                ["MatMul"],
                augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=method,
                use_external_data_format=external,
                extra_options=options,
            )
            collector.collect_data(reader)
            ranges = collector.compute_data()  # activation tensor -> (low, high)
        del collector
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(ranges, cache)
        quantize_static(
            model_input=str(folded),
            model_output=str(dst),
            calibration_data_reader=None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=matmuls,
            per_channel=per_channel,
            reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            use_external_data_format=external,
            calibrate_method=method,
            extra_options={"MatMulConstBOnly": True, "OpTypesToExcludeOutputQuantization": ["MatMul"]},
            calibration_cache_path=cache,  # the ranges computed above
        )
    return {
        "calibrator": calibrator,
        "calibration_percentile": percentile if calibrator == "percentile" else None,
        "calibrated_tensors": len(ranges.data),
        "calibration_sequences": len(reader.sequences),
        "quantized_matmuls": len(matmuls),
    }


def to_ort_format(src: Path, out_dir: Path) -> Path:
    """Convert `src` to the ORT format in `out_dir` (`<stem>.ort` + required_operators.config).

    ONNX Runtime's own converter, "Fixed" style: optimizations are applied before saving, as ONNX Runtime
    Mobile (Android, iOS) expects; NCHWc layouts, which only x86 runs, are left out by the converter.
    `required_operators.config` lists the operators a reduced-size mobile build must include.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with contextlib.redirect_stdout(io.StringIO()):
        convert_onnx_models_to_ort(
            Path(src), output_dir=Path(out_dir), optimization_styles=[OptimizationStyle.Fixed]
        )
    return Path(out_dir) / (Path(src).stem + ".ort")
