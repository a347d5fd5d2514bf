"""`S3Tier`: the cloud tier, boto3 against any S3-compatible endpoint (AWS, MinIO, moto).

The boto3 client is thread-safe and shared by the tier's worker threads; its connection pool is
sized to the tier's concurrency so that no worker waits for a socket. Connect and read timeouts
bound every call; botocore's "standard" retry mode retries transient errors with jittered
exponential backoff. A 404 is a miss. The bucket is never created implicitly: call
`create_bucket` (an explicit, admin-side operation). Credentials come from the arguments or from
boto3's usual chain (environment, profile); they are never logged or put in an error message.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from tiers.base import Buffer, Consume, T, ThreadedTier
from tiers.errors import ConfigError, TierUnavailableError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

AddressingStyle = Literal["auto", "path", "virtual"]
_MISS_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


class S3Tier(ThreadedTier):
    """Blocks as objects `s3://bucket/prefix<key>`."""

    def __init__(
        self,
        bucket: str,
        *,
        name: str = "cloud",
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: AddressingStyle = "path",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        concurrency: int = 16,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 10.0,
        max_attempts: int = 3,
    ) -> None:
        super().__init__(name, concurrency=concurrency)
        if not bucket:
            raise ConfigError(f"tier {name!r}: bucket must not be empty")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket = bucket
        self.prefix = prefix
        config = Config(
            region_name=region,
            max_pool_connections=concurrency,
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": addressing_style},
        )
        session = boto3.session.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            aws_session_token=session_token,
            region_name=region,
        )
        self._client: S3Client = session.client("s3", endpoint_url=endpoint_url, config=config)

    def _object_key(self, key: str) -> str:
        return self.prefix + key

    def _wrap(self, exc: Exception, action: str) -> Exception:
        """Map an SDK error to ours, keeping the S3 error code but no credentials or URLs."""
        if isinstance(exc, NoCredentialsError):
            return ConfigError(f"tier {self.name!r}: no S3 credentials configured")
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "unknown")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            return TierUnavailableError(self.name, f"{action} failed: S3 {code} (HTTP {status})")
        return TierUnavailableError(self.name, f"{action} failed: {type(exc).__name__}")

    @staticmethod
    def _is_miss(exc: ClientError) -> bool:
        return exc.response.get("Error", {}).get("Code") in _MISS_CODES

    def _read(self, key: str, consume: Consume[T]) -> T | None:
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=self._object_key(key))
            body = resp["Body"]
            try:
                data = body.read()
            finally:
                body.close()
        except ClientError as exc:
            if self._is_miss(exc):
                return None
            raise self._wrap(exc, "get") from exc
        except BotoCoreError as exc:
            raise self._wrap(exc, "get") from exc
        return consume(memoryview(data))

    def _put(self, key: str, data: Buffer) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._object_key(key), Body=bytes(data))
        except (ClientError, BotoCoreError) as exc:
            raise self._wrap(exc, "put") from exc

    def _contains(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._object_key(key))
        except ClientError as exc:
            if self._is_miss(exc):
                return False
            raise self._wrap(exc, "head") from exc
        except BotoCoreError as exc:
            raise self._wrap(exc, "head") from exc
        return True

    def _delete(self, key: str) -> bool:
        existed = self._contains(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._object_key(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._wrap(exc, "delete") from exc
        return existed

    def _scan(self) -> Iterator[tuple[str, int]]:
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for obj in page.get("Contents", []):
                    yield obj["Key"][len(self.prefix) :], obj["Size"]
        except (ClientError, BotoCoreError) as exc:
            raise self._wrap(exc, "list") from exc

    def _create_bucket(self) -> bool:
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return False
        except ClientError as exc:
            if not self._is_miss(exc):
                raise self._wrap(exc, "head bucket") from exc
        except BotoCoreError as exc:  # no connection: the endpoint is down or wrong
            raise self._wrap(exc, "head bucket") from exc
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        region = self._client.meta.region_name
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._wrap(exc, "create bucket") from exc
        return True

    async def create_bucket(self) -> bool:
        """Create the bucket if it does not exist; True when it was created. Never implicit."""
        return await self._run(self._create_bucket)

    def _close(self) -> None:
        self._client.close()
