"""The reflective templates R(x, y'): how the prompt and the other response are laid out before
the scored response in the InSPO view."""

from __future__ import annotations

import string
from dataclasses import dataclass

# Named layouts for R(x, y'). Each is a format string over {prompt} and {other}; the scored
# response follows the formatted text directly.
TEMPLATES: dict[str, str] = {
    # Readable: the alternative is marked as another answer, and the prompt (whose ending cues
    # the response) sits right before the scored response, as in the plain view.
    "default": "[another answer to the prompt below: {other}]\n{prompt}",
    # The InSPO authors' plain concatenation x + y' + y.
    "raw": "{prompt}{other}",
}
# For chat models (``chat`` or ``chat:<format string>``): this text becomes the content of the
# last user turn, and the tokenizer's chat template renders the conversation up to the
# assistant turn, which is the scored response.
CHAT_TEMPLATE = "{prompt}\n\n[Another answer to this request, shown for reference only:]\n{other}"


@dataclass(frozen=True)
class Template:
    """A reflective template split into literal text and the {prompt}/{other} slots."""

    text: str
    chat: bool = False  # rendered through the tokenizer's chat template (see CHAT_TEMPLATE)

    def __post_init__(self) -> None:
        fields = [f for _, f, _, _ in string.Formatter().parse(self.text) if f is not None]
        if sorted(fields) != ["other", "prompt"]:
            raise ValueError(
                "a reflective template must contain {prompt} and {other} exactly once each; "
                f"got fields {fields} in {self.text!r}"
            )

    def segments(self) -> list[tuple[str, str]]:
        """[(kind, text)] with kind in {"text", "prompt", "other"}, in order."""
        out: list[tuple[str, str]] = []
        for literal, field, _, _ in string.Formatter().parse(self.text):
            if literal:
                out.append(("text", literal))
            if field is not None:
                out.append((field, ""))
        return out


def resolve_template(name_or_text: str) -> Template:
    """A template by name (``default``, ``raw``, ``chat``), ``chat:<format string>``, or a
    literal format string."""
    if name_or_text == "chat":
        return Template(CHAT_TEMPLATE, chat=True)
    if name_or_text.startswith("chat:"):
        return Template(name_or_text[len("chat:") :], chat=True)
    if name_or_text in TEMPLATES:
        return Template(TEMPLATES[name_or_text])
    if "{" not in name_or_text:
        raise ValueError(
            f"unknown reflection template {name_or_text!r}; valid names: "
            f"{', '.join([*TEMPLATES, 'chat'])}"
            " (or a format string with {prompt} and {other})"
        )
    return Template(name_or_text)
