"""Chat messages as every part of vlmkit passes them: a list of {"role", "content"} with content a list
of parts ({"type": "text", "text": ...}, {"type": "image"}, {"type": "video"}), and the few rewrites
families need (a system turn folded into the first user turn; a plain prompt for template-less models).
"""

from __future__ import annotations

from vlmkit.errors import VlmkitError, first_line
from vlmkit.model.families import Family


def user_turn(text: str, n_images: int = 1, kind: str = "image") -> list[dict]:
    """A one-message conversation: `n_images` media parts of `kind`, then the text."""
    return [{"role": "user", "content": [{"type": kind}] * n_images + [{"type": "text", "text": text}]}]


def normalise_messages(messages: list[dict]) -> list[dict]:
    """Every `content` as a list of parts (some templates iterate over it and break on a string)."""
    out = []
    for m in messages:
        content = m["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        out.append({"role": m["role"], "content": parts})
    return out


def fold_system(messages: list[dict]) -> list[dict]:
    """For templates without a system role: the system text opens the first user message."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system = " ".join(p["text"] for p in messages[0]["content"] if p["type"] == "text").strip()
    rest = [dict(m) for m in messages[1:]]
    for m in rest:
        if m["role"] == "user":
            m["content"] = [{"type": "text", "text": system + "\n\n"}] + list(m["content"])
            break
    return rest


def plain_prompt(messages: list[dict], family: Family) -> str:
    """The prompt of a family without a chat template: the user's text of a single-turn conversation."""
    users = [m for m in messages if m["role"] == "user"]
    if len(users) != 1 or any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{family.name} models take one user message, not a multi-turn conversation")
    return " ".join(p["text"] for p in users[0]["content"] if p["type"] == "text").strip()


def chat_text(processor, family: Family, messages: list[dict], generation_prompt: bool, where: str = "") -> str:
    """The conversation rendered by the model's chat template (a system turn folded into the first user
    turn for templates without one). A template that refuses the conversation (a role it does not know,
    turns out of order) is a `VlmkitError` naming `where`."""
    from jinja2.exceptions import TemplateError

    if not family.system_turn:
        messages = fold_system(messages)
    try:
        return processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    except TemplateError as e:
        prefix = f"{where}: " if where else ""
        raise VlmkitError(
            f"{prefix}the {family.name} model's chat template refuses this conversation ({first_line(e)}); "
            "give it the roles and turn order it takes"
        ) from None
