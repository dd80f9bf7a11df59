"""What an uploaded file really is, judged by its bytes as they stream in (never by its name alone).

Pickles are refused wherever a loader would read one: at offset 0 (pickle.load, torch.load's legacy
format) or behind a short prefix of up to PREFIX_SCAN bytes (a loader that skips a small header or a
junk byte), inside any zip archive (torch.save's data.pkl, .npz; zips are refused whatever they hold,
since Tailor's artifacts hold no archives), and in numpy .npy object arrays. Files named .safetensors,
.gguf and .onnx must also have that format's structure. Only the first HEAD_BYTES (and a safetensors
header) are held in memory. Nothing here unpickles: opcodes are parsed by pickletools.genops.
"""

from __future__ import annotations

import ast
import io
import json
import pickletools
import struct

from tailor_runtime.errors import InvalidArgument

HEAD_BYTES = 1 << 16
PREFIX_SCAN = 64
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit
CONVERT_HINT = "convert it to safetensors first (`tailor models import FOLDER` / tailor.convert)"
# ModelProto's first field tags (ir_version, producer_name, ..., graph, opset_import, metadata_props).
ONNX_FIRST_TAGS = {0x08, 0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA, 0xD2}


def looks_like_pickle(data: bytes, need_proto: bool = False) -> bool:
    """A run of pickle opcodes that ends in STOP (or fills the window): a pickle, whatever the name.
    need_proto: only a protocol 2+ pickle (PROTO first) counts, for offsets behind a prefix, where a
    stray "e." in text would otherwise parse as one."""
    count = 0
    if need_proto and not (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return False
    try:
        for opcode, _arg, _pos in pickletools.genops(io.BytesIO(data)):
            count += 1
            if opcode.name == "STOP":
                return count >= 3 or (count == 2 and data[:1] == b"\x80")
    except Exception:  # noqa: BLE001 - any parse failure means "not a pickle here"
        return count >= 64
    return count >= 64


class ContentCheck:
    """Feed a file's chunks, then call finish(); InvalidArgument names the file and the fix."""

    def __init__(self, rel: str):
        self.rel = rel
        self.lower = rel.lower()
        self.head = bytearray()
        self.size = 0
        self.head_checked = False

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        limit = self._head_limit()
        if len(self.head) < limit:
            self.head += data[: limit - len(self.head)]
        if not self.head_checked and len(self.head) >= limit:
            self._check_head()

    def finish(self) -> None:
        if not self.head_checked:
            self._check_head()
        if self.lower.endswith(".safetensors"):
            self._check_safetensors_offsets()

    def _head_limit(self) -> int:
        if self.lower.endswith(".safetensors") and len(self.head) >= 8:
            (length,) = struct.unpack("<Q", bytes(self.head[:8]))
            return max(HEAD_BYTES, 8 + min(length, MAX_SAFETENSORS_HEADER))
        return HEAD_BYTES

    def _refuse(self, what: str) -> None:
        raise InvalidArgument(f"{self.rel}: {what}")

    def _check_head(self) -> None:
        self.head_checked = True
        head = bytes(self.head)
        if self.lower.endswith(".safetensors"):
            return self._check_safetensors_header(head)
        if self.lower.endswith(".gguf"):
            if head[:4] != b"GGUF":
                self._refuse_pickle_or("is not a GGUF file (it must start with the GGUF magic)", head)
            return None
        if self.lower.endswith(".onnx"):
            if not head or head[0] not in ONNX_FIRST_TAGS:
                self._refuse_pickle_or("is not an ONNX model (a ModelProto protobuf)", head)
            return None
        if head[:4] == b"PK\x03\x04":
            self._refuse(
                "is a zip archive (torch.save archives and .npz hold pickles), which Tailor refuses; "
                f"upload the files themselves, weights as safetensors: {CONVERT_HINT}"
            )
        if head[:6] == b"\x93NUMPY":
            return self._check_npy(head)
        self._refuse_pickle_or("", head)
        return None

    def _refuse_pickle_or(self, what: str, head: bytes) -> None:
        for offset in range(min(PREFIX_SCAN, len(head)) + 1):
            if looks_like_pickle(head[offset:], need_proto=offset > 0):
                self._refuse(
                    "is a pickle (found by its content"
                    + (f", at byte {offset}" if offset else "")
                    + f"), which Tailor never loads; {CONVERT_HINT}"
                )
        if what:
            self._refuse(what)

    def _check_npy(self, head: bytes) -> None:
        try:
            major = head[6]
            if major == 1:
                (length,) = struct.unpack("<H", head[8:10])
                header = head[10 : 10 + length]
            else:
                (length,) = struct.unpack("<I", head[8:12])
                header = head[12 : 12 + length]
            descr = str(ast.literal_eval(header.decode("latin1")).get("descr"))
        except Exception:  # noqa: BLE001
            self._refuse("is a malformed .npy file")
        if "O" in descr:
            self._refuse(
                f"is a numpy object array (stored as a pickle), which Tailor refuses; {CONVERT_HINT}"
            )

    def _check_safetensors_header(self, head: bytes) -> None:
        bad = "is not a valid safetensors file"
        if len(head) < 8:
            self._refuse_pickle_or(f"{bad}: shorter than its 8-byte header length", head)
        (length,) = struct.unpack("<Q", head[:8])
        if length > MAX_SAFETENSORS_HEADER or 8 + length > len(head):
            self._refuse_pickle_or(f"{bad}: its header length ({length}) is beyond the file", head)
        try:
            header = json.loads(head[8 : 8 + length])
            if not isinstance(header, dict):
                raise ValueError("not an object")
            ends = []
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                    raise ValueError(f"tensor {name} has bad offsets")
                ends.append(end)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            self._refuse_pickle_or(f"{bad}: its header is not a JSON tensor table ({exc})", head)
            return
        self.header_length = length
        self.data_end = max(ends, default=0)

    def _check_safetensors_offsets(self) -> None:
        data_bytes = self.size - 8 - self.header_length
        if self.data_end != data_bytes:
            self._refuse(
                f"is not a valid safetensors file: its header says the tensors take {self.data_end} bytes, "
                f"the file holds {data_bytes}"
            )


def check_file(path, rel: str, chunk: int = 1 << 20) -> None:
    """Run the content check over a local file (streamed)."""
    check = ContentCheck(rel)
    with open(path, "rb") as handle:
        while data := handle.read(chunk):
            check.feed(data)
    check.finish()


def check_safetensors_header(path, rel: str) -> None:
    """A stored .safetensors file's header against its size, reading the header only: a lying header
    is INVALID_ARGUMENT naming the file, before a loader turns it into an internal SafetensorError."""
    from pathlib import Path

    check = ContentCheck(rel)
    size = Path(path).stat().st_size
    with open(path, "rb") as handle:
        check.feed(handle.read(8))
        while len(check.head) < check._head_limit() and (data := handle.read(1 << 20)):
            check.feed(data)
    check.size = size
    check.finish()
