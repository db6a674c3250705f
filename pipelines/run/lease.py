"""One job per output folder: a lease file `out/_lock` (job id, host, pid, start and heartbeat times).

Taken with an exclusive create (local: `O_CREAT | O_EXCL`; S3: a conditional PUT, `If-None-Match: *`), kept alive by a
heartbeat thread (local: an atomic replace; S3: a PUT conditional on the lease's own ETag, so a job whose lease was
taken over notices), released at the end. A second job is refused while the heartbeat is fresh; a lease whose
heartbeat is older than `timeout` (the job died without releasing it), or whose process is gone from this host, is
stale and taken over (conditionally, so two jobs taking it over at once cannot both win).

Other object stores (GCS, Azure, ...) get the same protocol without the conditional writes: a check, then a write
(two jobs started within the same second can both get in). See README, "One output folder = one corpus".
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import uuid
from typing import Any

import fsspec
from fsspec.asyn import sync

from pipelines.io import _is_local

LOCK = "_lock"


class LeaseHeld(ValueError):
    """Another live job holds the output folder (a setup error: one `error:` line)."""


class Lease:
    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, timeout: float = 120.0, every: float = 10.0) -> None:
        self.fs, self.root, self.timeout, self.every = fs, root, timeout, every
        self.path = posixpath.join(root, LOCK)
        self.job_id = uuid.uuid4().hex[:12]
        self.started = time.time()
        self.lost: str | None = None  # why the lease is no longer ours (another job took it over)
        self.took_over: dict[str, Any] | None = None  # the stale lease this job replaced
        self._local = _is_local(fs)
        self._s3 = hasattr(fs, "call_s3")
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the record -------------------------------------------------------------------------------------------------

    def _record(self) -> bytes:
        rec = {
            "job_id": self.job_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "heartbeat": time.time(),
            "timeout": self.timeout,
        }
        return json.dumps(rec).encode()

    def describe(self, rec: dict[str, Any]) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(rec.get("started", 0)))
        age = time.time() - float(rec.get("heartbeat", 0))
        return f"job {rec.get('job_id')} on host {rec.get('host')} (pid {rec.get('pid')}) since {since}, last heartbeat {age:.0f} s ago"

    def _stale(self, rec: dict[str, Any]) -> bool:
        if time.time() - float(rec.get("heartbeat", 0)) > self.timeout:
            return True
        if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int):
            try:  # a job on this host whose process is gone (SIGKILL, OOM kill) needs no timeout
                os.kill(rec["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return False

    # -- acquire / heartbeat / release --------------------------------------------------------------------------------

    def acquire(self) -> Lease:
        """Take the lease or raise LeaseHeld; then heartbeat every `every` s until `release()`."""
        self.fs.makedirs(self.root, exist_ok=True)
        for _ in range(5):
            if self._create():
                break
            cur = self._read()
            if cur is None:  # released between our create and our read
                continue
            rec, token = cur
            if rec.get("job_id") == self.job_id:
                break
            if not self._stale(rec):
                raise LeaseHeld(
                    f"output in use by {self.describe(rec)}; wait for it, or use another --output "
                    f"(a lease without heartbeat expires after {rec.get('timeout', self.timeout):.0f} s)"
                )
            if self._replace(token):
                self.took_over = rec
                break
        else:
            raise LeaseHeld(f"could not take the lease {self.path}: other jobs keep taking it")
        self.started = time.time()
        self._thread = threading.Thread(target=self._beat, name="capfilt-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.heartbeat()
            except Exception:  # noqa: BLE001 - a store hiccup; the next beat retries, the timeout is generous
                pass

    def heartbeat(self) -> None:
        cur = self._read()
        if cur is None or cur[0].get("job_id") != self.job_id:
            holder = self.describe(cur[0]) if cur else "nobody"
            self.lost = f"the output's lease was taken over (now held by {holder})"
            self._stop.set()
            return
        if self._local:  # ours (just read): rewrite it in place, atomically; it never disappears meanwhile
            tmp = f"{self.path}.{self.job_id}.beat.tmp"
            with open(tmp, "wb") as f:
                f.write(self._record())
            os.replace(tmp, self.path)
        elif not self._replace(cur[1]):
            self.lost = "the output's lease was taken over while renewing it"
            self._stop.set()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            cur = self._read()
            if cur is not None and cur[0].get("job_id") == self.job_id:
                self.fs.rm(self.path)
        except Exception:  # noqa: BLE001 - best effort; a lease left behind goes stale
            pass

    # -- the store ------------------------------------------------------------------------------------------------

    def _read(self) -> tuple[dict[str, Any], Any] | None:
        """(record, token for a conditional replace) or None when there is no lease."""
        try:
            if self._s3:
                bucket, key = self._bucket_key()
                r = self.fs.call_s3("get_object", Bucket=bucket, Key=key)
                body = sync(self.fs.loop, r["Body"].read)  # the body is an async stream: read it on s3fs's loop
                return json.loads(body), r["ETag"]
            with self.fs.open(self.path, "rb") as f:
                data = f.read()
            return json.loads(data), data
        except FileNotFoundError:
            return None
        except ValueError:  # a half-written lease (a non-atomic store): treat as stale
            return {"heartbeat": 0}, None

    def _bucket_key(self) -> tuple[str, str]:
        bucket, _, key = self.path.partition("/")
        return bucket, key

    def _create(self) -> bool:
        data = self._record()
        if self._local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self._s3:
            bucket, key = self._bucket_key()
            try:
                r = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except OSError:  # 412 Precondition Failed: it exists
                return False
            self._etag = r.get("ETag")
            return True
        if self.fs.exists(self.path):
            return False
        self.fs.pipe_file(self.path, data)
        return True

    def _replace(self, token: Any) -> bool:
        """Write our record over the lease read as `token`, only if it is still that lease."""
        data = self._record()
        if self._local:  # a stale lease: move it aside, then create ours exclusively (a hard link cannot overwrite)
            aside = f"{self.path}.{self.job_id}.tmp"
            try:  # atomic: of two jobs taking it over at once, one gets FileNotFoundError
                os.rename(self.path, aside)
            except FileNotFoundError:
                return False
            with open(aside, "rb") as f:
                moved = f.read()
            if token is not None and moved != token:  # it was renewed since we read it: give it back
                _link_or_drop(aside, self.path)
                return False
            with open(aside, "wb") as f:
                f.write(data)
            return _link_or_drop(aside, self.path)
        if self._s3:
            bucket, key = self._bucket_key()
            kw = {"IfMatch": token} if token else {}
            try:
                r = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **kw)
            except OSError:  # 412: someone else wrote it meanwhile
                return False
            self._etag = r.get("ETag")
            return True
        self.fs.pipe_file(self.path, data)
        return True


def _link_or_drop(src: str, dst: str) -> bool:
    """Create `dst` as `src` unless `dst` exists (then someone else's lease is there); `src` is removed either way."""
    try:
        os.link(src, dst)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(src)
