"""Object storage for inputs and results: one small interface, two backends.

``open_storage(settings)`` picks the backend from ``HAM_STORAGE_URL``:

- ``file:///abs/path`` — files on local disk. Download URLs point at the API
  (``{public_url}/v1/files/{key}?expires=<unix>&sig=<hex>``), signed with HMAC-SHA256 so the
  API can serve them without a database lookup; a tampered or expired URL fails ``verify``.
- ``s3://bucket[/prefix]?endpoint=URL&region=R[&create_bucket=false][&public_endpoint=URL]`` —
  any S3-compatible store through boto3, with presigned GET URLs. ``public_endpoint`` is the
  address clients download from when it differs from the one the service uses (compose:
  the service talks to ``http://s3:8333``, a browser on the host to ``http://localhost:8333``);
  the URL is signed for that host, so it cannot be rewritten afterwards. Credentials come from the usual
  ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` variables (or an instance role).

Keys look like ``inputs/{job_id}/content.png`` and ``results/{job_id}.png``. Only
``[A-Za-z0-9._-]`` segments separated by ``/`` are accepted, so a key can never name a
path outside the storage root.

This module is torch-free; the API and the worker both import it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, quote, unquote, urlsplit

if TYPE_CHECKING:
    from ham_core.config import Settings

log = logging.getLogger(__name__)

_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_MAX_KEY_LENGTH = 512
# Presigned S3 URLs (SigV4) cannot live longer than seven days.
_S3_MAX_URL_TTL = 7 * 24 * 3600


class StorageError(RuntimeError):
    """The storage backend is unreachable or refused an operation (not a missing key)."""


@dataclass(frozen=True)
class StoredObject:
    """One listed object: its key, its size in bytes, and when it was last written (Unix time)."""

    key: str
    size: int
    modified: float


class Storage(Protocol):
    """What the API and the worker need from object storage."""

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store ``data`` under ``key``, replacing any previous object."""

    def get(self, key: str) -> bytes:
        """The object's bytes; ``KeyError(key)`` if it does not exist."""

    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""

    def url(self, key: str, ttl: int) -> str:
        """A download URL for ``key`` that stops working after ``ttl`` seconds."""

    def ping(self) -> None:
        """Raise ``StorageError`` unless the backend is reachable and usable."""

    def delete_expired(self, older_than_seconds: int, prefixes: tuple[str, ...] | None = None) -> int:
        """Delete objects last written more than ``older_than_seconds`` ago (only under
        ``prefixes``, top-level folder names such as ``"inputs"``, when given); returns how many."""

    def list_objects(self, prefix: str) -> list[StoredObject]:
        """Every object under the folder ``prefix`` (e.g. ``"features"``), with its size and age."""


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ``ValueError``."""
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY_LENGTH:
        raise ValueError(f"storage key must be 1..{_MAX_KEY_LENGTH} characters, got {key!r}")
    for segment in key.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
            raise ValueError(f"storage key {key!r} must be '/'-separated segments of [A-Za-z0-9._-], no '.' or '..'")
    return key


def _check_ttl(ttl: int) -> int:
    if not isinstance(ttl, int) or ttl <= 0:
        raise ValueError(f"url ttl must be a positive number of seconds, got {ttl!r}")
    return ttl


# --- file backend ----------------------------------------------------------------------------


class FileStorage:
    """Objects as files under ``root``; download URLs served and verified by the API."""

    def __init__(self, root: Path, public_url: str, signing_key: bytes) -> None:
        if not signing_key:
            raise ValueError("signing_key must not be empty")
        self.root = Path(root).resolve()
        self.public_url = public_url.rstrip("/")
        self._signing_key = signing_key
        # Unusable right now (an unmounted volume, say): every call reports it as a StorageError and
        # ping() fails readiness, so a process started during a storage outage waits it out.
        with contextlib.suppress(OSError):
            self.root.mkdir(parents=True, exist_ok=True)
        # What "now" is for URL expiry (tests set another clock instead of sleeping).
        self.clock: Callable[[], float] = time.time

    def path_for(self, key: str) -> Path:
        """The file that holds ``key``; ``ValueError`` for a key that would leave the root."""
        path = (self.root / check_key(key)).resolve()
        # check_key already forbids '..'; resolving also defeats a symlink planted inside the root.
        if not path.is_relative_to(self.root):
            raise ValueError(f"storage key {key!r} resolves outside the storage root")
        return path

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write atomically (temp file + rename) so a reader never sees half an object."""
        path = self.path_for(key)
        try:
            fd, tmp = self._temp_file_beside(path)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StorageError(f"cannot write {key!r} under {self.root}: {exc}") from exc

    @staticmethod
    def _temp_file_beside(path: Path) -> tuple[int, str]:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        except FileNotFoundError:
            # A concurrent sweep removed the directory while it was still empty: once more.
            path.parent.mkdir(parents=True, exist_ok=True)
            return tempfile.mkstemp(dir=path.parent, prefix=".tmp-")

    def get(self, key: str) -> bytes:
        """The file's bytes; ``KeyError(key)`` if it does not exist."""
        path = self.path_for(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            if not self.root.is_dir():  # the whole store is gone (unmounted?): an outage, not a missing key
                raise StorageError(f"cannot read {key!r}: storage root {self.root} is not a directory") from None
            raise KeyError(key) from None
        except OSError as exc:
            raise StorageError(f"cannot read {key!r} under {self.root}: {exc}") from exc

    def delete(self, key: str) -> None:
        """Remove the file and any directories it leaves empty."""
        path = self.path_for(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {key!r} under {self.root}: {exc}") from exc
        self._prune_empty_dirs(path.parent)

    def url(self, key: str, ttl: int) -> str:
        """``{public_url}/v1/files/{key}?expires=<unix>&sig=<hex>``, valid for ``ttl`` seconds."""
        check_key(key)
        expires = int(self.clock()) + _check_ttl(ttl)
        return f"{self.public_url}/v1/files/{quote(key)}?expires={expires}&sig={self._signature(key, expires)}"

    def verify(self, key: str, expires: str, sig: str, now: float | None = None) -> bool:
        """True only for an unexpired URL whose signature matches (compared in constant time)."""
        try:
            check_key(key)
            expires_at = int(expires)
        except (TypeError, ValueError):
            return False
        if expires_at < (self.clock() if now is None else now):
            return False
        return hmac.compare_digest(self._signature(key, expires_at), str(sig))

    def ping(self) -> None:
        """Raise ``StorageError`` unless the root is a writable directory."""
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"storage root {self.root} is not a writable directory")

    def list_objects(self, prefix: str) -> list[StoredObject]:
        """Every file under the folder ``prefix``."""
        top = self.path_for(prefix.strip("/"))
        out = []
        for path in top.rglob("*") if top.is_dir() else ():
            try:
                if path.is_file() and not path.is_symlink() and not path.name.startswith(".tmp-"):
                    info = path.stat()
                    out.append(StoredObject(path.relative_to(self.root).as_posix(), info.st_size, info.st_mtime))
            except OSError:  # deleted meanwhile
                continue
        return out

    def delete_expired(self, older_than_seconds: int, prefixes: tuple[str, ...] | None = None) -> int:
        """Delete files not modified for ``older_than_seconds`` (under ``prefixes`` when given)."""
        cutoff = time.time() - older_than_seconds
        deleted = 0
        tops = [self.path_for(p.strip("/")) for p in prefixes] if prefixes is not None else [self.root]
        paths = [path for top in tops if top.is_dir() for path in top.rglob("*")]
        for path in sorted(paths, reverse=True):  # children before their directory
            try:
                if path.is_file() and not path.is_symlink() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    deleted += 1
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
            except OSError as exc:  # a concurrent delete or put; the next sweep retries
                log.debug("sweep skipped %s: %s", path, exc)
        return deleted

    def _signature(self, key: str, expires: int) -> str:
        message = f"{key}\n{expires}".encode()
        return hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()

    def _prune_empty_dirs(self, directory: Path) -> None:
        while directory != self.root and directory.is_relative_to(self.root):
            try:
                directory.rmdir()
            except OSError:  # not empty (or already gone): stop climbing
                return
            directory = directory.parent


# --- S3 backend -------------------------------------------------------------------------------


class S3Storage:
    """Objects in an S3 bucket (AWS, MinIO, SeaweedFS, ...); presigned GET URLs for downloads."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        create_bucket: bool = True,
        public_endpoint: str | None = None,
    ) -> None:
        import boto3  # imported here: boto3 takes a while to load and the file backend never needs it
        from botocore.config import Config

        if not bucket:
            raise ValueError("S3 bucket name must not be empty")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.create_bucket = create_bucket
        self._bucket_ready = False
        config = Config(
            # Custom endpoints (SeaweedFS, MinIO) rarely have wildcard DNS for virtual-hosted buckets.
            s3={"addressing_style": "path" if endpoint else "auto"},
            signature_version="s3v4",
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 3, "mode": "standard"},
        )
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=config,
        )
        # Presigning is local computation; a second client signs for the clients' address.
        self._signer: Any = (
            boto3.client(
                "s3",
                endpoint_url=public_endpoint,
                region_name=region,
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                config=config,
            )
            if public_endpoint
            else self._client
        )
        self._errors = self._client_errors()

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Upload ``data`` as one object (creating the bucket first if allowed)."""
        self._ensure_bucket()
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data, ContentType=content_type)
        except self._errors as exc:
            raise StorageError(f"S3 put {self.bucket}/{self._object(key)} failed: {exc}") from exc

    def get(self, key: str) -> bytes:
        """The object's bytes; ``KeyError(key)`` if it does not exist."""
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._object(key))
            return response["Body"].read()
        except self._errors as exc:
            if _error_code(exc) in ("NoSuchKey", "404", "NotFound"):  # a missing bucket is a StorageError
                raise KeyError(key) from None
            raise StorageError(f"S3 get {self.bucket}/{self._object(key)} failed: {exc}") from exc

    def delete(self, key: str) -> None:
        """Delete the object (S3 answers success for a missing key too)."""
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._object(key))
        except self._errors as exc:
            if _is_not_found(exc):
                return
            raise StorageError(f"S3 delete {self.bucket}/{self._object(key)} failed: {exc}") from exc

    def url(self, key: str, ttl: int) -> str:
        """A presigned GET URL valid for ``ttl`` seconds (at most seven days, the SigV4 limit)."""
        _check_ttl(ttl)
        if ttl > _S3_MAX_URL_TTL:
            raise ValueError(f"S3 presigned URLs live at most {_S3_MAX_URL_TTL} seconds, got ttl={ttl}")
        return self._signer.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._object(key)}, ExpiresIn=ttl
        )

    def ping(self) -> None:
        """Raise ``StorageError`` unless the bucket exists (or was just created) and answers."""
        self._ensure_bucket()
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except self._errors as exc:
            raise StorageError(f"S3 bucket {self.bucket!r} is not reachable: {exc}") from exc

    def list_objects(self, prefix: str) -> list[StoredObject]:
        """Every object under the folder ``prefix``."""
        folder = check_key(prefix.strip("/")) + "/"
        base = self.prefix + "/" if self.prefix else ""
        try:
            return [
                StoredObject(o["Key"][len(base) :], int(o["Size"]), o["LastModified"].timestamp())
                for page in self._client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=base + folder
                )
                for o in page.get("Contents", [])
            ]
        except self._errors as exc:
            if _error_code(exc) == "NoSuchBucket":
                return []
            raise StorageError(f"S3 listing of {self.bucket}/{base + folder} failed: {exc}") from exc

    def delete_expired(self, older_than_seconds: int, prefixes: tuple[str, ...] | None = None) -> int:
        """Delete objects under the prefix older than the cutoff (a sweep; bucket lifecycle rules also work)."""
        cutoff = time.time() - older_than_seconds
        base = self.prefix + "/" if self.prefix else ""
        listings = [base + check_key(p.strip("/")) + "/" for p in prefixes] if prefixes is not None else [base]
        deleted = 0
        try:
            for listing in listings:
                pages = self._client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, **({"Prefix": listing} if listing else {})
                )
                for page in pages:
                    stale = [o["Key"] for o in page.get("Contents", []) if o["LastModified"].timestamp() < cutoff]
                    # Single-object deletes: DeleteObjects needs Content-MD5 handling some S3 clones get wrong.
                    for key in stale:
                        self._client.delete_object(Bucket=self.bucket, Key=key)
                        deleted += 1
        except self._errors as exc:
            raise StorageError(f"S3 sweep of {self.bucket!r} failed after {deleted} deletions: {exc}") from exc
        return deleted

    def _object(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except self._errors as exc:
            if not (_is_not_found(exc) and self.create_bucket):
                raise StorageError(f"S3 bucket {self.bucket!r} is not usable: {exc}") from exc
            try:
                self._client.create_bucket(Bucket=self.bucket)
            except self._errors as create_exc:
                # Another process may have created it between our HEAD and CREATE.
                if _error_code(create_exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise StorageError(f"cannot create S3 bucket {self.bucket!r}: {create_exc}") from create_exc
            log.info("created S3 bucket %s", self.bucket)
        self._bucket_ready = True

    @staticmethod
    def _client_errors() -> tuple[type[Exception], ...]:
        from botocore.exceptions import BotoCoreError, ClientError

        return (ClientError, BotoCoreError)


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _is_not_found(exc: Exception) -> bool:
    return _error_code(exc) in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


# --- choosing a backend -------------------------------------------------------------------------

# One random key per process when HAM_URL_SIGNING_KEY is unset: every FileStorage opened in this
# process must agree, or the API would refuse URLs it signed itself.
_PROCESS_SIGNING_KEY = secrets.token_bytes(32)


def open_storage(settings: Settings) -> Storage:
    """The backend named by ``settings.storage_url``; ``ValueError`` for a URL it cannot use."""
    url = settings.storage_url
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"HAM_STORAGE_URL file:// URLs need an absolute path (file:///path), got {url!r}")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(f"HAM_STORAGE_URL file:// path must be absolute, got {url!r}")
        key = settings.url_signing_key.encode() if settings.url_signing_key else _PROCESS_SIGNING_KEY
        return FileStorage(Path(path), settings.public_url, key)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"HAM_STORAGE_URL s3:// URLs need a bucket (s3://bucket?endpoint=...), got {url!r}")
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        known = {"endpoint", "region", "create_bucket", "public_endpoint"}
        unknown = set(query) - known
        if unknown:
            raise ValueError(
                f"HAM_STORAGE_URL has unknown s3 options {sorted(unknown)}; known: {', '.join(sorted(known))}"
            )
        create = query.get("create_bucket", "true").lower()
        if create not in ("true", "false", "1", "0"):
            raise ValueError(f"HAM_STORAGE_URL create_bucket must be true or false, got {create!r}")
        return S3Storage(
            parts.netloc,
            prefix=unquote(parts.path),
            endpoint=query.get("endpoint"),
            region=query.get("region"),
            create_bucket=create in ("true", "1"),
            public_endpoint=query.get("public_endpoint"),
        )
    raise ValueError(f"HAM_STORAGE_URL must start with file:// or s3://, got {url!r}")
