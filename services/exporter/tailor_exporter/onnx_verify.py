"""Moved to `tailor_runtime.ml.onnx.verify` (shared with the quantizer); these names stay importable here."""

from tailor_runtime.ml.onnx.verify import SAMPLE_TEXT, reference_logits, sample_batches

__all__ = ["SAMPLE_TEXT", "reference_logits", "sample_batches"]
