"""
Chat templates: how a conversation becomes the tokens a model sees.

Models fine-tuned by `nanoplay finetune` record CHAT_TEMPLATE in their config.json (`chat_template`,
the Jinja text Hugging Face tokenizers use, so other tools can read it). It wraps each message in the
special tokens of the padded vocabulary:

    <|endoftext|><|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>

Message contents are encoded as plain text: a user who types "<|end|>" gets those characters, never the
special token. Generation is prompted with <|assistant|> and stops at <|end|>.

Every other model (no recorded template) gets a plain-text template it can follow from pre-training
alone ("User: ...\n\nAssistant:"), stopped at the next "\nUser:".
"""

from __future__ import annotations

from .errors import NanoplayError
from .tokenizer import EOT_ID, SPECIAL_TOKENS, get_tokenizer

ROLES = ("system", "user", "assistant")
END_ID = SPECIAL_TOKENS["<|end|>"]
ROLE_IDS = {role: SPECIAL_TOKENS[f"<|{role}|>"] for role in ROLES}
CHAT_TEMPLATE = (
    "<|endoftext|>{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PLAIN_NAMES = {"system": "", "user": "User: ", "assistant": "Assistant: "}
PLAIN_STOP = "\nUser:"


def _check_template(chat_template: str | None) -> None:
    if chat_template is not None and chat_template != CHAT_TEMPLATE:
        raise NanoplayError("this checkpoint records a chat template nanoplay does not know; re-run `nanoplay finetune`")


def encode_conversation(messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """
    Token ids of a conversation in CHAT_TEMPLATE, and for each id whether fine-tuning trains on it:
    assistant contents and their <|end|> (what the model must learn to say, and when to stop).
    """
    tok = get_tokenizer()
    ids, trained = [EOT_ID], [False]
    for m in messages:
        content = tok.encode(m["content"])
        is_answer = m["role"] == "assistant"
        ids += [ROLE_IDS[m["role"]], *content, END_ID]
        trained += [False] + [is_answer] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(ROLE_IDS["assistant"])
        trained.append(False)
    return ids, trained


def render_plain(messages: list[dict], add_generation_prompt: bool = True) -> str:
    parts = [PLAIN_NAMES[m["role"]] + m["content"] + "\n\n" for m in messages]
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)


def render_prompt(messages: list[dict], chat_template: str | None) -> str | list[int]:
    """The prompt that asks a model for the next assistant message: token ids (template) or text (plain)."""
    _check_template(chat_template)
    if chat_template is None:
        return render_plain(messages)
    return encode_conversation(messages, add_generation_prompt=True)[0]


def stop_token_ids(chat_template: str | None) -> list[int]:
    _check_template(chat_template)
    return [END_ID] if chat_template is not None else []


def stop_strings(chat_template: str | None) -> list[str]:
    _check_template(chat_template)
    return [] if chat_template is not None else [PLAIN_STOP]
