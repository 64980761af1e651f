"""Row formats of the ingest stage: one source record (a dict of fields) becomes one or two candidate rows.

Formats (`data.format`, column names from `data.columns`):
- `prompt_response`: a prompt (text, or a list of {role, content} messages) and a response (or `completion`);
- `messages`: a conversation; the last assistant turn is the response, the turns before it the prompt;
- `hh`: Anthropic HH-RLHF `chosen`/`rejected` transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ..."); the turns
  both share are the prompt, the final assistant turn of each is a response;
- `preference`: `prompt`, `chosen`, `rejected`.
The two preference formats give two candidates (chosen, rejected). Every field is checked here (presence,
type, emptiness, decodable text, length); a problem on one side of a pair rejects both sides, so the
output never holds half a pair.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from schemas.ingest import ColumnMapping

FORMATS = ("prompt_response", "messages", "hh", "preference")
ROLES = ("system", "user", "assistant")
COMPLETION = "completion"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}

Message = dict[str, str]


class Problem(NamedTuple):
    """Why a candidate row is rejected: the source field, a short reason code and a readable detail."""

    field: str
    reason: str
    detail: str


@dataclass
class Candidate:
    """One would-be output row. `problem` is None when every check passed."""

    prompt: list[Message] | None
    response: str | None
    preference: str | None
    problem: Problem | None


@dataclass(frozen=True)
class Limits:
    """Longest accepted prompt (sum of message contents) and response, in characters."""

    max_prompt_chars: int
    max_response_chars: int


def detect_format(columns: Iterable[str], mapping: ColumnMapping) -> str | None:
    """The format the present columns imply, or None when they fit none."""
    present = set(columns)
    if mapping.messages in present:
        return "messages"
    if mapping.chosen in present and mapping.rejected in present:
        return "preference" if mapping.prompt in present else "hh"
    if mapping.prompt in present and (mapping.response in present or COMPLETION in present):
        return "prompt_response"
    return None


def format_columns(fmt: str, mapping: ColumnMapping) -> set[str]:
    """Source columns a format consumes (the rest go to `meta`), the split column included."""
    used = {
        "prompt_response": {mapping.prompt, mapping.response, COMPLETION},
        "messages": {mapping.messages},
        "hh": {mapping.chosen, mapping.rejected},
        "preference": {mapping.prompt, mapping.chosen, mapping.rejected},
    }[fmt]
    return used | {mapping.split}


def to_candidates(fmt: str, data: dict[str, Any], mapping: ColumnMapping, limits: Limits) -> list[Candidate]:
    """The candidate rows of one source record in format `fmt`."""
    if fmt == "prompt_response":
        return [_prompt_response(data, mapping, limits)]
    if fmt == "messages":
        return [_messages(data, mapping, limits)]
    if fmt == "hh":
        return _hh(data, mapping, limits)
    return _preference(data, mapping, limits)


def is_decodable(text: str) -> bool:
    """False for strings holding lone surrogates: bytes that were not UTF-8, or a bad `\\ud800` JSON escape."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(value: Any, field: str, max_chars: int | None) -> Problem | None:
    """A response-like field: present, a string, decodable, not blank, at most `max_chars` long (if given)."""
    if value is None:
        return Problem(field, "missing", f"field {field!r} is missing or null")
    if not isinstance(value, str):
        return Problem(field, "wrong_type", f"expected text, got {type(value).__name__}")
    if not is_decodable(value):
        return Problem(field, "undecodable", "text holds bytes that are not valid UTF-8")
    if not value.strip():
        return Problem(field, "empty", f"field {field!r} is empty")
    if max_chars is not None and len(value) > max_chars:
        return Problem(field, "too_long", f"{len(value)} characters, more than the maximum {max_chars}")
    return None


