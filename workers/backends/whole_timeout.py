"""HTTP requests that end by their timeout, whole.

httpx timeouts bound each wait on the socket: a server (or a proxy) that sends its body a
few bytes at a time keeps a request open as long as it likes, and on a threads pool, where
Celery's time limits do nothing, a job with it. This transport ends a response's body once
the request's read timeout has passed since the request was sent: the SDK sees
``httpx2.ReadTimeout`` (``openai.APITimeoutError``), as for a server that went silent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx2


class WholeRequestTimeout(httpx2.BaseTransport):
    """``inner``, with each response's body cut off at the request's read timeout."""

    def __init__(self, inner: httpx2.BaseTransport) -> None:
        self._inner = inner

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        sent = time.monotonic()
        response = self._inner.handle_request(request)
        timeout = request.extensions.get("timeout", {}).get("read")
        if timeout is None:
            return response
        assert isinstance(response.stream, httpx2.SyncByteStream)
        return httpx2.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_Cut(response.stream, sent + timeout, request),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._inner.close()


class _Cut(httpx2.SyncByteStream):
    def __init__(self, inner: httpx2.SyncByteStream, deadline: float, request: httpx2.Request):
        self._inner, self._deadline, self._request = inner, deadline, request

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            if time.monotonic() > self._deadline:
                raise httpx2.ReadTimeout("the response took longer than its timeout, whole",
                                        request=self._request)  # fmt: skip
            yield chunk

    def close(self) -> None:
        self._inner.close()
