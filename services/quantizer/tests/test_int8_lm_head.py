"""int8_dynamic's quantize_lm_head option: the output projection becomes its own int8 layer."""

from pathlib import Path

from tailor_quantizer.methods import get_method, parse_config
from tailor_runtime.ml.model_io import load_causal_lm, read_format
from tailor_runtime.ml.perplexity import perplexity
from tailor_runtime.progress import no_progress

ROOT = Path(__file__).resolve().parents[3]
MODEL = ROOT / "examples" / "models" / "stories260K"
EVAL = ROOT / "examples" / "data" / "tinystories_eval.txt"


def test_lm_head_quantized_untied_and_close(tmp_path):
    method = get_method("int8_dynamic")
    out = tmp_path / "int8-lm-head"
    metrics = method.run(MODEL, out, parse_config(method, {"quantize_lm_head": True}), no_progress)
    assert metrics["quantized_layers"] == 36  # 35 projections + lm_head
    assert read_format(out)["lm_head_quantized"] is True
    model, tok = load_causal_lm(out)
    assert "quantized" in type(model.lm_head).__module__
    assert not model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.dtype.is_floating_point  # the embedding stays float
    base, _ = load_causal_lm(MODEL)
    text = EVAL.read_text()
    ppl = perplexity(model, tok, text, max_tokens=2048)["perplexity"]
    reference = perplexity(base, tok, text, max_tokens=2048)["perplexity"]
    assert ppl < reference * 1.10
