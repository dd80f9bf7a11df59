"""Deploy, check and run a `triton` export on a Triton Inference Server, through tritonclient's gRPC client.

    client = TritonClient("localhost:8001")
    client.deploy("stories260K")                     # the model-repository API's load (explicit mode)
    client.metadata("stories260K")                   # inputs and outputs, as the server reports them
    client.logits("stories260K", [[1, 403, 407]])    # [batch, sequence, vocab] float32
    client.generate("stories260K", [[1, 403]], 8)    # greedy tokens, the KV cache kept between calls
    client.undeploy("stories260K")

It speaks the KServe v2 gRPC protocol (`inference.GRPCInferenceService`), which Triton serves on its
gRPC port (8001 by default). The decoder contract is Tailor's ONNX one (tailor_runtime.ml.onnx):
input_ids, attention_mask, position_ids and past_key_values.{i}.key/value in, logits and
present.{i}.key/value out; the inputs' types and shapes come from the server's model metadata.
Every server error becomes one of Tailor's errors: Unavailable (server unreachable), NotFound (no such
model, or not loaded), InvalidArgument (the server refused the request), FailedPrecondition (the rest).

`model_repository_url(store, artifact_id)` is what to give Triton's --model-repository for a published
`triton` export: the artifact's files/ prefix in the store is a Triton model repository.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from tailor_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, TailorError, Unavailable
from tailor_runtime.store.keys import check_artifact_id

DEFAULT_TIMEOUT_S = 30.0
# Phrases of "this model is not (or no longer) there" in Triton's and MLServer's error messages.
_MISSING_MODEL = ("not found", "unknown model", "no available versions", "is not ready")


class TritonClient:
    """One Triton (KServe v2) server, reached over gRPC at `url` ("host:port")."""

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        try:
            import tritonclient.grpc as grpcclient
        except ImportError as exc:
            raise FailedPrecondition(
                f"tritonclient cannot be imported ({exc}); install requirements.txt"
            ) from None
        self.url = url.removeprefix("grpc://")
        self.timeout_s = timeout_s
        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(self.url)

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    # --- health and the model repository ---------------------------------------------------------
    def live(self) -> bool:
        return self._call("check liveness of", "", self._client.is_server_live)

    def ready(self, model: str = "") -> bool:
        """Whether the server (or `model` on it) is ready; a model the server does not know is not."""
        if not model:
            return self._call("check readiness of", "", self._client.is_server_ready)
        try:
            return self._call("check", model, self._client.is_model_ready, model)
        except NotFound:
            return False

    def index(self) -> list[dict[str, Any]]:
        """The models of the server's repositories, with their state."""
        reply = self._call(
            "list the repository of", "", self._client.get_model_repository_index, as_json=True
        )
        return list(reply.get("models", []))

    def deploy(self, model: str) -> None:
        """Load `model` from the server's repositories (Triton started with --model-control-mode=explicit)."""
        self._call("load", model, self._client.load_model, model)
        if not self.ready(model):
            raise FailedPrecondition(
                f"{model!r} was loaded on the Triton server at {self.url} but is not ready"
            )

    def undeploy(self, model: str) -> None:
        self._call("unload", model, self._client.unload_model, model)

    def metadata(self, model: str) -> dict[str, Any]:
        """{"name", "versions", "platform", "inputs": [{"name", "datatype", "shape"}], "outputs": [...]}."""
        reply = self._call(
            "read the metadata of", model, self._client.get_model_metadata, model, as_json=True
        )
        for tensor in (*reply.get("inputs", []), *reply.get("outputs", [])):
            tensor["shape"] = [int(d) for d in tensor.get("shape", [])]  # int64s come as JSON strings
        return reply

    # --- inference -------------------------------------------------------------------------------
    def logits(self, model: str, input_ids: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """The logits [batch, sequence, vocab] of `input_ids` (unpadded rows), run with an empty cache."""
        ids = _ids(input_ids)
        outputs = self._decode(model, self.metadata(model), ids, past=None, want_cache=False)
        return outputs["logits"]

    def generate(
        self, model: str, input_ids: Sequence[Sequence[int]] | np.ndarray, max_new_tokens: int
    ) -> np.ndarray:
        """Greedy decoding: the prompt, then one token per call with the server's `present` fed back as
        `past`. Returns the new tokens [batch, max_new_tokens]."""
        if max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        metadata, ids = self.metadata(model), _ids(input_ids)
        tokens, past, length = [], None, ids.shape[1]
        for _ in range(max_new_tokens):
            outputs = self._decode(model, metadata, ids, past, want_cache=True, offset=length - ids.shape[1])
            ids = outputs["logits"][:, -1, :].argmax(axis=-1).astype(np.int64)[:, None]
            tokens.append(ids)
            past = {
                name.replace("present.", "past_key_values.", 1): a
                for name, a in outputs.items()
                if name != "logits"
            }
            length += 1
        return np.concatenate(tokens, axis=1)

    def _decode(
        self,
        model: str,
        metadata: dict[str, Any],
        ids: np.ndarray,
        past: dict[str, np.ndarray] | None,
        want_cache: bool,
        offset: int = 0,
    ) -> dict[str, np.ndarray]:
        batch, length = ids.shape
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((batch, offset + length), dtype=np.int64),
            "position_ids": np.broadcast_to(
                np.arange(offset, offset + length, dtype=np.int64), (batch, length)
            ),
        }
        inputs = []
        for tensor in metadata.get("inputs", []):
            name, datatype = tensor["name"], tensor["datatype"]
            if name in feeds:
                array = feeds[name]
            elif name.startswith("past_key_values."):
                array = past[name] if past is not None else _empty_past(tensor["shape"], batch, datatype)
            else:
                raise InvalidArgument(
                    f"model {model!r} has an input {name!r} that a decoder call does not fill (expected input_ids, "
                    "attention_mask, position_ids and past_key_values.*: a Tailor `triton` export)"
                )
            array = np.ascontiguousarray(array, dtype=self._grpc.triton_to_np_dtype(datatype))
            infer_input = self._grpc.InferInput(name, list(array.shape), datatype)
            infer_input.set_data_from_numpy(array)
            inputs.append(infer_input)
        names = [t["name"] for t in metadata.get("outputs", [])]
        if "logits" not in names:
            raise InvalidArgument(f"model {model!r} has no `logits` output (outputs: {names[:6]})")
        wanted = names if want_cache else ["logits"]
        requested = [self._grpc.InferRequestedOutput(name) for name in wanted]
        result = self._call("run", model, self._client.infer, model, inputs, outputs=requested)
        return {
            name: result.as_numpy(name).astype(np.float32) if name == "logits" else result.as_numpy(name)
            for name in wanted
        }

    # --- errors ----------------------------------------------------------------------------------
    def _call(self, action: str, model: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, client_timeout=self.timeout_s, **kwargs)
        except InferenceServerException as exc:
            raise self._error(exc, action, model) from None

    def _error(self, exc: Any, action: str, model: str) -> TailorError:
        status, message = str(exc.status() or ""), str(exc.message() or exc)
        what = f"{action} {model!r}" if model else f"{action} the server"
        where = f"the Triton server at {self.url}"
        if model and any(phrase in message.lower() for phrase in _MISSING_MODEL):
            return NotFound(
                f"cannot {what}: {where} has no such model loaded ({message}); deploy it first (load), and check "
                "the name against the repository index"
            )
        if "UNAVAILABLE" in status or "DEADLINE_EXCEEDED" in status:
            return Unavailable(f"cannot {what}: {where} is unreachable or not answering ({message})")
        if "INVALID_ARGUMENT" in status:
            return InvalidArgument(f"cannot {what}: {where} refused the request ({message})")
        return FailedPrecondition(f"cannot {what}: {where} answered {status or 'an error'}: {message}")


