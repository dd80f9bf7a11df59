"""A stand-in for Triton in the tests: MLServer (a real KServe v2 server) reading a Triton model repository.

Runs inside .venv-mlserver (requirements-mlserver.txt), never in the project's environment. MLServer
serves the KServe v2 protocol that tritonclient speaks (gRPC `inference.GRPCInferenceService`: live,
ready, metadata, infer, and the repository's load and unload); this module gives it Triton's repository
layout and what Triton's ONNX Runtime backend does when it loads a model:

  TritonLayoutRepository  each folder of the roots with a config.pbtxt is a model named after the folder;
                          its config is parsed as Triton's ModelConfig (tritonclient's protobuf); the
                          version served is the highest numeric folder holding model.onnx
  OnnxRuntimeModel        loads <name>/<version>/model.onnx with ONNX Runtime (CPU), refuses to load
                          when config.pbtxt's inputs/outputs differ from the graph's, and runs inference
                          on exactly the inputs config.pbtxt declares

It is an approximation of Triton written for these tests, not Triton: no TensorRT, no GPU instances
(KIND_GPU is served on CPU), no batching, no S3.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from google.protobuf import text_format
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import MLServerError, ModelNotFound
from mlserver.repository.repository import ModelRepository
from mlserver.settings import ModelParameters, ModelSettings
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor


def _model_config_pb2():
    """tritonclient's model_config_pb2 on its own: importing the tritonclient.grpc package would register
    its service protos, whose `inference.*` names MLServer's own dataplane protos already hold."""
    package = importlib.util.find_spec("tritonclient").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location(
        "triton_model_config_pb2", os.path.join(package, "grpc", "model_config_pb2.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mc = _model_config_pb2()
# Triton DataType -> (KServe v2 datatype, ONNX Runtime type string)
TYPES = {
    "TYPE_FP32": ("FP32", "tensor(float)"),
    "TYPE_FP16": ("FP16", "tensor(float16)"),
    "TYPE_INT64": ("INT64", "tensor(int64)"),
    "TYPE_INT32": ("INT32", "tensor(int32)"),
    "TYPE_INT8": ("INT8", "tensor(int8)"),
    "TYPE_UINT8": ("UINT8", "tensor(uint8)"),
    "TYPE_BOOL": ("BOOL", "tensor(bool)"),
}


def read_config(folder: Path) -> mc.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), mc.ModelConfig())


def latest_version(folder: Path) -> str | None:
    versions = [p.name for p in folder.iterdir() if p.name.isdigit() and (p / "model.onnx").is_file()]
    return max(versions, key=int) if versions else None


class TritonLayoutRepository(ModelRepository):
    """`root`: one repository folder, or several joined by os.pathsep (Triton's repeated --model-repository)."""

    def __init__(self, root: str):
        self.roots = [Path(r) for r in root.split(os.pathsep)]

    async def list(self) -> list[ModelSettings]:
        models = []
        folders = (p for root in self.roots for p in sorted(root.iterdir()) if (p / "config.pbtxt").is_file())
        for folder in folders:
            version = latest_version(folder)
            if version is None:
                continue
            config = read_config(folder)
            models.append(
                ModelSettings(
                    name=folder.name,
                    implementation="triton_layout.OnnxRuntimeModel",
                    platform=config.platform or "onnxruntime_onnx",
                    versions=[version],
                    inputs=[_tensor(t) for t in config.input],
                    outputs=[_tensor(t) for t in config.output],
                    parameters=ModelParameters(uri=str(folder / version / "model.onnx"), version=version),
                )
            )
        return models

    async def find(self, name: str) -> list[ModelSettings]:
        found = [m for m in await self.list() if m.name == name]
        if not found:
            raise ModelNotFound(name)
        return found


def _tensor(tensor) -> MetadataTensor:
    datatype = TYPES[mc.DataType.Name(tensor.data_type)][0]
    return MetadataTensor(name=tensor.name, datatype=datatype, shape=list(tensor.dims))


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        path = Path(self.settings.parameters.uri)
        config = read_config(path.parent.parent)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("TRITON_STANDIN_THREADS", "1"))
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = {t.name: t for t in (*self.session.get_inputs(), *self.session.get_outputs())}
        problems = []
        for tensor in (*config.input, *config.output):
            dtype = mc.DataType.Name(tensor.data_type)
            if tensor.name not in graph:
                problems.append(f"{tensor.name!r} is not in model.onnx")
            elif TYPES.get(dtype, ("", ""))[1] != graph[tensor.name].type:
                problems.append(
                    f"{tensor.name!r} is {dtype} in config.pbtxt, {graph[tensor.name].type} in the graph"
                )
        declared = {t.name for t in config.input}
        problems += [
            f"input {i.name!r} is missing from config.pbtxt"
            for i in self.session.get_inputs()
            if i.name not in declared
        ]
        if problems:
            raise MLServerError(
                f"model {self.name!r}: config.pbtxt does not match model.onnx: {'; '.join(problems)}"
            )
        self.input_names = sorted(declared)
        self.output_names = [t.name for t in config.output]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        if sorted(feeds) != self.input_names:
            missing = sorted(set(self.input_names) - set(feeds))
            raise MLServerError(f"model {self.name!r} expects inputs {missing} too", status_code=400)
        wanted = [o.name for o in payload.outputs or []] or self.output_names
        unknown = [name for name in wanted if name not in self.output_names]
        if unknown:
            raise MLServerError(f"model {self.name!r} has no outputs {unknown}", status_code=400)
        arrays = self.session.run(wanted, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output(name, np.asarray(a)) for name, a in zip(wanted, arrays, strict=True)
            ],
        )
