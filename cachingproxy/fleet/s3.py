"""An S3 client that fits Twisted: botocore signs, twisted.web's Agent carries.

Credentials and region come from botocore's standard chain (environment
variables, ``~/.aws`` files, instance roles); every request is signed with
SigV4 and an ``UNSIGNED-PAYLOAD`` body hash, so bodies stream from a producer
and never have to be held (or hashed) before they are sent.  Objects over
``multipart_threshold`` go up in parts of ``part_size``; each part is read
from its source again when a try fails, so retries never buffer either.

Requests that fail before a response head arrives (connection refused,
timeouts) or that get 5xx/``SlowDown`` are retried with exponential backoff.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote
from xml.etree import ElementTree

from attrs import frozen
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseDone,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

BodySource = Callable[[int, int], IBodyProducer]
"""``source(start, end)``: a fresh producer of bytes ``[start, end)`` of an
object being uploaded (called again for every try and every part)."""

MULTIPART_THRESHOLD = 64 * 1024 * 1024
PART_SIZE = 16 * 1024 * 1024
"""S3 wants parts of at least 5 MiB (but the last)."""

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class S3Error(Exception):
    """The store answered an error (``status``, S3 ``code``) or was unreachable
    (``status`` 0)."""

    def __init__(self, status: int, code: str, message: str = "") -> None:
        super().__init__(
            f"{status} {code}: {message}" if message else f"{status} {code}"
        )
        self.status = status
        self.code = code

    @property
    def store_unusable(self) -> bool:
        """Whether this says the store (not one object) cannot be used now:
        unreachable, failing, or refusing this node (bucket, credentials)."""
        return self.status == 0 or self.status >= 500 or self.code in _UNUSABLE


_UNUSABLE = frozenset(
    {
        "NoSuchBucket",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
    }
)


class PreconditionFailed(S3Error):
    """A conditional write lost: the object exists (``If-None-Match: *``)."""


class NoSuchKey(S3Error):
    """The object does not exist."""


@frozen
class ObjectInfo:
    key: str
    size: int


class _Config:
    """What botocore's S3 signer looks at to leave the payload unsigned."""

    s3: Mapping[str, object] = {"payload_signing_enabled": False}


_DONE = Failure(ResponseDone())


class _Collect(Protocol):
    """Reads a small body (at most ``limit`` bytes) into memory."""

    def __init__(self, limit: int) -> None:
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self._parts: list[bytes] = []
        self._size = 0
        self._limit = limit

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self._size += len(data)
        if self._size > self._limit:
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:  # noqa: N802
        if self._size > self._limit:
            self.done.errback(S3Error(0, "TooLarge", f"over {self._limit} bytes"))
        elif reason.check(ResponseDone):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(reason)


