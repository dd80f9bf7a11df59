"""The trainer's loss is the model's own next-token loss in every architecture family: batch_loss runs the
output head only on labelled positions, so whatever the model's forward does to its logits (Gemma 2's
soft-capping) the loss must do too."""

from __future__ import annotations

import pytest
from support.families import TINY_FAMILIES, tiny_model

from tailor_runtime.ml.model_io import load_causal_lm
from tailor_trainer.loop import IGNORE, batch_loss


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_batch_loss_equals_the_models_own_logits_loss(family, tmp_path):
    import torch

    model, _ = load_causal_lm(tiny_model(family, tmp_path / family, seed=2))
    with torch.no_grad():  # logits of tens, as trained models have, where a cap of 30 bites
        model.get_output_embeddings().weight.mul_(300.0)
    torch.manual_seed(0)
    ids = torch.randint(3, 512, (2, 24))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, :5] = IGNORE  # a prompt: no loss there
    labels[:, -1] = IGNORE
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        expected = torch.nn.functional.cross_entropy(
            logits.reshape(-1, 512), labels.reshape(-1), ignore_index=IGNORE
        )
        got = batch_loss(model, {"input_ids": ids, "labels": labels})
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
