"""The ``s3://bucket/prefix`` store, through boto3.

Credentials and endpoint come only from the standard AWS chain (environment,
shared config, instance roles; ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` for
S3-compatible servers), never from flow parameters.

Integrity: every object is written with its sha256 in the object's metadata
(``x-amz-meta-sha256``) and checked on read. ETags are not content hashes for
multipart uploads, so they are used only as version tokens for conditional
writes (``If-None-Match: *`` to create, ``If-Match: <etag>`` to swap).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cluster.errors import UserError
from tasks.common import file_sha256
from tasks.store.base import AlreadyExists, Store

_MULTIPART_THRESHOLD = 16 * 1024 * 1024


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


class S3Store(Store):
    """A store under ``s3://bucket/prefix``."""

    def __init__(self, uri: str) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise UserError(f"--store {uri!r} names no bucket; use s3://<bucket>/<prefix>.")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        config = Config(retries={"mode": "standard", "max_attempts": 6}, connect_timeout=5, read_timeout=60)
        # A session of its own: the default one caches credentials from its first use, forever.
        self.client = boto3.session.Session().client("s3", endpoint_url=_endpoint(), config=config)
        self.transfer = TransferConfig(multipart_threshold=_MULTIPART_THRESHOLD,
                                       multipart_chunksize=_MULTIPART_THRESHOLD, max_concurrency=8)

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"store key {key!r} escapes the store root")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _errors(self, exc: Exception, key: str) -> Exception:
        """Translate botocore errors a user can fix into one clear sentence."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            return UserError(f"--store {self.uri!r}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY (or a profile).")
        if isinstance(exc, EndpointConnectionError):
            return UserError(f"--store {self.uri!r}: cannot reach {exc.kwargs.get('endpoint_url')}; "
                             "check AWS_ENDPOINT_URL and that the server is running.")
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "403"):
                return UserError(f"--store {self.uri!r}: the S3 server refused the credentials ({code}); "
                                 "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.")
            if code in ("NoSuchBucket",):
                return UserError(f"--store {self.uri!r}: bucket {self.bucket!r} does not exist; create it first.")
            if code in ("NoSuchKey", "404"):
                return FileNotFoundError(key)
        return exc

    def check(self) -> None:
        """Fail fast, with one sentence, when the bucket cannot be reached or the credentials are wrong."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            if _code(exc) in ("404", "NoSuchBucket"):
                raise UserError(f"--store {self.uri!r}: bucket {self.bucket!r} does not exist; create it first.") from None
            if _code(exc) != "403":
                raise self._errors(exc, "") from None
            # HEAD carries no error body: ask a call that does whether the credentials themselves are wrong
            try:
                self.client.list_buckets()
            except Exception as inner:
                raise self._errors(inner, "") from None
            raise UserError(f"--store {self.uri!r}: bucket {self.bucket!r} does not exist or these credentials "
                            "may not use it; create it or grant access.") from None

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                   Metadata={"sha256": hashlib.sha256(data).hexdigest()}, **extra)
        except Exception as exc:
            if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise AlreadyExists(key) from None
            raise self._errors(exc, key) from None

    def _get(self, key: str) -> dict:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise self._errors(exc, key) from None

    def get_bytes(self, key: str) -> bytes:
        response = self._get(key)
        data = response["Body"].read()
        _verify(key, data, response.get("Metadata", {}))
        return data

    def put_file(self, key: str, path: Path) -> None:
        digest = file_sha256(path)
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer,
                                    ExtraArgs={"Metadata": {"sha256": digest}})
        except Exception as exc:
            raise self._errors(getattr(exc, "last_exception", None) or exc, key) from None

    def get_file(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            self.client.download_file(self.bucket, self._key(key), str(tmp), Config=self.transfer)
        except Exception as exc:
            raise self._errors(exc, key) from None
        _verify(key, tmp, head.get("Metadata", {}))
        os.replace(tmp, dest)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as exc:
            if isinstance(self._errors(exc, key), FileNotFoundError):
                return False
            raise self._errors(exc, key) from None

    def list(self, prefix: str) -> list[str]:
        return [key for key, _, _ in self.listing(prefix)]

    def listing(self, prefix: str) -> list[tuple[str, int, str]]:
        """(key, size, ETag) of every object under ``prefix``: a cheap change stamp, not a content hash."""
        root = self._key(prefix).rstrip("/") + "/" if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        rows = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root):
                # keys ending in "/" are directory markers (pyarrow writes them for Ray), not objects
                rows += [(o["Key"][strip:], o["Size"], o["ETag"]) for o in page.get("Contents", [])
                         if not o["Key"].endswith("/")]
        except Exception as exc:
            raise self._errors(exc, prefix) from None
        return sorted(rows)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise self._errors(exc, key) from None

    def swap(self, key: str, data: bytes, *, expected: bytes | None) -> bool:
        if expected is None:
            try:
                self.put_bytes(key, data, if_absent=True)
                return True
            except AlreadyExists:
                return False
        try:
            current = self._get(key)
        except FileNotFoundError:
            return False
        if current["Body"].read() != expected:
            return False
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfMatch=current["ETag"],
                                   Metadata={"sha256": hashlib.sha256(data).hexdigest()})
        except Exception as exc:
            if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "NoSuchKey"):
                return False
            raise self._errors(exc, key) from None
        return True

    def ray_storage_path(self, prefix: str) -> str:
        return f"{self.bucket}/{self._key(prefix)}"

    def ray_filesystem(self):
        """A pyarrow filesystem for Ray Train's checkpoint storage, on the same endpoint."""
        import pyarrow.fs

        endpoint = _endpoint()
        options = {"endpoint_override": endpoint} if endpoint else {}
        if endpoint and endpoint.startswith("http://"):
            options["scheme"] = "http"
        region = self.client.meta.region_name
        return pyarrow.fs.S3FileSystem(region=region, **options)


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _verify(key: str, data: bytes | Path, metadata: dict) -> None:
    expected = metadata.get("sha256")
    if expected is None:
        return  # written by another tool: nothing recorded to check against
    actual = file_sha256(data) if isinstance(data, Path) else hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise OSError(f"object {key!r} is corrupt: sha256 {actual} but {expected} was recorded")
