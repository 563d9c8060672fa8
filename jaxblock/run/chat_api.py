"""A client of any OpenAI-compatible chat-completions endpoint: OpenAI, vLLM, `transformers serve`,
llama.cpp's server. MT-Bench's judge (`mt_bench.py`) asks it.

Plain HTTP from the standard library (urllib), not the `openai` package: jaxblock does not depend on
that package (only the test extra brings it, through `transformers[serving]`), and the retry policy
and the one-line errors are then ours to state and test. A request that fails in a way that asking
again may mend (no connection, a timeout, HTTP 408, 409, 429 or 5xx) is retried after
backoff_s * 2^k seconds (at most max_backoff_s; the server's Retry-After if it sends one); any other
HTTP status is final at once, since the same request would get the same answer.

    client = ChatClient("http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-7B-Instruct")
    reply = client.complete([{"role": "user", "content": "Say hi."}], max_tokens=8)
    print(reply.text, reply.attempts)
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import time
import urllib.error
import urllib.request

RETRIED_STATUS = (408, 409, 429)  # and every 5xx


class ChatError(Exception):
    """A request that got no usable reply, in one line. `status`: the HTTP status (None: no
    connection or a timeout; 200: a reply that is not a chat completion)."""

    def __init__(self, message: str, status: int | None, attempts: int = 1):
        super().__init__(message)
        self.status = status
        self.attempts = attempts  # HTTP requests made for it


@dataclasses.dataclass(frozen=True)
class Reply:
    text: str  # the first choice's message content ("" when the server sent none)
    attempts: int  # HTTP requests it took (1 + retries)
    seconds: float


@dataclasses.dataclass(frozen=True)
class ChatClient:
    """Settings of one endpoint and model.

    url: the API's base URL (`https://api.openai.com/v1`, `http://127.0.0.1:8000/v1`) or the full
      `.../chat/completions` address.
    api_key: sent as `Authorization: Bearer KEY` when not empty; key_name says where it came from,
      for the message when the server refuses it.
    """

    url: str
    model: str
    api_key: str = ""
    key_name: str = "the API key"
    timeout_s: float = 120.0
    retries: int = 5
    backoff_s: float = 2.0
    max_backoff_s: float = 60.0

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--judge-url {self.url}: expected an http:// or https:// URL")
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0:
            raise ValueError(f"judge timeout {self.timeout_s} s, retries {self.retries}, backoff {self.backoff_s} s: "
                             "need a timeout > 0, retries >= 0 and backoff >= 0")  # fmt: skip

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"

    def complete(
        self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int = 2048, retries=None, sleep=time.sleep
    ) -> Reply:
        """The reply to `messages`, retried as the module says; a ChatError when there is none."""
        body = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        retries = self.retries if retries is None else retries
        start = time.perf_counter()
        for attempt in range(retries + 1):
            request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                return Reply(self._content(raw, attempt + 1), attempt + 1, time.perf_counter() - start)
            except urllib.error.HTTPError as e:
                error, wait = self._http_error(e, attempt + 1), _retry_after(e)
                if not (e.code in RETRIED_STATUS or e.code >= 500):
                    raise error from None
            except (OSError, http.client.HTTPException) as e:  # no connection, a timeout, a cut reply
                reason = getattr(e, "reason", None) or e
                error = ChatError(f"{self.endpoint}: no reply ({type(e).__name__}: {_text(reason)})", None)
                wait = None
            if attempt < retries:
                sleep(min(self.max_backoff_s, wait if wait is not None else self.backoff_s * 2**attempt))
        tries = f"{retries + 1} tr{'y' if retries == 0 else 'ies'}"
        raise ChatError(f"{error} after {tries}", error.status, retries + 1)

    def _content(self, raw: bytes, attempts: int) -> str:
        try:
            reply = json.loads(raw)
            content = reply["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            message = f"{self.endpoint}: the reply is not a chat completion ({_text(raw)})"
            raise ChatError(message, 200, attempts) from None
        return content if isinstance(content, str) else ""

    def _http_error(self, e: urllib.error.HTTPError, attempts: int) -> ChatError:
        try:
            detail = e.read()
        except OSError:
            detail = b""
        hint = ""
        if e.code in (401, 403):
            hint = f" (is {self.key_name} set and valid?)" if self.api_key else f" ({self.key_name} is not set)"
        elif e.code == 404:
            hint = f" (is {self.url} an OpenAI-compatible API, and does it serve model {self.model!r}?)"
        return ChatError(f"{self.endpoint}: HTTP {e.code} {e.reason}{hint}: {_text(detail)}", e.code, attempts)


def _retry_after(e: urllib.error.HTTPError) -> float | None:
    """The seconds of the reply's Retry-After header, when it gives a number."""
    value = e.headers.get("Retry-After") if e.headers else None
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None  # an HTTP date: our own backoff instead


def _text(value, limit: int = 160) -> str:
    """One line of at most `limit` characters of a server's message or an error."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
