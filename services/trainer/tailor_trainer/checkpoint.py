"""Training checkpoints: everything a run needs to continue exactly where it stopped, without pickles.

A checkpoint folder holds `state.safetensors` (the trainable parameters, the optimizer's tensors, the
torch RNG state, and with evaluations during training the best evaluation's weights) and `state.json`
(step, losses so far, optimizer hyperparameters, scheduler position, the evaluations so far).
Batches are a function of (seed, step) (see data.py and datasets.py), so the data position is the step.
In the store a checkpoint is an artifact of kind "checkpoint"; the latest one of a run is found through
the store's recipe index under {"checkpoint_of": <the run's recipe key>}, so a run dispatched again
with the same request (after its worker was killed) resumes, on this worker or another.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tailor_runtime.errors import InvalidArgument

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
FORMAT = "tailor-checkpoint"


def save(
    folder: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    step: int,
    losses: list[float],
    evaluations: dict[str, Any] | None = None,
) -> None:
    """`evaluations`: loop.BestWeights.state() (JSON values, and its kept weights under "weights")."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Any] = {}
    names = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            names.append(name)
            tensors[f"param/{name}"] = param.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optimizer/{index}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    evaluations = dict(evaluations) if evaluations else None
    if evaluations is not None:
        for i, kept in enumerate(evaluations.pop("weights", None) or []):
            tensors[f"best/{i}"] = kept.detach().cpu().contiguous()
    save_file(tensors, folder / STATE_TENSORS, metadata={"format": "pt"})
    meta = {
        "step": step,
        "losses": losses,
        "trainable": names,
        "param_groups": opt["param_groups"],
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "evaluations": evaluations,
    }
    (folder / STATE_JSON).write_text(json.dumps(meta, sort_keys=True))


def load(
    folder: Path, model: Any, optimizer: Any, scheduler: Any
) -> tuple[int, list[float], dict[str, Any] | None]:
    """Restore the state saved by `save` into this run's objects; (step reached, losses so far, the
    evaluations so far with their kept weights, or None)."""
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    tensors = load_file(folder / STATE_TENSORS)
    meta = json.loads((folder / STATE_JSON).read_text())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if sorted(params) != sorted(meta["trainable"]):
        raise InvalidArgument(
            "the checkpoint does not match this run's trainable parameters (a different model or method?); "
            f"checkpoint has {len(meta['trainable'])}, this run {len(params)}"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[f"param/{name}"])
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, field = key.split("/", 2)
            state.setdefault(int(index), {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng/torch"])
    evaluations = meta.get("evaluations")  # absent in checkpoints from before evaluations existed
    if evaluations is not None:
        kept = sorted((int(k.split("/")[1]), v) for k, v in tensors.items() if k.startswith("best/"))
        evaluations["weights"] = [v for _, v in kept] or None
    return int(meta["step"]), list(meta["losses"]), evaluations