def _ids(input_ids: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise InvalidArgument(
            f"input_ids must be [batch, sequence] with at least one token, not shape {ids.shape}"
        )
    return ids


def _empty_past(shape: list[int], batch: int, datatype: str) -> np.ndarray:
    """A past of length 0: [batch, kv_heads, 0, head_dim] from the metadata's [-1, kv_heads, -1, head_dim]."""
    if len(shape) != 4 or shape[1] < 1 or shape[3] < 1:
        raise InvalidArgument(f"a past input of shape {shape} is not [batch, kv_heads, past, head_dim]")
    from tritonclient.utils import triton_to_np_dtype

    return np.zeros((batch, shape[1], 0, shape[3]), dtype=triton_to_np_dtype(datatype))


def model_repository_url(store: Any, artifact_id: str) -> str:
    """What to pass Triton's --model-repository for a published `triton` export in `store`.

    AWS S3: s3://bucket/<prefix>artifacts/<id>/files. Another S3 server (MinIO, Ceph RGW):
    s3://host:port/bucket/... (http), s3://https://host:port/bucket/... (https), Triton's forms for
    an endpoint of its own. A local store: the folder's absolute path.
    """
    check_artifact_id(artifact_id)
    key = f"artifacts/{artifact_id}/files"
    root = getattr(store, "root", None)
    if root is not None:  # LocalStore
        return str(root / key)
    bucket, prefix, endpoint = store.bucket, store.prefix, str(store.endpoint_url)
    if not endpoint.startswith(("http://", "https://")):  # boto3's default: AWS
        return f"s3://{bucket}/{prefix}{key}"
    parts = urlsplit(endpoint)
    if parts.path not in ("", "/"):
        raise InvalidArgument(
            f"Triton cannot reach an S3 endpoint with a path ({endpoint}); give host:port only"
        )
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    return f"s3://{'https://' if https else ''}{parts.hostname}:{port}/{bucket}/{prefix}{key}"
