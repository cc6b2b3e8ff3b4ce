"""Byte I/O on a local path or an `s3://bucket/key` URI, the same calls for both, and `copy_tree`
between them.

Checkpoints and pretrained weights may live on a laptop disk or in an object store (AWS, Ceph RGW,
MinIO); the training loop should not care which. Local writes are atomic (`tasn.io`); an S3 PUT is
atomic by nature (a reader sees the old object or the new one). The S3 endpoint comes from the
`endpoint` argument (config `tracking.s3_endpoint`), else `MLFLOW_S3_ENDPOINT_URL` or
`AWS_ENDPOINT_URL` from the environment, else AWS itself; keys come from the usual boto3 chain
(environment, profile, instance role), never from config files. boto3 is imported on the first S3
call: local-only users, and `tasn.model` (which reads weights through here), never load it.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from tasn.errors import ConfigError, DataError, ServiceError
from tasn.io import atomic_write_bytes
from tasn.paths import link_problem, rel_problem

S3_PREFIX = "s3://"


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_PREFIX)


_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")  # what S3 and Ceph RGW accept (botocore's own check)


def s3_problem(uri: str) -> str | None:
    """Why `uri` (which starts with s3://) is not an s3://bucket[/key] URI, or None."""
    bucket = str(uri)[len(S3_PREFIX):].partition("/")[0]
    if not bucket:
        return f"{uri!r} names no bucket (expected s3://bucket/key)"
    if not _BUCKET.fullmatch(bucket):
        return f"{uri!r}: {bucket!r} is not a bucket name (letters, digits, '.', '-', '_')"
    return None


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b"); a ConfigError (a ValueError) for a URI without a
    usable bucket, such as a bare `s3://`."""
    problem = s3_problem(uri)
    if problem:
        raise ConfigError(problem)
    bucket, _, key = str(uri)[len(S3_PREFIX):].partition("/")
    return bucket, key


def join(base: str, name: str) -> str:
    """A child of a local directory or an S3 prefix."""
    return f"{str(base).rstrip('/')}/{name}" if is_s3(base) else str(Path(base) / name)


def resolve_endpoint(endpoint: str | None = None) -> str | None:
    return endpoint or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None, _key_id: str | None = None):
    """One client per endpoint and access key id (so a changed environment is honoured)."""
    import boto3
    from botocore.config import Config

    retries = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60)
    return boto3.client("s3", endpoint_url=endpoint, config=retries)


def _s3_call(uri: str, endpoint: str | None, fn, needs_key: bool = True):
    """Run fn(client, bucket, key); a missing object is FileNotFoundError, any other failure a
    ServiceError naming the URI and endpoint (never the credentials)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    if needs_key and not key:
        raise ConfigError(f"{uri!r} names a bucket but no object (expected s3://bucket/key)")
    endpoint = resolve_endpoint(endpoint)
    try:
        return fn(_client(endpoint, os.environ.get("AWS_ACCESS_KEY_ID")), bucket, key)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            raise FileNotFoundError(f"no object at {uri}") from exc
        raise ServiceError(f"S3 request for {uri} failed at {endpoint or 'AWS'}: {code or exc}") from exc
    except BotoCoreError as exc:
        raise ServiceError(f"S3 endpoint {endpoint or 'AWS'} unusable for {uri}: {exc}") from exc


def read_bytes(uri: str, endpoint: str | None = None) -> bytes:
    if is_s3(uri):
        return _s3_call(uri, endpoint, lambda c, b, k: c.get_object(Bucket=b, Key=k)["Body"].read())
    path = Path(uri)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {uri}")
    return path.read_bytes()


def write_bytes(uri: str, data: bytes, endpoint: str | None = None) -> str:
    if is_s3(uri):
        _s3_call(uri, endpoint, lambda c, b, k: c.put_object(Bucket=b, Key=k, Body=data))
    else:
        atomic_write_bytes(uri, data)
    return str(uri)


def exists(uri: str, endpoint: str | None = None) -> bool:
    if not is_s3(uri):
        return Path(uri).exists()
    try:
        _s3_call(uri, endpoint, lambda c, b, k: c.head_object(Bucket=b, Key=k))
    except FileNotFoundError:
        return False
    return True


def delete(uri: str, endpoint: str | None = None) -> None:
    """Remove one file or object; a missing one is not an error."""
    if is_s3(uri):
        _s3_call(uri, endpoint, lambda c, b, k: c.delete_object(Bucket=b, Key=k))
    else:
        Path(uri).unlink(missing_ok=True)


def list_prefix(uri: str, endpoint: str | None = None) -> list[str]:
    """Files directly in a local directory, or every object under an S3 prefix (as URIs), sorted.
    A directory or prefix that does not exist lists as empty."""
    if not is_s3(uri):
        path = Path(uri)
        return sorted(str(p) for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    return [obj_uri for obj_uri, _, _ in list_objects(uri, endpoint)]


def list_objects(uri: str, endpoint: str | None = None) -> list[tuple[str, int, str]]:
    """(URI, size, ETag) of every object under an S3 prefix, sorted by URI (tasn.lineage digests it)."""
    prefix = split_s3(uri)[1].rstrip("/")
    prefix = f"{prefix}/" if prefix else ""

    def _list(client, bucket, _key):
        found = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found += [(f"{S3_PREFIX}{bucket}/{o['Key']}", int(o["Size"]), str(o.get("ETag", "")).strip('"'))
                      for o in page.get("Contents", [])]
        return sorted(found)

    return _s3_call(uri, endpoint, _list, needs_key=False)


def copy_tree(src: str, dest: str) -> int:
    """Copy every file under a local directory or S3 prefix to a local directory or S3 prefix;
    returns the file count. (The multi-node launcher's data download, model upload and fetch.)

    An object key is whatever whoever wrote the bucket chose: one that is not a plain relative path
    below the prefix (`tasn.paths.rel_problem`: a `..` or empty segment, a leading `/`, a control
    character) or lands outside `dest` on disk (through a symlink already there) is a DataError
    naming it, raised before anything is written. Folder markers (keys ending in
    `/`) are not files and are skipped."""
    src = str(src).rstrip("/")
    if is_s3(src):
        files = list_prefix(src)
        rels = [f[len(src) + 1:] for f in files]
    else:
        files = sorted(str(p) for p in Path(src).rglob("*") if p.is_file())
        rels = [Path(f).relative_to(src).as_posix() for f in files]
    pairs = [(f, _contained(src, dest, rel)) for f, rel in zip(files, rels) if rel and not rel.endswith("/")]
    for f, target in pairs:
        write_bytes(target, read_bytes(f))
    return len(pairs)


def _contained(src: str, dest: str, rel: str) -> str:
    """`dest`/`rel`, when that stays inside `dest` (`tasn.paths.rel_problem`; on disk also
    `tasn.paths.link_problem`)."""
    problem = rel_problem(rel) or (None if is_s3(dest) else link_problem(dest, rel))
    if problem:
        raise DataError(f"{join(src, rel)}: key {problem}, outside the destination {dest}; nothing was copied")
    return join(dest, rel)
