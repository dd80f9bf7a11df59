"""Settings from environment variables (TAILOR_*), validated at start-up with clear errors."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class SettingsError(SystemExit):
    """Exits the process with a readable message instead of a traceback."""


class ServiceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    service: str = Field(description="Service name, used in logs, metrics and traces.")
    host: str = Field("127.0.0.1", description="Address the gRPC server binds to.")
    port: int = Field(50051, ge=1, le=65535, description="gRPC port.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 disables.")
    health_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="A plaintext port serving only gRPC health, for kubelet probes (they cannot do TLS); 0: none.",
    )
    store_url: str = Field(
        ".tailor/store", description="Artifact store: a directory, file:// or s3://bucket/prefix."
    )
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, Ceph RGW); None for AWS.")
    s3_access_key: str | None = None
    s3_secret_key: str | None = Field(None, repr=False)
    s3_create_bucket: bool = False
    cache_dir: Path = Field(Path(".tailor/cache"), description="Verified local copies of input artifacts.")
    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    grace_seconds: float = Field(10.0, gt=0, description="Graceful shutdown period after SIGTERM.")
    max_operations: int = Field(1, ge=1, description="Operations run at once; more are refused as busy.")
    trace_file: Path | None = Field(None, description="Write finished spans as JSON lines here.")
    otlp_endpoint: str | None = Field(None, description="Export spans over OTLP/gRPC to this endpoint.")
    tls_cert: Path | None = Field(
        None, description="PEM certificate: serve (and call other services) over TLS."
    )
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    tls_ca: Path | None = Field(
        None, description="PEM CA bundle: peers must present a certificate it signed (mutual TLS)."
    )
    worker_secret: str = Field(
        "",
        repr=False,
        description="The stack's shared secret the gateway sends to workers (prefer worker_secret_file).",
    )
    worker_secret_file: Path | None = Field(
        None,
        description="File holding the stack's shared secret (gateway and workers; `tailor up` writes one).",
    )
    gateway_identities: str = Field(
        "",
        description="Workers: comma-separated names (DNS SAN or CN) of the gateway's client certificate, "
        "accepted over mutual TLS (needs TAILOR_TLS_CA).",
    )
    insecure_open_worker: bool = Field(
        False, description="DEVELOPMENT ONLY: a worker without secret or mTLS identities serves anyone."
    )
    fake_work: str = Field(
        "",
        pattern="^(|instant)$",
        description="TEST MODE ONLY: 'instant' replaces every stage's work with a fake that publishes a "
        "small marker artifact. Refused with a real (s3://) store; logged loudly at start.",
    )
    fake_work_seconds: float = Field(0.0, ge=0, le=3600, description="How long each fake operation takes.")

    @model_validator(mode="after")
    def _check(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TAILOR_TLS_CERT and TAILOR_TLS_KEY go together: set both or neither")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("TAILOR_TLS_CA (mutual TLS) needs TAILOR_TLS_CERT and TAILOR_TLS_KEY too")
        for path in (self.tls_cert, self.tls_key, self.tls_ca):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        if self.worker_secret_file is not None and not self.worker_secret_file.is_file():
            raise ValueError(f"worker secret file {self.worker_secret_file} does not exist")
        if self.worker_secret_file is not None and not self.worker_secret_value():
            raise ValueError(f"worker secret file {self.worker_secret_file} is empty")
        if self.gateway_identities and self.tls_ca is None:
            raise ValueError(
                "TAILOR_GATEWAY_IDENTITIES needs mutual TLS: set TAILOR_TLS_CA, TAILOR_TLS_CERT and TAILOR_TLS_KEY"
            )
        if self.fake_work and self.store_url.startswith("s3://"):
            raise ValueError("TAILOR_FAKE_WORK is a test mode: it is refused with an s3:// store")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def worker_secret_value(self) -> str:
        """The shared secret: the file's content (stripped) wins over TAILOR_WORKER_SECRET."""
        if self.worker_secret_file is not None:
            return self.worker_secret_file.read_text().strip()
        return self.worker_secret.strip()

    def gateway_identity_list(self) -> list[str]:
        return [n.strip() for n in self.gateway_identities.split(",") if n.strip()]

    def store_options(self) -> dict:
        return {
            "endpoint_url": self.s3_endpoint_url,
            "access_key": self.s3_access_key,
            "secret_key": self.s3_secret_key,
            "create_bucket": self.s3_create_bucket,
        }


_FIELD_ENV = {
    "host": "TAILOR_HOST",
    "port": "TAILOR_PORT",
    "metrics_port": "TAILOR_METRICS_PORT",
    "health_port": "TAILOR_HEALTH_PORT",
    "store_url": "TAILOR_STORE_URL",
    "s3_endpoint_url": "TAILOR_S3_ENDPOINT_URL",
    "s3_access_key": "TAILOR_S3_ACCESS_KEY",
    "s3_secret_key": "TAILOR_S3_SECRET_KEY",
    "s3_create_bucket": "TAILOR_S3_CREATE_BUCKET",
    "cache_dir": "TAILOR_CACHE_DIR",
    "log_level": "TAILOR_LOG_LEVEL",
    "grace_seconds": "TAILOR_GRACE_SECONDS",
    "max_operations": "TAILOR_MAX_OPERATIONS",
    "trace_file": "TAILOR_TRACE_FILE",
    "otlp_endpoint": "TAILOR_OTLP_ENDPOINT",
    "tls_cert": "TAILOR_TLS_CERT",
    "tls_key": "TAILOR_TLS_KEY",
    "tls_ca": "TAILOR_TLS_CA",
    "worker_secret": "TAILOR_WORKER_SECRET",
    "worker_secret_file": "TAILOR_WORKER_SECRET_FILE",
    "gateway_identities": "TAILOR_GATEWAY_IDENTITIES",
    "insecure_open_worker": "TAILOR_INSECURE_OPEN_WORKER",
    "fake_work": "TAILOR_FAKE_WORK",
    "fake_work_seconds": "TAILOR_FAKE_WORK_SECONDS",
}


def load_settings(model: type[BaseModel], service: str, env_names: dict[str, str] | None = None, **defaults):
    """Build `model` from the environment; on a bad value exit with the variable's name and the rule."""
    names = {**_FIELD_ENV, **(env_names or {})}
    raw: dict = {"service": service, **defaults}
    for field, env in names.items():
        if field in model.model_fields and env in os.environ:
            raw[field] = os.environ[env]
    try:
        return model(**raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            env = names.get(field, field) if err["loc"] else "settings"
            lines.append(f"  {env}: {err['msg']}")
        raise SettingsError(f"tailor-{service}: invalid settings:\n" + "\n".join(lines)) from None