class S3Client:
    """Path-style requests to ``endpoint`` (AWS when None) for one bucket."""

    def __init__(
        self,
        reactor: Any,
        bucket: str,
        endpoint: str | None = None,
        *,
        region: str | None = None,
        connect_timeout: float = 5.0,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.2,
        part_size: int = PART_SIZE,
        multipart_threshold: int = MULTIPART_THRESHOLD,
    ) -> None:
        import botocore.session

        session = botocore.session.get_session()
        self.region = region or session.get_config_variable("region") or "us-east-1"
        self._credentials = session.get_credentials()
        self.endpoint = (endpoint or f"https://s3.{self.region}.amazonaws.com").rstrip(
            "/"
        )
        self.bucket = bucket
        self._reactor = reactor
        self._clock = IReactorTime(reactor)
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 16
        self._agent = Agent(reactor, connectTimeout=connect_timeout, pool=self._pool)
        self._timeout = timeout
        self._retries = retries
        self._backoff = backoff
        self.part_size = part_size
        self.multipart_threshold = multipart_threshold

    # -- the wire -------------------------------------------------------------

    def url(self, key: str = "", query: str = "") -> str:
        path = f"/{self.bucket}" + (f"/{quote(key, safe='/~')}" if key else "")
        return self.endpoint + path + (f"?{query}" if query else "")

    def _signed(self, method: str, url: str, headers: Mapping[str, str]) -> Headers:
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(method=method, url=url, headers=dict(headers))
        request.context["client_config"] = _Config()
        if self._credentials is not None:
            credentials = self._credentials.get_frozen_credentials()
            S3SigV4Auth(credentials, "s3", self.region).add_auth(request)
        result = Headers()
        for name, value in request.headers.items():
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            result.addRawHeader(name.encode("latin-1"), text.encode("latin-1"))
        return result

    async def request(
        self,
        method: str,
        key: str = "",
        *,
        query: str = "",
        headers: Mapping[str, str] | None = None,
        body: Callable[[], IBodyProducer] | bytes | None = None,
        ok: tuple[int, ...] = (200, 204, 206),
        retries: int | None = None,
    ) -> IResponse:
        """Send one request (retrying transient failures) and fire with the
        response once its head arrived; the caller reads or drops its body.

        @raise PreconditionFailed: 412.
        @raise NoSuchKey: 404.
        @raise S3Error: any other status not in ``ok``; status 0 when the
            store could not be reached after the retries (``retries``, or the
            client's).
        """
        retries = self._retries if retries is None else retries
        url = self.url(key, query)
        attempt = 0
        while True:
            producer: IBodyProducer | None
            if isinstance(body, bytes):
                producer = _bytes_producer(body)
            elif body is not None:
                producer = body()
            else:
                producer = None
            send = dict(headers or {})
            if producer is not None and isinstance(producer.length, int):
                send["Content-Length"] = str(producer.length)
            signed = self._signed(method, url, send)
            d = self._agent.request(method.encode(), url.encode(), signed, producer)
            d.addTimeout(self._timeout, self._clock)
            try:
                response: IResponse = await d
            except Exception as e:
                error: S3Error = S3Error(0, type(e).__name__, str(e))
                if producer is not None:
                    producer.stopProducing()
            else:
                if response.code in ok:
                    return response
                error = await self._error(response)
                if response.code < 500 and error.code != "SlowDown":
                    raise error
            attempt += 1
            if attempt > retries:
                raise error
            await task.deferLater(self._clock, self._backoff * 2 ** (attempt - 1))

    async def _error(self, response: IResponse) -> S3Error:
        try:
            text = await _read(response, 64 * 1024)
        except Exception:
            text = b""
        code, message = "", ""
        try:
            root = ElementTree.fromstring(text)
            code = root.findtext("Code") or ""
            message = root.findtext("Message") or ""
        except ElementTree.ParseError:
            pass
        code = code or response.phrase.decode("latin-1", "replace")
        kind = {412: PreconditionFailed, 404: NoSuchKey}.get(response.code, S3Error)
        return kind(response.code, code, message)

    # -- objects --------------------------------------------------------------

    async def get(
        self,
        key: str,
        start: int | None = None,
        end: int | None = None,
        retries: int | None = None,
    ) -> IResponse:
        """The object (bytes ``[start, end)`` when given) as a response whose
        body the caller streams with ``deliverBody``."""
        headers = {}
        if start is not None:
            last = "" if end is None else str(end - 1)
            headers["Range"] = f"bytes={start}-{last}"
        return await self.request("GET", key, headers=headers, retries=retries)

    async def get_bytes(
        self,
        key: str,
        start: int | None = None,
        end: int | None = None,
        limit: int = 1024 * 1024,
        retries: int | None = None,
    ) -> bytes:
        """A small object (or range) read whole."""
        return await _read(await self.get(key, start, end, retries), limit)

    async def head(self, key: str) -> Headers | None:
        """The object's headers, or None when it does not exist."""
        try:
            response = await self.request("HEAD", key)
        except NoSuchKey:
            return None
        await _read(response, 64 * 1024)
        return response.headers

    async def put(
        self,
        key: str,
        body: BodySource | bytes,
        length: int | None = None,
        *,
        if_none_match: bool = False,
        metadata: Mapping[str, str] | None = None,
        content_type: str = "application/octet-stream",
        retries: int | None = None,
    ) -> str:
        """Store an object in one PUT, or in a multipart upload over
        ``multipart_threshold``; fires with its ETag.

        ``body`` is bytes or a :data:`BodySource` of ``length`` bytes.  With
        ``if_none_match`` the write only happens when no object has ``key``.

        @raise PreconditionFailed: ``if_none_match`` and the object exists.
        """
        headers = {"Content-Type": content_type}
        for name, value in (metadata or {}).items():
            headers[f"x-amz-meta-{name}"] = value
        if if_none_match:
            headers["If-None-Match"] = "*"
        if isinstance(body, bytes):
            response = await self.request(
                "PUT", key, headers=headers, body=body, retries=retries
            )
            await _read(response, 64 * 1024)
            return (response.headers.getRawHeaders(b"etag") or [b""])[0].decode()
        assert length is not None
        if length <= self.multipart_threshold:
            source = body
            response = await self.request(
                "PUT", key, headers=headers, body=lambda: source(0, length)
            )
            await _read(response, 64 * 1024)
            return (response.headers.getRawHeaders(b"etag") or [b""])[0].decode()
        return await self._multipart(key, body, length, headers)

    async def _multipart(
        self, key: str, source: BodySource, length: int, headers: dict[str, str]
    ) -> str:
        condition = headers.pop("If-None-Match", None)
        if condition is not None and await self.head(key) is not None:
            raise PreconditionFailed(412, "PreconditionFailed", f"{key} exists")
        response = await self.request("POST", key, query="uploads", headers=headers)
        root = ElementTree.fromstring(await _read(response, 64 * 1024))
        upload_id = root.findtext(f"{_NS}UploadId") or root.findtext("UploadId") or ""
        query = f"uploadId={quote(upload_id, safe='-_.~')}"
        try:
            etags: list[str] = []
            for number, start in enumerate(range(0, length, self.part_size), 1):
                end = min(length, start + self.part_size)
                part = await self.request(
                    "PUT",
                    key,
                    query=f"partNumber={number}&{query}",
                    body=lambda s=start, e=end: source(s, e),  # type: ignore[misc]
                )
                await _read(part, 64 * 1024)
                etags.append((part.headers.getRawHeaders(b"etag") or [b""])[0].decode())
            parts = "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>{_xml(e)}</ETag></Part>"
                for n, e in enumerate(etags, 1)
            )
            document = (
                "<CompleteMultipartUpload>" + parts + "</CompleteMultipartUpload>"
            ).encode()
            complete = {"Content-Type": "application/xml"}
            if condition is not None:
                complete["If-None-Match"] = condition
            response = await self.request(
                "POST", key, query=query, headers=complete, body=document
            )
            text = await _read(response, 64 * 1024)
            if b"<Error>" in text:  # S3 may report a failure inside a 200
                root = ElementTree.fromstring(text)
                code = root.findtext("Code") or "InternalError"
                kind = PreconditionFailed if code == "PreconditionFailed" else S3Error
                raise kind(200, code, root.findtext("Message") or "")
            return (ElementTree.fromstring(text).findtext(f"{_NS}ETag")) or ""
        except BaseException:
            with contextlib.suppress(S3Error):
                await self.request("DELETE", key, query=query)
            raise

    async def delete(self, key: str) -> None:
        """Delete an object (no error when it does not exist)."""
        try:
            response = await self.request("DELETE", key)
        except NoSuchKey:
            return
        await _read(response, 64 * 1024)

    async def list(
        self,
        prefix: str,
        start_after: str | None = None,
        limit: int | None = None,
        retries: int | None = None,
    ) -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix``, in key order."""
        found: list[ObjectInfo] = []
        token: str | None = None
        while True:
            params = [("list-type", "2"), ("prefix", prefix)]
            if start_after and token is None:
                params.append(("start-after", start_after))
            if token is not None:
                params.append(("continuation-token", token))
            query = "&".join(f"{k}={quote(v, safe='-_.~')}" for k, v in sorted(params))
            response = await self.request("GET", query=query, retries=retries)
            root = ElementTree.fromstring(await _read(response, 16 * 1024 * 1024))
            for item in root.iter(f"{_NS}Contents"):
                found.append(
                    ObjectInfo(
                        item.findtext(f"{_NS}Key") or "",
                        int(item.findtext(f"{_NS}Size") or 0),
                    )
                )
            token = root.findtext(f"{_NS}NextContinuationToken")
            truncated = root.findtext(f"{_NS}IsTruncated") == "true"
            if not truncated or not token or (limit and len(found) >= limit):
                return found

    async def create_bucket(self) -> None:
        """Create the bucket (no error when this account already has it)."""
        try:
            response = await self.request("PUT")
        except S3Error as e:
            if e.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            raise
        await _read(response, 64 * 1024)

    async def close(self) -> None:
        await self._pool.closeCachedConnections()


def _bytes_producer(data: bytes) -> IBodyProducer:
    """A producer of ``data`` (small request bodies)."""
    from io import BytesIO

    return FileBodyProducer(BytesIO(data))


async def _read(response: IResponse, limit: int) -> bytes:
    """A small body, whole (S3Error past ``limit``)."""
    collect = _Collect(limit)
    response.deliverBody(collect)
    return await collect.done


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


__all__ = [
    "MULTIPART_THRESHOLD",
    "PART_SIZE",
    "BodySource",
    "NoSuchKey",
    "ObjectInfo",
    "PreconditionFailed",
    "S3Client",
    "S3Error",
]
