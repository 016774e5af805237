"""A store in S3 (``s3://bucket/prefix``) through boto3, SigV4 always.

Endpoint and credentials come the standard AWS way (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles, AWS_REGION). Manifests are created with
``If-None-Match: *``; pointers are replaced with ``If-Match: <etag>``. Every upload carries a
SHA-256 checksum the server verifies. Large blobs go multipart, parts in parallel; a rerun
aborts the unfinished multipart uploads a crash left for the same key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from builder.errors import ConflictError, StoreError, UserInputError, VerificationError
from builder.store.base import Progress, Store, StoredObject, blob_key

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

T = TypeVar("T")

MULTIPART_THRESHOLD = 64 * 1024 * 1024
PART_SIZE = 16 * 1024 * 1024
WORKERS = 4
READ_CHUNK = 1024 * 1024


def make_client(
    endpoint_url: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str | None = None,
    max_attempts: int = 4,
) -> S3Client:
    """A boto3 S3 client with SigV4; unset arguments come from the standard AWS settings."""
    session = boto3.session.Session(
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1",
    )
    config = Config(
        signature_version="s3v4",
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=WORKERS * 2,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return session.client("s3", endpoint_url=endpoint_url, config=config)


def _b64sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Store(Store):
    """Releases in an S3 bucket under a prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        client: S3Client | None = None,
        *,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
        workers: int = WORKERS,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = client if client is not None else make_client()
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.workers = workers

    @classmethod
    def from_url(cls, url: str, client: S3Client | None = None, **kw: Any) -> S3Store:
        """Parse ``s3://bucket/prefix``."""
        rest = url.removeprefix("s3://")
        bucket, _, prefix = rest.partition("/")
        if not bucket or url == rest:
            raise UserInputError(f"bad S3 store URL {url!r}", hint="use s3://bucket/prefix")
        return cls(bucket, prefix, client, **kw)

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """Run one S3 call, turning boto errors into one-line StoreErrors."""
        try:
            return fn()
        except ClientError as exc:
            where = f"{self.url}/{key}"
            if _status(exc) == 412 or _code(exc) == "PreconditionFailed":
                raise ConflictError(
                    f"{where}: {what} precondition failed (exists or moved)"
                ) from exc
            if _code(exc) in ("BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest"):
                raise VerificationError(f"{where}: {what}: server saw a checksum mismatch") from exc
            msg = exc.response.get("Error", {}).get("Message", "")
            raise StoreError(f"{where}: {what} failed: {_code(exc)} {msg}".rstrip()) from exc
        except BotoCoreError as exc:
            raise StoreError(f"{self.url}/{key}: {what} failed: {exc}") from exc

    def get(self, key: str) -> StoredObject | None:
        def fetch() -> StoredObject | None:
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if _status(exc) == 404 or _code(exc) in ("NoSuchKey", "404"):
                    return None
                raise
            with contextlib.closing(resp["Body"]):
                return StoredObject(resp["Body"].read(), resp["ETag"])

        return self._call("GET", key, fetch)

    def _put(
        self, key: str, data: bytes, content_type: str = "application/json", **cond: str
    ) -> str:
        resp = self._call(
            "PUT",
            key,
            lambda: self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                ChecksumSHA256=_b64sha256(data),
                ContentType=content_type,
                **cond,  # type: ignore[arg-type]
            ),
        )
        return resp["ETag"]

    def create(self, key: str, data: bytes) -> str:
        return self._put(key, data, IfNoneMatch="*")

    def replace(self, key: str, data: bytes, etag: str) -> str:
        return self._put(key, data, IfMatch=etag)

    def list_keys(self, prefix: str) -> list[str]:
        def listing() -> list[str]:
            keys = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                keys += [o["Key"][len(self.prefix) :] for o in page.get("Contents", [])]
            return sorted(keys)

        return self._call("LIST", prefix, listing)

    def blob_size(self, digest: str) -> int | None:
        key = blob_key(digest)

        def head() -> int | None:
            try:
                resp = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if _status(exc) == 404 or _code(exc) in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise
            return int(resp["ContentLength"])

        return self._call("HEAD", key, head)

    def abort_dangling_uploads(self, key: str) -> int:
        full = self._key(key)

        def sweep() -> int:
            count = 0
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for upload in page.get("Uploads", []):
                    if upload.get("Key") != full:
                        continue
                    with contextlib.suppress(ClientError):
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=full, UploadId=upload["UploadId"]
                        )
                        count += 1
            return count

        return self._call("abort dangling uploads", key, sweep)

    def put_blob(self, path: Path, digest: str, size: int, progress: Progress | None) -> None:
        key = blob_key(digest)
        if size < self.multipart_threshold:
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise VerificationError(f"{path}: sha256 differs from build.json ({digest})")
            # Unconditional: same digest, same bytes; this also repairs a damaged blob.
            self._put(key, data, "application/octet-stream")
            if progress:
                progress(len(data))
            return
        self._put_multipart(path, key, digest, size, progress)

    def _put_multipart(
        self, path: Path, key: str, digest: str, size: int, progress: Progress | None
    ) -> None:
        full = self._key(key)
        upload = self._call(
            "create multipart upload",
            key,
            lambda: self.client.create_multipart_upload(
                Bucket=self.bucket,
                Key=full,
                ChecksumAlgorithm="SHA256",
                ContentType="application/octet-stream",
            ),
        )
        upload_id = upload["UploadId"]

        def send(number: int, data: bytes) -> CompletedPartTypeDef:
            checksum = _b64sha256(data)
            resp = self._call(
                f"upload part {number}",
                key,
                lambda: self.client.upload_part(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data,
                    ChecksumSHA256=checksum,
                ),
            )
            if progress:
                progress(len(data))
            return {"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": checksum}

        # One reader hashes the file in order and feeds the uploaders; at most workers + 1
        # parts are in memory. What is hashed is exactly what is sent.
        whole = hashlib.sha256()
        slots = threading.BoundedSemaphore(self.workers + 1)
        futures: list[Future[CompletedPartTypeDef]] = []
        try:
            with ThreadPoolExecutor(max_workers=self.workers) as pool, path.open("rb") as f:
                for number in itertools.count(1):
                    if any(fu.done() and fu.exception() for fu in futures):
                        break  # a part failed: stop reading, report it below
                    data = f.read(self.part_size)
                    if not data:
                        break
                    whole.update(data)
                    slots.acquire()
                    future = pool.submit(send, number, data)
                    future.add_done_callback(lambda _: slots.release())
                    futures.append(future)
            parts = [fu.result() for fu in futures]
            if whole.hexdigest() != digest:
                raise VerificationError(f"{path}: sha256 differs from build.json ({digest})")
            self._call(
                "complete multipart upload",
                key,
                lambda: self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                ),
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            raise

    def iter_blob(self, digest: str) -> Iterator[bytes]:
        key = blob_key(digest)
        resp = self._call(
            "GET", key, lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        )
        body = resp["Body"]
        with contextlib.closing(body):
            chunks = body.iter_chunks(READ_CHUNK)
            while True:
                chunk = self._call("GET", key, lambda: next(chunks, b""))
                if not chunk:
                    return
                yield chunk
