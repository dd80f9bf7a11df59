"""Artifacts in an S3 bucket (MinIO in clusters, Ceph RGW in the tests, AWS S3): the blob primitives only.

Correctness (hashing, publish order, verification on read) lives in `base.py`; this module moves bytes
and turns botocore's failures into the domain errors users see. Large files go through boto3's
managed transfer (multipart, a bounded number of parts in flight) and reads stream in chunks, so
memory stays bounded whatever the model size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import boto3
from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from tailor_runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TailorError,
    Unauthenticated,
    Unavailable,
)
from tailor_runtime.store.base import ArtifactStore
from tailor_runtime.store.manifest import CHUNK

log = logging.getLogger(__name__)

MiB = 1 << 20
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_BAD_CREDENTIALS = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_SERVER_BUSY = {"ServiceUnavailable", "SlowDown", "InternalError", "RequestTimeout", "503", "500"}
# A dropped connection in the middle of a download is resumed from the last byte this many times.
_RESUME_ATTEMPTS = 3


class S3Store(ArtifactStore):
    """Keys live under `s3://<bucket>/<prefix>`; the layout is the one described in `base.py`."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any,
        endpoint_url: str | None = None,
        transfer_config: TransferConfig | None = None,
    ):
        if len(bucket) < 3:
            raise InvalidArgument(f"S3 bucket name {bucket!r} is too short: at least 3 characters")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url or "the default AWS S3 endpoint"
        self._client = client
        self._transfer = transfer_config or TransferConfig()

    @classmethod
    def from_url(
        cls,
        url: str,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        create_bucket: bool = False,
        *,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,
        max_concurrency: int = 4,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 5,
    ) -> S3Store:
        """Open `s3://bucket/prefix`. Arguments left as None come from the environment: AWS_ENDPOINT_URL,
        AWS_REGION; the keys through boto3's credential chain, which reads AWS_ACCESS_KEY_ID and
        AWS_SECRET_ACCESS_KEY first (and also session tokens, profiles and pod identities).

        Memory in flight during an upload is at most max_concurrency x multipart_chunksize.
        """
        if not url.startswith("s3://"):
            raise InvalidArgument(f"S3 store URL {url!r} must look like s3://bucket/prefix")
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if bool(access_key) != bool(secret_key):
            raise InvalidArgument("give both the S3 access key and the secret key, or neither")
        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        config = Config(
            region_name=region,
            signature_version="s3v4",
            # MinIO and Ceph serve buckets under the path, not as virtual hosts (no wildcard DNS).
            s3={"addressing_style": "path"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            # botocore >= 1.36 adds CRC trailers that older S3-compatible servers reject; every
            # read is verified against the manifest's sha256 anyway.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            user_agent_extra="tailor",
        )
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key or None,
            aws_secret_access_key=secret_key or None,
            config=config,
        )
        transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=max_concurrency > 1,
        )
        store = cls(bucket, prefix, client=client, endpoint_url=endpoint_url, transfer_config=transfer)
        # The secret is handed to boto3 and never kept on the store, logged or put in a message.
        log.info("S3 artifact store: endpoint %s, bucket %s, prefix %r", store.endpoint_url, bucket, prefix)
        if create_bucket:
            store.ensure_bucket()
        return store

    # --- blob primitives ----------------------------------------------------------------------
    def _put_file(self, key: str, src: Path) -> None:
        # upload_file switches to multipart above the threshold; a single PUT is atomic, and a
        # multipart object only appears once CompleteMultipartUpload succeeds.
        self._call(
            "upload",
            key,
            self._client.upload_file,
            str(src),
            self.bucket,
            self._key(key),
            Config=self._transfer,
        )

    def _put_bytes(self, key: str, data: bytes) -> None:
        self._call("write", key, self._client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def _get_bytes(self, key: str) -> bytes:
        response = self._call("read", key, self._client.get_object, Bucket=self.bucket, Key=self._key(key))
        return self._call("read", key, response["Body"].read)

    def _iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """One streamed GET; a connection dropped mid-way resumes with a ranged GET of the same version."""
        offset, etag, resumes = 0, None, 0
        while True:
            request: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
            if etag is not None:
                # If-Match: a resumed read never splices bytes of a newer object onto an older one.
                request.update(Range=f"bytes={offset}-", IfMatch=etag)
            response = self._call("read", key, self._client.get_object, **request)
            etag = etag or response.get("ETag")
            body = response["Body"]
            try:
                for chunk in body.iter_chunks(chunk_size):
                    offset += len(chunk)
                    yield chunk
                return
            except (BotoConnectionError, ReadTimeoutError, ResponseStreamingError) as exc:
                resumes += 1
                if resumes > _RESUME_ATTEMPTS or etag is None:
                    self._raise(exc, "read", key)
                log.warning("S3 read of %s dropped at byte %d; resuming (%d)", key, offset, resumes)
            finally:
                body.close()

    def _exists(self, key: str) -> bool:
        try:
            self._call("check", key, self._client.head_object, Bucket=self.bucket, Key=self._key(key))
        except NotFound:
            return False
        return True

    def _list_prefixes(self, prefix: str) -> list[str]:
        full = self._key(prefix.rstrip("/") + "/")
        names = []
        paginator = self._client.get_paginator("list_objects_v2")
        # Delimiter="/": the server returns one entry per artifact, not every file of every artifact.
        pages = paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/")
        try:
            for page in pages:
                for common in page.get("CommonPrefixes", []):
                    names.append(common["Prefix"][len(full) :].rstrip("/"))
        except (ClientError, BotoCoreError) as exc:
            self._raise(exc, "list", prefix)
        return sorted(names)

    def uri_for(self, artifact_id: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}artifacts/{artifact_id}"

    # --- readiness ----------------------------------------------------------------------------
    def check_ready(self) -> None:
        """Raise Unavailable unless the bucket answers with these credentials (health checks)."""
        try:
            self._call("reach", "", self._client.head_bucket, Bucket=self.bucket)
        except Unavailable:
            raise
        except NotFound:
            raise Unavailable(
                f"S3 bucket {self.bucket!r} does not exist at {self.endpoint_url}: create it "
                "(or open the store with create_bucket=True)"
            ) from None
        except TailorError as exc:
            raise Unavailable(exc.message) from None

    def ensure_bucket(self) -> None:
        """Create the bucket when it is missing (local stacks and tests; clusters provision it)."""
        try:
            self._call("reach", "", self._client.head_bucket, Bucket=self.bucket)
            return
        except NotFound:
            pass
        try:
            self._client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in {
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            }:
                self._raise(exc, "create bucket", "")
        except BotoCoreError as exc:
            self._raise(exc, "create bucket", "")

    # --- helpers ------------------------------------------------------------------------------
    def _key(self, key: str) -> str:
        return self.prefix + key

    def _call(self, action: str, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ClientError, BotoCoreError, S3UploadFailedError, S3TransferFailedError) as exc:
            self._raise(exc, action, key)

    def _raise(self, exc: BaseException, action: str, key: str) -> NoReturn:
        """Map a boto3/botocore failure to the one domain error a user can act on."""
        where = f"S3 endpoint {self.endpoint_url}, bucket {self.bucket!r}"
        what = f"{action} s3://{self.bucket}/{self._key(key)}" if key else f"{action} the bucket"
        cause = _root_cause(exc)
        log.debug("S3 %s of %r failed", action, key, exc_info=cause)
        if isinstance(cause, ClientError):
            error = cause.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                # Not NotFound: that would read as "no such artifact" when the whole store is missing.
                raise Unavailable(
                    f"{where}: the bucket does not exist (while trying to {what}); create it or open the "
                    "store with create_bucket=True"
                ) from None
            if code in _NOT_FOUND:
                raise NotFound(f"{key or self.bucket} not found ({where})") from None
            if code == "403":
                code = self._diagnose_forbidden() or code
            if code in _BAD_CREDENTIALS:
                raise Unauthenticated(
                    f"{where} rejected the credentials ({code}): check the access key and secret key "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
                ) from None
            if code in _DENIED:
                raise PermissionDenied(
                    f"{where} refused to {what} (HTTP 403): wrong secret key, or the user lacks the "
                    "permission"
                ) from None
            if code in _SERVER_BUSY or (isinstance(status, int) and status >= 500):
                raise Unavailable(
                    f"{where} failed to {what} after retries ({code or status}); nothing published was "
                    "lost: retry later"
                ) from None
            # Any other refusal is not transient: retrying would not help, so it is not Unavailable.
            raise FailedPrecondition(
                f"{where}: could not {what}: {code} {error.get('Message') or ''}".strip()
            ) from None
        if isinstance(cause, NoCredentialsError):
            raise Unauthenticated(
                f"{where}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        # Connection refused, DNS, timeouts, a connection closed mid-transfer: the server is away.
        raise Unavailable(
            f"{where} is unreachable ({type(cause).__name__}) while trying to {what}: nothing was lost "
            "(an artifact exists only once its manifest is written); retry when the endpoint is back"
        ) from None

    def _diagnose_forbidden(self) -> str | None:
        """The error code behind a bare 403: HEAD answers carry no body, so a wrong secret and a
        missing grant look alike; a one-key listing of the bucket says which it was."""
        try:
            self._client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            return code if code and code != "403" else None
        except BotoCoreError:
            return None
        return None


def _root_cause(exc: BaseException) -> BaseException:
    """The botocore error inside boto3's transfer wrappers (they re-raise it as a message only)."""
    seen = exc
    while isinstance(seen, S3UploadFailedError | S3TransferFailedError) and (
        seen.__cause__ or seen.__context__
    ):
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
    return seen
