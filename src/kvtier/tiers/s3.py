"""The S3 tier: chunks as objects in any S3-compatible store (AWS S3, MinIO, Ceph RGW, moto).

URL ``s3://bucket/prefix``; objects at ``prefix/<hex digest>`` (the digest folds in the
namespace, so engines with the same namespace and bucket share chunks). ``endpoint_url``
points boto3 at a non-AWS store.

Why no manifest as in the Redis tier: an S3 PUT — multipart included — becomes visible
atomically when it completes, so a reader never sees half an object. Big objects are written
with boto3's managed transfer (multipart above ``part_bytes``, parts in parallel) and read with
one ranged GET for the first ``part_bytes``, whose ``Content-Range`` tells the total size, then
the remaining ranges concurrently: one round trip for a normal chunk, parallel streams for a
huge one.

Batches fan out over a thread pool (``max_workers``); every request carries connect/read
timeouts and no SDK retries (the circuit breaker decides); a missing object (404) is a miss,
not a failure.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from kvtier.chunk import Chunk
from kvtier.serde import HEADER_BYTES
from kvtier.serde.codec import Buffer
from kvtier.tiers.base import TierError
from kvtier.tiers.network import NetworkTier

log = logging.getLogger(__name__)
T = TypeVar("T")
U = TypeVar("U")

MIN_PART_BYTES = 5 * 1024**2  # S3's minimum multipart part size (all but the last part)
_MISSING = ("404", "NoSuchKey", "NotFound")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``; ``TierError`` if malformed."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "s3" or not parts.netloc:
        raise TierError(f"remote.url {url!r}: expected s3://bucket[/prefix]")
    return parts.netloc, parts.path.strip("/")


def _missing(e: ClientError) -> bool:
    err = e.response.get("Error", {})
    return (
        str(err.get("Code")) in _MISSING
        or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404
    )


class S3Tier(NetworkTier):
    """Chunks as S3 objects. Thread-safe (boto3 clients are)."""

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "kvtier",
        serde_name: str = "raw",
        endpoint_url: str = "",
        region: str = "",
        timeout_s: float = 5.0,
        part_bytes: int = 16 * 1024**2,
        max_workers: int = 8,
        failure_threshold: int = 3,
        retry_backoff_s: float = 0.5,
        retry_backoff_max_s: float = 5.0,
        create_bucket: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bucket, prefix = parse_s3_url(url)
        if timeout_s <= 0 or max_workers < 1:
            raise TierError(
                f"s3 tier: need timeout_s > 0 and max_workers >= 1, got {timeout_s}, {max_workers}"
            )
        super().__init__(
            "s3",
            endpoint_url or url,
            serde_name=serde_name,
            failure_types=(BotoCoreError, ClientError, OSError),
            failure_threshold=failure_threshold,
            retry_backoff_s=retry_backoff_s,
            retry_backoff_max_s=retry_backoff_max_s,
            timeout_s=timeout_s,
            clock=clock,
        )
        self.prefix = prefix or key_prefix
        self.part_bytes = max(part_bytes, MIN_PART_BYTES)
        cfg = BotoConfig(
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            max_pool_connections=max_workers * 2,
            retries={"total_max_attempts": 1},
            region_name=region or None,
        )
        self._s3 = boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=cfg)
        self._transfer = TransferConfig(
            multipart_threshold=self.part_bytes,
            multipart_chunksize=self.part_bytes,
            max_concurrency=max_workers,
            use_threads=True,
        )
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="kvtier-s3")
        if create_bucket:
            self._guard("create_bucket", self._create_bucket, None)

    def _create_bucket(self) -> None:
        try:
            self._s3.create_bucket(Bucket=self.bucket)
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise

    def _ping(self) -> None:
        self._s3.head_bucket(Bucket=self.bucket)

    def _ok(self, key: bytes) -> str:
        return f"{self.prefix}/{key.hex()}"

    def _map(self, fn: Callable[[U], T], items: Sequence[U]) -> list[T]:
        """``fn`` over ``items`` on the pool (inline for one item); the first failure propagates."""
        if len(items) == 1:
            return [fn(items[0])]
        return list(self._pool.map(fn, items))

    # -- Tier API -------------------------------------------------------------------------------
    def _head(self, key: bytes) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=self._ok(key))
            return True
        except ClientError as e:
            if _missing(e):
                return False
            raise

    def _exists_many(self, keys: Sequence[bytes]) -> list[bool]:
        return self._map(self._head, list(keys))

    def _fetch_many(self, keys: Sequence[bytes]) -> list[tuple[Buffer, Buffer] | None]:
        return self._map(self._fetch, list(keys))

    def _range(self, key: bytes, start: int, end: int) -> dict[str, Any]:
        return self._s3.get_object(Bucket=self.bucket, Key=self._ok(key), Range=f"bytes={start}-{end - 1}")

    def _fetch(self, key: bytes) -> tuple[Buffer, Buffer] | None:
        try:
            first = self._range(key, 0, self.part_bytes)
        except ClientError as e:
            if _missing(e):
                return None
            raise
        head = first["Body"].read()
        total = int(str(first.get("ContentRange", "")).rpartition("/")[2] or len(head))
        if len(head) >= total:  # the usual case: one GET had it all
            mv = memoryview(head)
            return mv[:HEADER_BYTES], mv[HEADER_BYTES:]
        buf = bytearray(total)
        buf[: len(head)] = head
        rest = [(s, min(s + self.part_bytes, total)) for s in range(len(head), total, self.part_bytes)]

        def part(se: tuple[int, int]) -> None:
            s, e = se
            data = self._range(key, s, e)["Body"].read()
            if len(data) != e - s:
                raise OSError(f"s3 ranged read of {self._ok(key)} returned {len(data)} of {e - s} bytes")
            buf[s:e] = data

        if rest:  # a huge object: the remaining ranges in parallel (pool threads may be busy: own pool)
            with ThreadPoolExecutor(min(len(rest), 8), thread_name_prefix="kvtier-s3-range") as ex:
                list(ex.map(part, rest))
        mv = memoryview(buf)
        return mv[:HEADER_BYTES], mv[HEADER_BYTES:]

    def batched_put(self, items: Iterable[tuple[bytes, Chunk]]) -> list[bool]:
        pairs = list(items)
        if not pairs:
            return []

        blobs = [(k, _join(*self._encode(k, c))) for k, c in pairs]  # bad input raises here, before any I/O

        def upload(kb: tuple[bytes, bytearray]) -> int:
            key, blob = kb
            if len(blob) <= self.part_bytes:  # one PUT; the managed transfer only for multipart sizes
                self._s3.put_object(Bucket=self.bucket, Key=self._ok(key), Body=blob)
            else:
                self._s3.upload_fileobj(io.BytesIO(blob), self.bucket, self._ok(key), Config=self._transfer)
            return len(blob)

        sizes = self._guard("put", lambda: self._map(upload, blobs), None)
        if sizes is None:
            self._count_put(0, 0, len(pairs))
            return [False] * len(pairs)
        self._count_put(len(pairs), sum(sizes), 0)
        return [True] * len(pairs)

    def remove(self, key: bytes) -> bool:
        def run() -> bool:
            try:
                size = self._s3.head_object(Bucket=self.bucket, Key=self._ok(key))["ContentLength"]
            except ClientError as e:
                if _missing(e):
                    return False
                raise
            self._s3.delete_object(Bucket=self.bucket, Key=self._ok(key))
            self._count_remove(int(size))
            return True

        return self._guard("remove", run, False)

    def close(self) -> None:
        super().close()
        self._pool.shutdown(wait=True)
        self._s3.close()


def _join(header: bytes, payload: bytes | bytearray | memoryview) -> bytearray:
    blob = bytearray(header)
    blob += payload
    return blob