def read_prompt(value: Any, field: str, max_chars: int) -> tuple[list[Message] | None, Problem | None]:
    """A prompt given as text (one user message) or as a list of {role, content} messages."""
    if isinstance(value, str):
        problem = check_text(value, field, max_chars)
        return (None, problem) if problem else ([{"role": "user", "content": value}], None)
    if isinstance(value, list):
        messages, problem = read_messages(value, field)
        return (None, problem) if problem else check_prompt(messages, field, max_chars)
    if value is None:
        return None, Problem(field, "missing", f"field {field!r} is missing or null")
    return None, Problem(field, "wrong_type", f"expected text or a list of messages, got {type(value).__name__}")


def read_messages(value: Any, field: str) -> tuple[list[Message], Problem | None]:
    """A list of {role, content} dicts with role in system/user/assistant and text content."""
    if value is None:
        return [], Problem(field, "missing", f"field {field!r} is missing or null")
    if not isinstance(value, list):
        return [], Problem(field, "wrong_type", f"expected a list of messages, got {type(value).__name__}")
    messages: list[Message] = []
    for number, item in enumerate(value, start=1):
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            return [], Problem(field, "bad_message", f"message {number} is not a {{role, content}} object")
        role, content = item["role"], item["content"]
        if role not in ROLES:
            return [], Problem(field, "bad_message", f"message {number} has role {role!r}, not one of {ROLES}")
        if not isinstance(content, str):
            return [], Problem(field, "wrong_type", f"message {number} content is {type(content).__name__}, not text")
        if not is_decodable(content):
            return [], Problem(field, "undecodable", f"message {number} holds bytes that are not valid UTF-8")
        messages.append({"role": role, "content": content})
    return messages, None


def check_prompt(messages: list[Message], field: str, max_chars: int) -> tuple[list[Message] | None, Problem | None]:
    """A prompt needs at least one message with non-blank content and at most `max_chars` in total."""
    if not any(m["content"].strip() for m in messages):
        return None, Problem(field, "empty", "the prompt has no text")
    total = sum(len(m["content"]) for m in messages)
    if total > max_chars:
        return None, Problem(field, "too_long", f"prompt of {total} characters, more than the maximum {max_chars}")
    return messages, None


def _prompt_response(data: dict[str, Any], mapping: ColumnMapping, limits: Limits) -> Candidate:
    prompt, problem = read_prompt(data.get(mapping.prompt), mapping.prompt, limits.max_prompt_chars)
    response_field = mapping.response if mapping.response in data or COMPLETION not in data else COMPLETION
    response = data.get(response_field)
    problem = problem or check_text(response, response_field, limits.max_response_chars)
    return Candidate(prompt, response, None, problem)


def _messages(data: dict[str, Any], mapping: ColumnMapping, limits: Limits) -> Candidate:
    field = mapping.messages
    messages, problem = read_messages(data.get(field), field)
    if problem:
        return Candidate(None, None, None, problem)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        problem = Problem(field, "no_assistant_turn", "the conversation has no assistant turn")
        return Candidate(None, None, None, problem)
    if last == 0:
        return Candidate(None, None, None, Problem(field, "missing", "no turns before the last assistant turn"))
    prompt, problem = check_prompt(messages[:last], field, limits.max_prompt_chars)
    response = messages[last]["content"]
    problem = problem or check_text(response, field, limits.max_response_chars)
    return Candidate(prompt, response, None, problem)


def parse_hh_transcript(text: str) -> list[Message]:
    """Split "\\n\\nHuman: a\\n\\nAssistant: b" into [{user, a}, {assistant, b}]; ValueError when it is not one."""
    parts = HH_TURN.split(text)
    if len(parts) < 3:
        raise ValueError("no '\\n\\nHuman:' or '\\n\\nAssistant:' turns")
    if parts[0].strip():
        raise ValueError("text before the first '\\n\\nHuman:' turn")
    turns = zip(parts[1::2], parts[2::2], strict=True)
    return [{"role": HH_ROLES[role], "content": content.strip()} for role, content in turns]


def _hh_side(value: Any, field: str) -> tuple[list[Message], Problem | None]:
    """One HH transcript as turns, checked to end with an assistant turn (lengths are checked per part later)."""
    problem = check_text(value, field, None)
    if problem:
        return [], problem
    try:
        turns = parse_hh_transcript(value)
    except ValueError as exc:
        return [], Problem(field, "hh_parse", f"not an HH-RLHF transcript: {exc}")
    if turns[-1]["role"] != "assistant":
        return [], Problem(field, "hh_parse", "the transcript does not end with an Assistant turn")
    return turns, None


