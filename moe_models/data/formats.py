"""The record formats a data file can hold, as TRL names them, which one a file holds, and the checks of a record.

- text: a text column (--text_column; a .txt file's lines);
- conversational: a ``messages`` column, each value a list of ``{"role", "content"}`` messages;
- prompt/completion: ``prompt`` and ``completion`` columns, both strings, or both message lists (the completion holds
  the assistant turns to train on).

A file with a ``messages`` column is conversational; else one with ``prompt`` and ``completion`` is prompt/completion;
else it is text. One run reads one format (text.py refuses a mix, naming the files).
"""

from __future__ import annotations

from typing import Optional, Sequence

TEXT, MESSAGES, PROMPT_COMPLETION = "text", "messages", "prompt/completion"
ROLES = ("system", "developer", "user", "assistant", "tool")
SOURCE, RECORD = "source", "record"  # where a conversational record came from: its file, its 1-based number


def format_of(columns: Sequence[str]) -> str:
    """The format of a file (or dataset) with these columns."""
    if MESSAGES in columns:
        return MESSAGES
    if "prompt" in columns and "completion" in columns:
        return PROMPT_COMPLETION
    return TEXT


def format_columns(kind: str) -> list[str]:
    """The columns a record of a format that is not text is made of."""
    return [MESSAGES] if kind == MESSAGES else ["prompt", "completion"]


def record_problem(record: dict, kind: str) -> Optional[str]:
    """What is wrong with one record of a conversational or prompt/completion file, or None."""
    if kind == MESSAGES:
        return conversation_problem(record.get(MESSAGES), needs_assistant=True)
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return None if completion else "the completion is empty: nothing to train on"
    if isinstance(prompt, list) and isinstance(completion, list):
        return (conversation_problem(prompt, needs_assistant=False, part="prompt ")
                or conversation_problem(completion, needs_assistant=True, part="completion "))
    return (f"prompt and completion must both be strings or both lists of messages, not {type(prompt).__name__} and "
            f"{type(completion).__name__}")


def conversation_problem(messages, needs_assistant: bool, part: str = "") -> Optional[str]:
    """What is wrong with a list of messages: not a list, empty, a message that is not a {role, content} object, an
    unknown role, content that is not a string, or (``needs_assistant``) no assistant turn."""
    if not isinstance(messages, list):
        return f"the {part}conversation is {type(messages).__name__}, not a list of {{role, content}} messages"
    if not messages:
        return f"the {part}conversation is empty"
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            return f"{part}message {number} is {type(message).__name__}, not a {{role, content}} object"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"{part}message {number} has an unknown role {role!r}; the roles are {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"{part}message {number} ({role}): content is {type(content).__name__}, not a string"
    if needs_assistant and not any(message["role"] == "assistant" for message in messages):
        return f"the {part}conversation has no assistant turn: nothing to train on"
    return None


def cleaned(messages: list[dict]) -> list[dict]:
    """The messages without the empty fields that reading a column of records adds (a key some message lacks)."""
    return [{key: value for key, value in message.items() if value is not None} for message in messages]
