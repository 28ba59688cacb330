"""Token ids and labels of one conversational or prompt/completion record: which tokens the loss is on.

A conversation is rendered by the chat template (--chat_template, else the tokenizer's) and the whole text tokenised
once. The assistant turns to train on are found as character spans of that text:

- a template with ``{% generation %}`` markers marks them itself (transformers' ``render_jinja_template`` returns
  the spans, as ``apply_chat_template(..., return_assistant_tokens_mask=True)`` uses them);
- otherwise assistant turn i spans from the end of the rendering of the turns before it with the generation prompt
  (what a model is given at inference) to the end of the rendering of the turns up to it. Both renderings must be
  prefixes of the whole text; a template that renders earlier turns differently once later ones follow is refused.

A token is trained on when its characters overlap a span. Prompt/completion strings need no template: the prompt's
tokens, then the completion's and eos, tokenised apart; the loss is on the completion and eos.
"""

from __future__ import annotations

import bisect
import re
from pathlib import Path
from typing import Optional

import jinja2
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from .formats import MESSAGES, cleaned

IGNORE = -100  # the label of a token the loss skips (transformers' ignore_index)
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def chat_template(tokenizer: PreTrainedTokenizerBase, path: Optional[str]) -> Optional[str]:
    """The template conversations are rendered with: the file ``path`` (--chat_template), else the tokenizer's."""
    if path:
        return Path(path).read_text(encoding="utf-8")
    template = tokenizer.chat_template
    return template.get("default") if isinstance(template, dict) else template


def needs_template(record: dict) -> bool:
    """Whether the record is a conversation (prompt/completion strings are not)."""
    return MESSAGES in record or not isinstance(record.get("prompt"), str)


def token_labels(record: dict, tokenizer: PreTrainedTokenizerBase, template: Optional[str],
                 loss_on_all_tokens: bool) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one checked record; labels are IGNORE outside the answers unless
    ``loss_on_all_tokens``. Raises ValueError when the template fails to render it or renders it inconsistently."""
    if not needs_template(record):
        prompt, completion = (tokenizer(text, add_special_tokens=False)["input_ids"]
                              for text in (record["prompt"], record["completion"]))
        ids = prompt + completion + [tokenizer.eos_token_id]
        trained = [False] * len(prompt) + [True] * (len(completion) + 1)
    else:
        if MESSAGES in record:
            messages, first_answer = cleaned(record[MESSAGES]), 0
        else:
            messages, first_answer = cleaned(record["prompt"]) + cleaned(record["completion"]), len(record["prompt"])
        text, spans = answer_spans(messages, first_answer, template, tokenizer)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        trained = overlapping(encoded["offset_mapping"], spans)
    labels = ids if loss_on_all_tokens else [token if keep else IGNORE for token, keep in zip(ids, trained)]
    return ids, list(labels)


def overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token (its characters ``offsets``, in order), whether they overlap one of the character ``spans``."""
    starts, stops = [start for start, _ in offsets], [stop for _, stop in offsets]
    trained = [False] * len(offsets)
    for begin, end in spans:  # the tokens that end after the span begins and start before it ends
        first, last = bisect.bisect_right(stops, begin), bisect.bisect_left(starts, end)
        trained[first:last] = [True] * max(0, last - first)
    return trained


def answer_spans(messages: list[dict], first_answer: int, template: str, tokenizer: PreTrainedTokenizerBase
                 ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns from message ``first_answer`` on."""
    assistant_turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if GENERATION_MARKER.search(template):
        text, marked = _render(messages, template, tokenizer, marked=True)
        if len(marked) != len(assistant_turns):
            raise ValueError(f"the template's {{% generation %}} markers mark {len(marked)} spans in a conversation "
                             f"with {len(assistant_turns)} assistant turns; mark each assistant turn once")
        return text, [span for span, turn in zip(marked, assistant_turns) if turn >= first_answer]
    text, _ = _render(messages, template, tokenizer)
    spans = []
    for turn in (i for i in assistant_turns if i >= first_answer):
        before = _render(messages[:turn], template, tokenizer, add_generation_prompt=True)[0]
        through = _render(messages[:turn + 1], template, tokenizer)[0]
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(f"the chat template renders the turns before message {turn + 1} (assistant) differently "
                             "once later turns follow, so that answer's tokens cannot be found; use a template with "
                             "{% generation %} markers around the assistant content, or --loss_on_all_tokens")
        spans.append((len(before), len(through)))
    return text, spans


def _render(messages: list[dict], template: str, tokenizer: PreTrainedTokenizerBase, marked: bool = False,
            add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and (``marked``) the spans of its {% generation %} blocks."""
    try:
        rendered, spans = render_jinja_template(conversations=[messages], chat_template=template,
                                                return_assistant_tokens_mask=marked,
                                                add_generation_prompt=add_generation_prompt,
                                                **tokenizer.special_tokens_map)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as err:
        raise ValueError(f"the chat template fails to render it ({type(err).__name__}: {err})") from err
    return rendered[0], [tuple(span) for span in spans[0]] if spans else []
