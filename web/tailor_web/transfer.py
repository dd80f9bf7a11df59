"""Artifacts through HTTP, streamed both ways: an upload body goes to the gateway as it arrives (bounded
memory, nothing spooled to disk), and a download leaves as the gateway sends it, each file checked
against its manifest's sha256 as it passes (a mismatch cuts the response, so a client never gets a
whole, wrong file)."""

from __future__ import annotations

import hashlib
import queue
import tarfile
from collections.abc import AsyncIterator, Iterator

import anyio
import grpc
from python_multipart.multipart import MultipartParser, parse_options_header

from tailor.gateway.v1 import gateway_service_pb2 as pb
from tailor_web.errors import ApiError
from tailor_web.gateway import Gateway

# Messages waiting for gRPC to take them: with the body's chunks (~64 KiB) this bounds an upload's memory.
UPLOAD_QUEUE = 16
_END = object()


class MultipartFiles:
    """A multipart/form-data body -> the upload's FileChunk messages, fed as bytes arrive. Each file part's
    filename is its path inside the artifact (a page sends a folder's files with their relative paths);
    parts without a filename (plain form fields) are ignored."""

    def __init__(self, boundary: bytes):
        self.ready: list[pb.UploadArtifactRequest] = []
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._field = self._value = b""
        self._path = ""
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda d, s, e: self._grow("_field", d[s:e]),
                "on_header_value": lambda d, s, e: self._grow("_value", d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    def feed(self, data: bytes) -> list[pb.UploadArtifactRequest]:
        self.parser.write(data)
        ready, self.ready = self.ready, []
        return ready

    def close(self) -> list[pb.UploadArtifactRequest]:
        return []

    def _grow(self, name: str, data: bytes) -> None:
        setattr(self, name, getattr(self, name) + data)

    def _part_begin(self) -> None:
        self._headers, self._path = {}, ""

    def _header_end(self) -> None:
        self._headers[self._field.strip().lower()] = self._value.strip()
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._path = params.get(b"filename", b"").decode("utf-8", "replace")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._path and end > start:
            self.ready.append(
                pb.UploadArtifactRequest(chunk=pb.FileChunk(path=self._path, data=data[start:end]))
            )

    def _part_end(self) -> None:
        if self._path:  # an empty data chunk closes the file (also a file of 0 bytes)
            self.ready.append(pb.UploadArtifactRequest(chunk=pb.FileChunk(path=self._path, eof=True)))

    def _end(self) -> None:
        self.ended = True


class RawFile:
    """An application/octet-stream body: one file, its path given beside the body."""

    def __init__(self, path: str):
        self.path, self.ended = path, False

    def feed(self, data: bytes) -> list[pb.UploadArtifactRequest]:
        return [pb.UploadArtifactRequest(chunk=pb.FileChunk(path=self.path, data=data))] if data else []

    def close(self) -> list[pb.UploadArtifactRequest]:
        self.ended = True
        return [pb.UploadArtifactRequest(chunk=pb.FileChunk(path=self.path, eof=True))]


def body_reader(content_type: str, path: str) -> MultipartFiles | RawFile:
    kind, params = parse_options_header(content_type)
    if kind == b"multipart/form-data" and params.get(b"boundary"):
        return MultipartFiles(params[b"boundary"])
    if kind == b"application/octet-stream":
        if not path:
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT, "an application/octet-stream upload needs ?path="
            )
        return RawFile(path)
    raise ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "send the files as multipart/form-data (each file's filename is its path in the artifact), "
        "or one file as application/octet-stream with ?path=",
    )


async def upload(
    gateway: Gateway, token: str, header: pb.UploadHeader, body: AsyncIterator[bytes], reader
) -> pb.UploadArtifactResponse:
    """Forward the body to UploadArtifact as it arrives; the gateway's refusal (bad kind, a pickle, over
    the size limit) ends the upload at once and is what the caller gets."""
    waiting: queue.Queue = queue.Queue(maxsize=UPLOAD_QUEUE)

    def requests() -> Iterator[pb.UploadArtifactRequest]:
        yield pb.UploadArtifactRequest(header=header)
        while (item := waiting.get()) is not _END:
            yield item

    call = gateway.upload(requests(), token)

    def put(item) -> bool:
        # Blocks while gRPC is behind (back-pressure on the HTTP body); gives up once the call has ended.
        while not call.done():
            try:
                waiting.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    try:
        async for data in body:
            for message in reader.feed(data):
                if not await anyio.to_thread.run_sync(put, message):
                    return await anyio.to_thread.run_sync(call.result)  # the gateway ended it: its answer
        for message in reader.close():
            await anyio.to_thread.run_sync(put, message)
        if not reader.ended:
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT, "the multipart body ended before its last boundary"
            )
        await anyio.to_thread.run_sync(put, _END)
    except BaseException:
        call.cancel()  # the client went away or sent a broken body: the gateway keeps nothing of it
        raise
    return await anyio.to_thread.run_sync(call.result)


def _checked_chunks(call, files: dict[str, dict], only: str = "") -> Iterator[tuple[str, bytes, bool]]:
    """(path, data, eof) from DownloadArtifact, each file's size and sha256 checked against the manifest
    before its last byte is passed on."""
    digest, size = hashlib.sha256(), 0
    try:
        for reply in call:
            chunk = reply.chunk
            if only and chunk.path != only:
                continue
            entry = files.get(chunk.path)
            if entry is None:
                raise ApiError(
                    grpc.StatusCode.DATA_LOSS, f"the gateway sent {chunk.path!r}, not in the manifest"
                )
            digest.update(chunk.data)
            size += len(chunk.data)
            if chunk.eof and (size != entry["size"] or digest.hexdigest() != entry["sha256"]):
                raise ApiError(
                    grpc.StatusCode.DATA_LOSS, f"{chunk.path} does not match its manifest's sha256"
                )
            yield chunk.path, chunk.data, chunk.eof
            if chunk.eof:
                if only:
                    return
                digest, size = hashlib.sha256(), 0
    finally:
        call.cancel()  # a client that went away, or one file taken: stop the gateway's stream


def file_bytes(call, files: dict[str, dict], path: str) -> Iterator[bytes]:
    for _, data, _ in _checked_chunks(call, files, only=path):
        if data:
            yield data


def tar_bytes(call, files: dict[str, dict]) -> Iterator[bytes]:
    """The artifact as an uncompressed tar, written as it streams: the manifest gives every file's size,
    which is all a tar header needs before the file's bytes."""
    current = ""
    for path, data, eof in _checked_chunks(call, files):
        if path != current:
            current = path
            info = tarfile.TarInfo(path)
            info.size, info.mode = files[path]["size"], 0o644
            yield info.tobuf(format=tarfile.PAX_FORMAT)  # PAX: paths longer than 100 characters
        if data:
            yield data
        if eof:
            current = ""
            yield b"\0" * (-files[path]["size"] % tarfile.BLOCKSIZE)  # each file fills whole blocks
    yield b"\0" * (2 * tarfile.BLOCKSIZE)  # the end-of-archive marker


def files_by_path(manifest: dict) -> dict[str, dict]:
    return {f["path"]: f for f in manifest.get("files", [])}
