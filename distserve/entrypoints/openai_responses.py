"""Response bodies of the OpenAI-compatible API: choices, logprobs, usage, SSE chunks, errors."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

from distserve.outputs import RequestOutput, TokenLogprobs


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def timeline(out: RequestOutput) -> dict[str, Any]:
    return out.metrics.as_dict()


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def completion_logprobs(entries: list[TokenLogprobs], token_ids: list[int], top_n: int, offset: int) -> dict[str, Any]:
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry[token_id]
        text = chosen.decoded_token or ""
        tokens.append(text)
        token_logprobs.append(chosen.logprob)
        top: dict[str, float] = {}
        for lp in sorted(entry.values(), key=lambda lp: -lp.logprob)[:top_n]:
            top.setdefault(lp.decoded_token or "", lp.logprob)  # tokens may print alike
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprobs], token_ids: list[int], top_n: int) -> dict[str, Any]:
    content = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry[token_id]
        top = sorted(entry.values(), key=lambda lp: -lp.logprob)[:top_n]
        content.append({
            "token": chosen.decoded_token or "",
            "logprob": chosen.logprob,
            "bytes": list((chosen.decoded_token or "").encode()),
            "top_logprobs": [
                {"token": lp.decoded_token or "", "logprob": lp.logprob, "bytes": list((lp.decoded_token or "").encode())}
                for lp in top
            ],
        })
    return {"content": content}
