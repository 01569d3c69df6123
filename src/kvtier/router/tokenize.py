"""The prompt's token ids, as the engine will see them, from an OpenAI request body.

Same rules as vLLM 0.32's OpenAI server, so the ids the router asks ``/lookup`` about are the
ids the engine caches: ``/v1/completions`` tokenizes a text prompt with the tokenizer's special
tokens (``add_special_tokens``, default true) and takes a token-id prompt as is;
``/v1/chat/completions`` renders the model's chat template (``add_generation_prompt`` default
true, ``continue_final_message``, ``tools``, ``chat_template_kwargs``) and tokenizes the text
without special tokens (the template has them). Text parts of a list ``content`` are joined
with newlines, as vLLM does. A batch of prompts is routed by its first one.

Invariant: tokenizing is a routing hint. A body it cannot read gives ``None`` (the policy then
routes without a prefix signal) and the engine answers the body with its own error.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class PromptTokenizer:
    def __init__(self, model_dir: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)

    def prompt_ids(self, endpoint: str, body: dict[str, Any]) -> list[int] | None:
        try:
            ids = self._chat(body) if endpoint == "chat" else self._completion(body)
        except Exception as e:  # NOTE: a hint only; the engine answers the body's error itself
            log.debug("kvtier router: cannot tokenize the %s body (%s: %s)", endpoint, type(e).__name__, e)
            return None
        if ids is None or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            return None
        return list(ids)

    def _completion(self, body: dict[str, Any]) -> list[int] | None:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch: route by its first prompt
        if isinstance(prompt, list):
            return prompt
        if isinstance(prompt, str):
            special = body.get("add_special_tokens", True)
            return list(self.tok(prompt, add_special_tokens=bool(special)).input_ids)
        return None

    def _chat(self, body: dict[str, Any]) -> list[int] | None:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        msgs = [_flatten(m) for m in messages]
        kwargs = dict(body.get("chat_template_kwargs") or {})
        cont = bool(body.get("continue_final_message", False))
        text = self.tok.apply_chat_template(
            msgs,
            tokenize=False,
            add_generation_prompt=bool(body.get("add_generation_prompt", True)) and not cont,
            continue_final_message=cont,
            tools=body.get("tools"),
            **kwargs,
        )
        special = body.get("add_special_tokens", False)
        return list(self.tok(str(text), add_special_tokens=bool(special)).input_ids)


def _flatten(message: Any) -> Any:
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    parts = [p.get("text", "") for p in message["content"] if isinstance(p, dict) and p.get("type") == "text"]
    return {**message, "content": "\n".join(parts)}