def _hh(data: dict[str, Any], mapping: ColumnMapping, limits: Limits) -> list[Candidate]:
    chosen_turns, chosen_problem = _hh_side(data.get(mapping.chosen), mapping.chosen)
    rejected_turns, rejected_problem = _hh_side(data.get(mapping.rejected), mapping.rejected)
    prompt, prompt_problem = None, None
    if not (chosen_problem or rejected_problem):
        if chosen_turns[:-1] != rejected_turns[:-1]:
            prompt_problem = Problem(
                mapping.rejected, "hh_prompt_mismatch", "chosen and rejected differ before their final Assistant turn"
            )
        elif len(chosen_turns) < 2:
            prompt_problem = Problem(mapping.chosen, "missing", "no turns before the final Assistant turn")
        else:
            prompt, prompt_problem = check_prompt(chosen_turns[:-1], mapping.chosen, limits.max_prompt_chars)
    chosen = chosen_turns[-1]["content"] if chosen_turns else None
    rejected = rejected_turns[-1]["content"] if rejected_turns else None
    if not chosen_problem and chosen_turns:
        chosen_problem = check_text(chosen, mapping.chosen, limits.max_response_chars)
    if not rejected_problem and rejected_turns:
        rejected_problem = check_text(rejected, mapping.rejected, limits.max_response_chars)
    return pair(prompt, prompt_problem, (chosen, chosen_problem), (rejected, rejected_problem), mapping)


def _preference_response(value: Any, field: str, limits: Limits) -> tuple[str | None, Problem | None]:
    """A preference response: text, or (TRL's conversational form) a list holding one assistant message."""
    if isinstance(value, list):
        messages, problem = read_messages(value, field)
        if problem:
            return None, problem
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            return None, Problem(field, "bad_message", "expected text or a list of exactly one assistant message")
        value = messages[0]["content"]
    problem = check_text(value, field, limits.max_response_chars)
    return (None, problem) if problem else (value, None)


def _preference(data: dict[str, Any], mapping: ColumnMapping, limits: Limits) -> list[Candidate]:
    prompt, prompt_problem = read_prompt(data.get(mapping.prompt), mapping.prompt, limits.max_prompt_chars)
    chosen = _preference_response(data.get(mapping.chosen), mapping.chosen, limits)
    rejected = _preference_response(data.get(mapping.rejected), mapping.rejected, limits)
    return pair(prompt, prompt_problem, chosen, rejected, mapping)


def pair(
    prompt: list[Message] | None,
    prompt_problem: Problem | None,
    chosen: tuple[str | None, Problem | None],
    rejected: tuple[str | None, Problem | None],
    mapping: ColumnMapping,
) -> list[Candidate]:
    """The chosen and rejected candidates of a pair; a problem on either side rejects both."""
    (chosen_text, chosen_problem), (rejected_text, rejected_problem) = chosen, rejected
    if not (prompt_problem or chosen_problem or rejected_problem) and chosen_text == rejected_text:
        same = Problem(mapping.rejected, "identical_responses", "chosen and rejected responses are the same text")
        chosen_problem = rejected_problem = same
    chosen_problem, rejected_problem = (
        prompt_problem or chosen_problem or partner_problem(rejected_problem),
        prompt_problem or rejected_problem or partner_problem(chosen_problem),
    )
    return [
        Candidate(prompt, chosen_text, "chosen", chosen_problem),
        Candidate(prompt, rejected_text, "rejected", rejected_problem),
    ]


def partner_problem(problem: Problem | None) -> Problem | None:
    """The problem a valid side of a pair inherits from its invalid partner."""
    if problem is None:
        return None
    detail = f"the other response of the pair is invalid: {problem.reason}"
    return Problem(problem.field, "pair_partner_invalid", detail)
