"""OpenAI-compatible request models (pydantic) and converters from engine results to response bodies."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from mcr_exit.serving.errors import InvalidRequest

TokenIds = list[StrictInt]
TextOrTokens = Union[StrictStr, list[StrictStr], TokenIds, list[TokenIds]]
Number = Union[StrictInt, StrictFloat]


_NUMBERS = {int, float, bool, type(None)}


def find_unencodable(value, path: str = "") -> str | None:
    """The dotted path of the first string (or key) that is not valid UTF-8 text, e.g. a lone surrogate
    ``"\\ud800"`` that JSON can carry but no tokenizer and no UTF-8 response can; None if all are fine."""
    stack = [(path, value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return where or "body"
        elif isinstance(v, dict):
            for k, item in v.items():
                sub = f"{where}.{k}" if where else str(k)
                if isinstance(k, str) and find_unencodable(k) is not None:
                    return where or "body"
                stack.append((sub, item))
        elif isinstance(v, list) and not set(map(type, v)) <= _NUMBERS:  # token ids need no look
            stack.extend((f"{where}.{i}" if where else str(i), item) for i, item in enumerate(v))
    return None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _TopRequest(_Request):
    """A request body: text that is not valid Unicode (a lone surrogate) is a 400 naming its field."""

    @model_validator(mode="before")
    @classmethod
    def _utf8_only(cls, data):
        where = find_unencodable(data)
        if where is not None:  # not a ValueError: it leaves pydantic as is and keeps its param
            param = where.split(".")[0] if where.split(".")[-1].isdigit() else where
            raise InvalidRequest(f"{where} is not valid Unicode text (a lone surrogate?)", param=param)
        return data


class EmbeddingRequest(_TopRequest):
    input: TextOrTokens
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None
    # mcr-exit extensions
    layer: StrictInt | None = Field(None, description="hidden index to embed from; default: the profile's k")
    pooling: Literal["mean_no_first", "mean_no_massive", "mean", "last", "mean_no_bos"] | None = Field(
        None, description="mean_no_first (default): real tokens but position 0; mean_no_massive: real tokens but "
                          "the massive activations (norm >= 10 x the median); mean: every real token; last")
    normalize: StrictBool | None = None
    truncate: StrictBool = False


class _Sampling(_TopRequest):
    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Number = 1.0
    top_p: Number = 1.0
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: dict | None = None
    n: Number = 1  # only 1 is served; 1.0 is 1
    user: StrictStr | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: TextOrTokens
    max_tokens: StrictInt | None = 16


class ContentPart(_Request):
    """One part of a message's content; only text parts are read (others, e.g. images, are ignored)."""

    type: StrictStr
    text: StrictStr | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self):
        if self.type == "text" and self.text is None:
            raise ValueError("a text content part needs a string 'text'")
        return self


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None


# ---- responses --------------------------------------------------------------------------------

def _encode(vector: np.ndarray, encoding_format: str):
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32).tolist()


def embedding_response(vectors, *, model: str, prompt_tokens: int, encoding_format: str) -> dict:
    arr = vectors.numpy() if hasattr(vectors, "numpy") else np.asarray(vectors)
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, encoding_format)} for i, v in enumerate(arr)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _usage(outputs) -> dict:
    p = sum(o.prompt_tokens for o in outputs)
    c = sum(o.completion_tokens for o in outputs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def completion_response(outputs, *, model: str) -> dict:
    choices = [{"index": i, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
               for i, o in enumerate(outputs)]
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": _usage(outputs)}


def chat_response(output, *, model: str) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": output.text},
              "logprobs": None, "finish_reason": output.finish_reason}
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": _usage([output])}


def completion_chunk(rid: str, model: str, index: int, text: str, finish_reason: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish_reason: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


class TextChunks:
    """The SSE text chunks of one stream, built from a fixed head: no dict and no full encode per token."""

    def __init__(self, rid: str, model: str, *, chat: bool):
        import json

        obj = "chat.completion.chunk" if chat else "text_completion"
        head = json.dumps({"id": rid, "object": obj, "created": int(time.time()), "model": model})
        self._head = "data: " + head[:-1] + ', "choices": [{"index": '
        self._field = '"delta": {"content": ' if chat else '"text": '
        self._tail = '}, "logprobs": null, "finish_reason": null}]}\n\n' if chat else \
            ', "logprobs": null, "finish_reason": null}]}\n\n'
        self._dumps = json.dumps

    def text(self, index: int, text: str) -> str:
        return f"{self._head}{index}, {self._field}{self._dumps(text)}{self._tail}"


def usage_chunk(rid: str, model: str, outputs, obj: str) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": _usage(outputs)}
