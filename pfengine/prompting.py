"""Prompt and output text handling shared by the OpenAI-compatible server and the its_hub adapter:
chat messages -> an engine prompt (including "continue the final assistant message"), the engine's
tokenisation of a prompt, stop strings, and text that is safe to stream."""
from __future__ import annotations

from typing import Any, Iterable

from pfengine.config import MAX_DELIMITER_CHARS

NO_DELIMITER = "\x00\x00pfengine:no-step-delimiter\x00\x00"
"""A step delimiter no model produces: a step then ends only at EOS or its token limit."""

REPLACEMENT = "\ufffd"


def message_text(content: Any) -> str:
    """The text of an OpenAI message ``content``: a string, a list of parts (text parts are joined,
    other parts are rejected), or None."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"content: only text parts are supported, got a part of type {kind!r}")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise TypeError(f"content: expected a string or a list of text parts, got {type(content).__name__}")


def normalise_messages(messages: Iterable[Any]) -> list[dict[str, str]]:
    """Chat messages (dicts, pydantic models or its_hub ``ChatMessage``) as ``{"role", "content"}`` dicts."""
    out = []
    for k, m in enumerate(messages):
        if isinstance(m, dict):
            role, content = m.get("role"), m.get("content")
        else:
            role, content = getattr(m, "role", None), getattr(m, "content", None)
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{k}].role: expected a non-empty string, got {role!r}")
        out.append({"role": role, "content": message_text(content)})
    if not out:
        raise ValueError("messages: must not be empty")
    return out


def chat_prompt(tokenizer, messages: Iterable[Any], continue_final_message: bool = False,
                add_generation_prompt: bool = True) -> str | list[dict[str, str]]:
    """The engine prompt for chat ``messages``.

    With the defaults the messages are handed to the engine as they are (it applies the chat template
    with a generation prompt). ``continue_final_message`` renders the conversation so the model
    continues the last (assistant) message, keeping its trailing whitespace (a "\\n\\n" after a
    finished step stays in the prompt); ``add_generation_prompt=False`` renders it without one."""
    msgs = normalise_messages(messages)
    if continue_final_message:
        if msgs[-1]["role"] != "assistant":
            raise ValueError("continue_final_message: the last message must be an assistant message, "
                             f"got role {msgs[-1]['role']!r}")
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False,
                                             continue_final_message=True)
        tail = msgs[-1]["content"]
        kept = tail.rstrip()
        if tail != kept and text.endswith(kept):  # a template that trims trailing whitespace
            text += tail[len(kept):]
        return engine_string(tokenizer, text)
    if add_generation_prompt:
        return msgs
    return engine_string(tokenizer, tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False))


def engine_string(tokenizer, text: str) -> str:
    """``text`` rendered by a chat template, as a string prompt for the engine. The engine encodes
    string prompts with the tokenizer's special tokens; a BOS the template already wrote is removed
    from the text so it is not doubled."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        with_special = tokenizer.encode("x")
        plain = tokenizer.encode("x", add_special_tokens=False)
        if with_special != plain and with_special[:1] == [tokenizer.bos_token_id]:
            return text[len(bos):]
    return text


def encode_prompt(tokenizer, prompt: str | list[dict]) -> tuple[str, list[int]]:
    """``(prompt_text, prompt_ids)`` exactly as the engine tokenises a request's prompt."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return text, tokenizer.encode(text, add_special_tokens=False)
    return prompt, tokenizer.encode(prompt)


def stop_list(stop: str | list[str] | None, field: str = "stop") -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    for s in stops:
        if not isinstance(s, str) or not s or len(s) > MAX_DELIMITER_CHARS:
            raise ValueError(f"{field}: stop sequences must be non-empty strings of at most {MAX_DELIMITER_CHARS} "
                             f"characters, got {s!r}")
    return stops


def trim_at_stop(text: str, stops: list[str], include: bool = False) -> tuple[str, bool]:
    """``text`` cut at the first occurrence of any stop string (kept with ``include``), and whether one occurred."""
    first: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (first is None or i < first[0]):
            first = (i, s)
    if first is None:
        return text, False
    i, s = first
    return text[:i + (len(s) if include else 0)], True


def stream_safe(text: str, stops: list[str], include: bool = False) -> str:
    """The part of a growing ``text`` that will not change: cut at a stop string, without a tail that
    may be the start of a stop string, and without trailing replacement characters (a multi-byte
    character split across tokens decodes to U+FFFD until its last byte arrives)."""
    text, hit = trim_at_stop(text, stops, include)
    if hit:
        return text
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    if hold:
        text = text[:-hold]
    return text.rstrip(REPLACEMENT)


def common_prefix(seqs: list[list[int]]) -> list[int]:
    if not seqs:
        return []
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return first[:i]
    return first[:n]
