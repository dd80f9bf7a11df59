"""Large model folders and a gateway process on its own, for upload memory tests and bench/upload_memory.py.

`write_sharded_model` writes a Hugging Face folder shaped like a sharded checkpoint: valid safetensors
shards (header + tensors) filled with random bytes (one random piece, stamped per copy), streamed in
16 MiB pieces (bounded memory), an index, and a config.json. `GatewayProcess` starts only `python -m tailor_gateway` (no workers) with a local store,
and reads its resident memory from /proc.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tailor.connection import Connection
from tailor_cli.stack import free_base_port, health_status
from tailor_gateway.tokens import issue_token

PIECE = 16 << 20
LLAMA_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "dtype": "bfloat16",
    "tie_word_embeddings": False,
}


def _write_shard(path: Path, tensors: dict[str, tuple[int, int]]) -> int:
    """One safetensors file of bf16 tensors {name: (rows, cols)}, random bytes; returns its size."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (rows, cols) in tensors.items():
        size = rows * cols * 2
        header[name] = {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    # One random 16 MiB piece, each copy stamped with its number: no two pieces alike (nothing on the
    # path compresses or deduplicates), and disk-bound rather than bound by os.urandom's CPU cost.
    piece = bytearray(os.urandom(PIECE))
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        left, number = offset, 0
        while left:
            n = min(PIECE, left)
            piece[:8] = number.to_bytes(8, "little")
            handle.write(memoryview(piece)[:n])
            left, number = left - n, number + 1
    return path.stat().st_size


def write_sharded_model(folder: Path, total_bytes: int, shard_bytes: int, width: int = 4096) -> int:
    """A sharded bf16 folder of about total_bytes (tensors of `width` columns); returns the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    rows_per_tensor = max(1, (min(shard_bytes, 256 << 20)) // (width * 2))
    tensor_bytes = rows_per_tensor * width * 2
    per_shard = max(1, shard_bytes // tensor_bytes)
    count = max(1, round(total_bytes / tensor_bytes))
    shards = (count + per_shard - 1) // per_shard
    weight_map, written = {}, 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {
            f"model.layers.{i}.weight": (rows_per_tensor, width)
            for i in range(s * per_shard, min(count, (s + 1) * per_shard))
        }
        written += _write_shard(folder / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": count * tensor_bytes}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(LLAMA_7B, indent=2))
    return written


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak since start) of a process, in kB, from /proc/<pid>/status."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


@dataclass
class GatewayProcess:
    state_dir: Path
    store_url: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    token: str = ""
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def connection(self) -> Connection:
        return Connection(self.address, self.token)

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_base_port()
        tokens = self.state_dir / "tokens"
        self.token = issue_token(tokens, "default")
        env = {
            **os.environ,
            "TAILOR_PORT": str(self.port),
            "TAILOR_METRICS_PORT": str(self.port + 1000),
            "TAILOR_STORE_URL": self.store_url or str(self.state_dir / "store"),
            "TAILOR_CACHE_DIR": str(self.state_dir / "cache"),
            "TAILOR_STATE_DB": str(self.state_dir / "gateway.db"),
            "TAILOR_TOKENS_FILE": str(tokens),
            "TAILOR_WORKERS": "",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        self.log = self.state_dir / "gateway.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tailor_gateway"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while health_status(self.address) != "SERVING":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gateway did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
