"""S3 access for publishing models: a boto3 client built from the environment or an AWS profile.

Nothing here reads the repository: the endpoint, region and credentials come from the process
environment (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``) or the user's AWS config files,
exactly as for the AWS CLI. Errors are translated into :class:`S3Error` subclasses whose messages say
what failed and which setting to check.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Iterator, Mapping

from pydantic import BaseModel, ConfigDict, Field

from infra.packages import require_package

log = logging.getLogger(__name__)

# The standard AWS variables first would let a global AWS_ENDPOINT_URL win over ours; ours is the
# most specific, then the S3-only one, then the catch-all.
ENDPOINT_VARS = ("DRIVEVLA_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
BUCKET_VAR = "DRIVEVLA_MODEL_BUCKET"
# boto3 >= 1.36 sends CRC checksums by default, which S3-compatible servers (MinIO, moto, Ceph)
# often reject or do not return. "when_required" restores the older behaviour.
CHECKSUM_VARS = {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                 "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}

_DENIED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
           "InvalidToken", "InvalidClientTokenId", "UnrecognizedClientException", "403", "Forbidden"}


class S3Error(RuntimeError):
    """An S3 operation failed; the message names the endpoint, the bucket and what to check."""


class S3NotConfigured(S3Error):
    """No bucket or no credentials were given."""


class S3Unreachable(S3Error):
    """The endpoint did not answer (wrong URL, server down, network)."""


class S3AccessDenied(S3Error):
    """The server rejected the credentials or the request."""


class S3Settings(BaseModel):
    """Where and how to reach S3. ``from_env`` fills it the way the AWS CLI would."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = Field(None, description="None: AWS itself")
    region: str | None = None
    profile: str | None = None
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)
    # Few attempts: a wrong endpoint should fail in seconds, not after botocore's long backoff.
    max_attempts: int = Field(2, ge=1)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "S3Settings":
        env = os.environ if env is None else env
        endpoint = next((env[v] for v in ENDPOINT_VARS if env.get(v)), None)
        values: dict[str, Any] = {"endpoint_url": endpoint,
                                  "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
                                  "profile": env.get("AWS_PROFILE") or None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def where(self) -> str:
        return self.endpoint_url or "AWS S3"


def bucket_from_env(bucket: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The model bucket: the argument, else ``$DRIVEVLA_MODEL_BUCKET``; a clear error if neither."""
    env = os.environ if env is None else env
    bucket = bucket or env.get(BUCKET_VAR)
    if not bucket:
        raise S3NotConfigured(f"no model bucket given: pass --bucket or set {BUCKET_VAR}")
    if bucket.startswith("s3://"):
        bucket = bucket[5:].strip("/")
    return bucket


def boto_exceptions() -> ModuleType:
    """``botocore.exceptions``, or :class:`infra.packages.MissingPackage` naming the ``s3`` extra."""
    return require_package("botocore.exceptions", "s3", "talking to S3")


def make_client(settings: S3Settings | None = None):
    """A boto3 S3 client for ``settings`` (default: from the environment)."""
    boto3 = require_package("boto3", "s3", "publishing models to S3")
    Config = require_package("botocore.config", "s3", "publishing models to S3").Config
    ProfileNotFound = boto_exceptions().ProfileNotFound

    settings = settings or S3Settings.from_env()
    try:
        session = boto3.session.Session(profile_name=settings.profile, region_name=settings.region)
    except ProfileNotFound as exc:
        raise S3NotConfigured(f"AWS profile {settings.profile!r} not found ({exc}); check AWS_PROFILE") from None
    if session.get_credentials() is None:
        raise S3NotConfigured("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                              "or AWS_PROFILE naming a profile in ~/.aws/credentials")
    kwargs: dict[str, Any] = {}
    if settings.endpoint_url:
        kwargs = dict(request_checksum_calculation="when_required",
                      response_checksum_validation="when_required",
                      s3={"addressing_style": "path"})
    config = Config(connect_timeout=settings.connect_timeout_s, read_timeout=settings.read_timeout_s,
                    retries={"max_attempts": settings.max_attempts, "mode": "standard"}, **kwargs)
    return session.client("s3", endpoint_url=settings.endpoint_url,
                          region_name=settings.region or "us-east-1", config=config)


def translate(exc: BaseException, where: str, bucket: str | None = None, action: str = "access") -> S3Error:
    """Turn a botocore exception into an :class:`S3Error` whose message says what to check."""
    errors = boto_exceptions()
    ClientError, BotoConnectionError = errors.ClientError, errors.ConnectionError
    NoCredentialsError, PartialCredentialsError = errors.NoCredentialsError, errors.PartialCredentialsError

    target = f"s3://{bucket}" if bucket else "S3"
    if isinstance(exc, S3Error):
        return exc
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return S3NotConfigured(f"cannot {action} {target} at {where}: {exc}; set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    if isinstance(exc, BotoConnectionError):
        return S3Unreachable(f"cannot {action} {target}: the S3 endpoint {where} is unreachable ({exc}); "
                             "check AWS_ENDPOINT_URL_S3 and that the server is up")
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _DENIED or status == 403:
            return S3AccessDenied(f"cannot {action} {target} at {where}: the server rejected the credentials "
                                  f"or the request ({code or status}: {err.get('Message', '')}); check "
                                  "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket policy")
        if code in {"NoSuchBucket", "404", "NotFound"} and action == "access":
            return S3Error(f"bucket {bucket!r} does not exist at {where}: create it or set {BUCKET_VAR}")
        return S3Error(f"cannot {action} {target} at {where}: {code or status} {err.get('Message', '')}".rstrip())
    return S3Error(f"cannot {action} {target} at {where}: {type(exc).__name__}: {exc}")


@contextmanager
def s3_errors(where: str, bucket: str | None = None, action: str = "access") -> Iterator[None]:
    """Re-raise botocore failures inside the block as :class:`S3Error` with a useful message."""
    errors = boto_exceptions()
    try:
        yield
    except (errors.BotoCoreError, errors.ClientError) as exc:
        raise translate(exc, where, bucket, action) from exc


def check_bucket(client, bucket: str, where: str | None = None) -> None:
    """Fail fast, with a clear message, when the endpoint, the credentials or the bucket is wrong."""
    where = where or client.meta.endpoint_url
    with s3_errors(where, bucket, "access"):
        client.head_bucket(Bucket=bucket)
        # head_bucket can pass on buckets that allow anonymous HEAD; a listing needs real credentials.
        client.list_objects_v2(Bucket=bucket, MaxKeys=1)


def checksum_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` with the boto3 checksum settings for non-AWS endpoints added (for DVC subprocesses)."""
    out = dict(os.environ if env is None else env)
    for key, value in CHECKSUM_VARS.items():
        out.setdefault(key, value)
    return out
