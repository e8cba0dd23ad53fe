"""Requests' text and token ids into checked token ids: the engine's input side (a mixin of ``Engine``).

Cheap checks come first: the number of inputs, then each text's length in characters, so an oversized
request is refused before any tokenizer runs; the routes run the rest off the event loop.
"""

from __future__ import annotations

from mcr_exit.errors import DataError
from mcr_exit.models.tokens import encode_prompts
from mcr_exit.serving.errors import InvalidRequest

# A text longer than max_input_tokens x this many characters is refused (or cut, with truncate) before the
# tokenizer sees it. Tokens of natural text average ~4 characters; few tokenizers have any longer than 64.
MAX_CHARS_PER_TOKEN = 64


class InputEncoding:
    """Needs ``self.config`` (EngineConfig), ``self.loaded``, ``self.bos`` and ``self.vocab_size``."""

    def check_text_length(self, n_chars: int, param: str, index: int | None = None) -> None:
        """400 for text too long to fit max_input_tokens whatever its tokens, before anything tokenizes it."""
        limit = self.config.max_input_tokens * MAX_CHARS_PER_TOKEN
        if n_chars > limit:
            where = param if index is None else f"{param}[{index}]"
            hint = " (send truncate=true to cut it)" if param == "input" else ""
            raise InvalidRequest(f"{where} has {n_chars} characters, more than {limit} "
                                 f"({self.config.max_input_tokens} tokens at most){hint}", param=param)

    def encode_texts(self, texts: list[str], *, truncate: bool = False, param: str = "input") -> list[list[int]]:
        """Token ids exactly as the analysis made them (``encode_prompts`` with the BOS policy "auto")."""
        self.check_count(len(texts), param)
        cut = self.config.max_input_tokens * MAX_CHARS_PER_TOKEN
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise InvalidRequest(f"{param}[{i}] is an empty string", param=param)
            if not truncate:
                self.check_text_length(len(t), param, i)
        if truncate and any(len(t) > cut for t in texts):
            return [self._encode_cut(t, cut, param) for t in texts]
        return self._check_lengths(self._encode(texts, param), truncate, param)

    def _encode(self, texts: list[str], param: str) -> list[list[int]]:
        try:
            enc = encode_prompts(self.loaded.tokenizer, texts, self.bos, max_length=10**9)
        except DataError as exc:
            raise InvalidRequest(f"{param} has no tokens: {exc}", param=param) from exc
        except (TypeError, ValueError, UnicodeError) as exc:  # what a tokenizer raises on text it cannot take
            raise InvalidRequest(f"{param} could not be tokenized: {type(exc).__name__}", param=param) from exc
        if len(enc.kept) != len(texts):
            bad = sorted(set(range(len(texts))) - set(enc.kept))[0]
            raise InvalidRequest(f"{param}[{bad}] has no tokens", param=param)
        return enc.ids

    def _encode_cut(self, text: str, cut: int, param: str) -> list[int]:
        """The first max_input_tokens tokens of a text, tokenizing only its first ``cut`` characters when
        those hold well over max_input_tokens tokens (the cut then lies far past the tokens kept)."""
        limit = self.config.max_input_tokens
        if len(text) > cut:
            ids = self._encode([text[:cut]], param)[0]
            if len(ids) > limit + 64:
                return ids[:limit]
        return self._encode([text], param)[0][:limit]

    def encode_token_ids(self, batch: list[list[int]], *, truncate: bool = False, param: str = "input"):
        out = []
        for i, ids in enumerate(batch):
            if not ids:
                raise InvalidRequest(f"{param}[{i}] is an empty list of token ids", param=param)
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise InvalidRequest(f"{param}[{i}] has token ids outside 0..{self.vocab_size - 1}", param=param)
            ids = list(ids)
            if self.bos.prepend and ids[0] != self.bos.token_id:
                ids = [self.bos.token_id, *ids]
            out.append(ids)
        return self._check_lengths(out, truncate, param)

    def check_count(self, n: int, param: str) -> None:
        """400 for more inputs (embeddings: --max-inputs) or prompts (--max-prompts) than one request may hold."""
        cfg = self.config  # more prompts than --max-queue could never be queued whole
        if param == "input":
            cap, what = cfg.max_inputs, "inputs"
        else:
            cap, what = min(cfg.max_prompts, cfg.max_queue), "prompts"
        if n > cap:
            raise InvalidRequest(f"{n} {what} exceed the limit of {cap} per request", param=param)

    def _check_lengths(self, ids: list[list[int]], truncate: bool, param: str) -> list[list[int]]:
        limit = self.config.max_input_tokens
        self.check_count(len(ids), param)
        for i, x in enumerate(ids):
            if len(x) > limit and not truncate:
                hint = " (send truncate=true to cut it)" if param == "input" else ""
                raise InvalidRequest(f"{param}[{i}] has {len(x)} tokens, more than the limit of {limit}{hint}",
                                     param=param)
        return [x[:limit] for x in ids]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        tok = self.loaded.tokenizer
        self.check_text_length(sum(len(m["content"]) for m in messages), "messages")
        if getattr(tok, "chat_template", None):
            try:
                ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            except (TypeError, ValueError, UnicodeError) as exc:
                raise InvalidRequest(f"messages could not be tokenized: {type(exc).__name__}",
                                     param="messages") from exc
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        else:  # a tokenizer without a template: a plain "role: content" transcript
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            ids = self.encode_texts([text], param="messages")[0]
        return self._check_lengths([ids], False, "messages")[0]
