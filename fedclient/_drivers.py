"""The drivers of the job loop: they perform its effects over a blocking connection
(`Drivers._drive`) or an asyncio one (`Drivers._adrive`), with the retry policy,
HTTP Range resumption of model downloads, and byte accounting; the flow itself
(`fedclient._flow`) never does I/O."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

import httpx

from fedclient._effects import Effect, FlowBase, ResumableDownload, TrainTask
from fedclient._exceptions import FedError, InvalidInput, RequestTimeout, TransportError
from fedclient.transport import is_retriable_status, retry_after, ssl_context

__all__ = ["AsyncDirect", "Direct", "Drivers"]

T = TypeVar("T")

DOWNLOAD_BLOCK = 256 * 1024


class Drivers(FlowBase):
    """Sync and async drivers of a `fedclient.Client`'s flows."""

    _sync: httpx.Client | Direct | None
    _async: httpx.AsyncClient | AsyncDirect | None

    def _drive(self, flow: Generator[Effect, Any, T]) -> T:
        """Perform ``flow``'s effects over a blocking connection until it returns. An
        effect that fails is thrown into the flow, which may act on it (leave the round)."""
        if isinstance(self.transport, httpx.AsyncBaseTransport) and not isinstance(
            self.transport, httpx.BaseTransport
        ):
            raise InvalidInput("this client has an async transport: use astep()/arun_once()")
        if self._sync is None:
            self._sync = (
                Direct(self.transport)
                if isinstance(self.transport, httpx.BaseTransport)
                else httpx.Client(verify=ssl_context(self.verify))
            )
        try:
            effect: Effect = next(flow)
            while True:
                try:
                    if isinstance(effect, TrainTask):
                        result: Any = effect.run()
                    elif isinstance(effect, ResumableDownload):
                        result = self._send(effect.request, download=effect)
                    else:
                        result = self._send(effect)
                except Exception as exc:
                    effect = flow.throw(exc)
                else:
                    effect = flow.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def _adrive(self, flow: Generator[Effect, Any, T]) -> T:
        """The async twin of `_drive`."""
        if self._async is None:
            self._async = (
                AsyncDirect(self.transport)
                if isinstance(self.transport, httpx.AsyncBaseTransport)
                else httpx.AsyncClient(verify=ssl_context(self.verify))
            )
        try:
            effect: Effect = next(flow)
            while True:
                try:
                    if isinstance(effect, TrainTask):
                        result: Any = await self.atrain(effect) if self.atrain else effect.run()
                    elif isinstance(effect, ResumableDownload):
                        result = await self._asend(effect.request, download=effect)
                    else:
                        result = await self._asend(effect)
                except Exception as exc:
                    effect = flow.throw(exc)
                else:
                    effect = flow.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def _send(
        self, request: httpx.Request, download: ResumableDownload | None = None
    ) -> httpx.Response:
        assert self._sync is not None
        attempt, waited = 1, 0.0
        while True:
            sent = self._resume_from(request, download)
            result: httpx.Response | FedError
            try:
                if download is None:
                    result = self._account(sent, self._sync.send(sent))
                else:
                    response = self._sync.send(sent, stream=True)
                    sink = _DownloadSink(self, download, sent, response)
                    try:
                        for chunk in response.iter_bytes():
                            sink.take(chunk)
                    except BaseException:
                        sink.flush()  # keep what arrived, even when the stream broke
                        raise
                    finally:
                        response.close()
                    result = sink.finish()
            except httpx.TransportError as exc:
                result = self._failed(sent, exc)
            delay = self._retry_delay(result, attempt, waited)
            if delay is None:
                if isinstance(result, FedError):
                    raise result
                return result
            attempt, waited = attempt + 1, waited + delay
            self.sleep(delay)

    async def _asend(
        self, request: httpx.Request, download: ResumableDownload | None = None
    ) -> httpx.Response:
        assert self._async is not None
        attempt, waited = 1, 0.0
        while True:
            sent = self._resume_from(request, download)
            result: httpx.Response | FedError
            try:
                if download is None:
                    result = self._account(sent, await self._async.send(sent))
                else:
                    response = await self._async.send(sent, stream=True)
                    sink = _DownloadSink(self, download, sent, response)
                    try:
                        async for chunk in response.aiter_bytes():
                            sink.take(chunk)
                    except BaseException:
                        sink.flush()  # keep what arrived, even when the stream broke
                        raise
                    finally:
                        await response.aclose()
                    result = sink.finish()
            except httpx.TransportError as exc:
                result = self._failed(sent, exc)
            delay = self._retry_delay(result, attempt, waited)
            if delay is None:
                if isinstance(result, FedError):
                    raise result
                return result
            attempt, waited = attempt + 1, waited + delay
            await self.asleep(delay)

    def _resume_from(
        self, request: httpx.Request, download: ResumableDownload | None
    ) -> httpx.Request:
        """The request to send: a download resumes after the bytes the device holds."""
        if download is None:
            return request
        etag, held = self._store.partial_download(download.job, download.version)
        if not held:
            return request
        self.stats.resumed_transfers += 1
        headers = httpx.Headers(request.headers)
        headers["Range"] = f"bytes={held}-"
        headers["If-Range"] = etag
        return httpx.Request(
            request.method, request.url, headers=headers, extensions=request.extensions
        )

    def _retry_delay(
        self, result: httpx.Response | FedError, attempt: int, waited: float
    ) -> float | None:
        """Backoff before retrying, or None to hand the result back. Shared by both drivers."""
        if isinstance(result, httpx.Response):
            if not is_retriable_status(result.status_code):
                return None
            self.stats.wasted_bytes += _wire_size(result.headers, len(result.content))
            wait = retry_after(result)
        else:
            wait = None
        delay = self.retry.delay(attempt, waited, wait)
        if delay is not None:
            self.stats.retries += 1
        return delay

    def _failed(self, request: httpx.Request, exc: httpx.TransportError) -> FedError:
        """A request that got no usable answer: count it, and map the error."""
        self.stats.requests += 1
        self.stats.wasted_bytes += _wire_size(request.headers, len(request.content))
        where = f"{request.method} {request.url.path}"
        if isinstance(exc, httpx.TimeoutException):
            return RequestTimeout(f"{where}: {exc}")
        return TransportError(f"{where}: {exc!r}")

    def _account(self, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        self.stats.requests += 1
        self.stats.bytes_up += _wire_size(request.headers, len(request.content))
        self.stats.bytes_down += _wire_size(response.headers, len(response.content))
        return response


class Direct:
    """Sends on the transport the app gave, without an `httpx.Client` around it.

    The client would add cookies, redirects and auth flows, none of which the
    protocol uses (and, given a transport, it reads no proxy settings either), at
    a third of the time of a simulated round. Without a transport, the device
    sends through an `httpx.Client`, which reads the environment's proxy settings.
    """

    def __init__(self, transport: httpx.BaseTransport) -> None:
        self.transport = transport

    def send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        response = self.transport.handle_request(request)
        response.request = request
        if not stream:
            try:
                response.read()
            finally:
                response.close()
        return response

    def close(self) -> None:
        self.transport.close()


class AsyncDirect:
    """The async twin of `Direct`."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self.transport = transport

    async def send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        response = await self.transport.handle_async_request(request)
        response.request = request
        if not stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response

    async def aclose(self) -> None:
        await self.transport.aclose()


class _DownloadSink:
    """Where a streamed model download goes: into the device state, block by block, so
    the bytes that arrived before a break are kept and the retry asks for the rest.

    A body that arrives whole within one block never touches the state: the caller
    stores the model itself, in the step's own transaction."""

    def __init__(
        self,
        client: FlowBase,
        download: ResumableDownload,
        request: httpx.Request,
        response: httpx.Response,
    ) -> None:
        self.store = client.device_state
        self.stats = client.stats
        self.download = download
        self.request = request
        self.response = response
        self.body_kept = response.status_code in (200, 206)
        self.pending = bytearray()
        self.stats.requests += 1
        self.stats.bytes_up += _wire_size(request.headers, 0)
        self.stats.bytes_down += _wire_size(response.headers, 0)
        if response.status_code == 200:  # a whole body: whatever is held is stale
            if self.store.has_download_parts(download.job):
                self.store.drop_download_parts(download.job)
            held_etag, self.offset = "", 0
        else:
            held_etag, self.offset = self.store.partial_download(download.job, download.version)
        self.etag = response.headers.get("ETag", held_etag)
        self.stored = self.offset > 0  # parts of this body are in the state

    def take(self, chunk: bytes) -> None:
        """Receive a chunk of the body."""
        self.stats.bytes_down += len(chunk)
        self.pending.extend(chunk)
        if self.body_kept and len(self.pending) >= DOWNLOAD_BLOCK:
            self.flush()

    def flush(self) -> None:
        """Store the bytes received since the last flush."""
        if self.body_kept and self.pending:
            self.store.keep_download_part(
                self.download.job,
                self.download.version,
                self.etag,
                self.offset,
                bytes(self.pending),
            )
            self.offset += len(self.pending)
            self.pending.clear()
            self.stored = True

    def finish(self) -> httpx.Response:
        """The complete response, its body assembled from every stored part."""
        if self.response.status_code == 416:
            # Asked for bytes after the end: either every byte had arrived before a crash
            # (use them), or what is held is not this body (drop it; the next try starts over).
            total = self.response.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) == self.offset:
                body = self.store.drop_download_parts(self.download.job)
                return httpx.Response(
                    200, headers={"ETag": self.etag}, content=body, request=self.request
                )
            self.store.drop_download_parts(self.download.job)
        if not self.body_kept:  # an error or a 304: hand it back as it came
            return httpx.Response(
                self.response.status_code,
                headers=self.response.headers,
                content=bytes(self.pending),
                request=self.request,
            )
        if self.stored:  # a big or resumed body: the rest joins the parts it follows
            self.flush()
            body = self.store.drop_download_parts(self.download.job)
        else:
            body = bytes(self.pending)
        return httpx.Response(
            200, headers=self.response.headers, content=body, request=self.request
        )


def _wire_size(headers: httpx.Headers, body_length: int) -> int:
    return sum(len(k) + len(v) + 4 for k, v in headers.raw) + body_length
