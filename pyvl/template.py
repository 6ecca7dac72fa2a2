"""The `internlm2-chat` prompt template and image-placeholder expansion of the original `chat()`/`batch_chat()`.

Prompt (separator style "MPT", no newline after <|im_end|>; the system block is always present):
    <|im_start|>system\\n{system}<|im_end|>
    <|im_start|>user\\n{q_1}<|im_end|><|im_start|>assistant\\n{a_1}<|im_end|> ...
    <|im_start|>user\\n{q}<|im_end|><|im_start|>assistant\\n
A turn whose message is empty or None is written as its role only (that is how the generation slot is made).

Images: the plain-text placeholder "<image>" (not a token) is prepended as "<image>\\n" to the question when
there is no history, at least one image, and the question lacks it. Then the k-th "<image>" of the WHOLE prompt
(history included, so earlier turns are re-expanded every round) becomes
    "<img>" + "<IMG_CONTEXT>" * (num_image_token * num_patches_list[k]) + "</img>".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pyvl.errors import PromptError

__all__ = [
    "IMG_START",
    "IMG_END",
    "IMG_CONTEXT",
    "IMAGE_PLACEHOLDER",
    "SEP",
    "DEFAULT_SYSTEM_MESSAGE",
    "ChatTemplate",
    "INTERNLM2_CHAT",
    "effective_question",
    "with_image_labels",
    "image_block",
    "build_query",
]

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"
SEP = "<|im_end|>"
# What the original HEAD template (the InternVL2-era conversation.py) uses and the golden fixtures record.
# The V1-5-era code used "You are an AI assistant whose name is InternLM (书生·浦语)."; config.json's
# `system_message`, when present, overrides either (the caller passes it).
DEFAULT_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
    "是一个有用无害的人工智能助手。"
)


@dataclass(frozen=True)
class ChatTemplate:
    """A conversation template with the MPT separator style (what `internlm2-chat` uses)."""

    system_template: str = "<|im_start|>system\n{system_message}"
    roles: tuple[str, str] = ("<|im_start|>user\n", "<|im_start|>assistant\n")
    sep: str = SEP
    system_message: str = DEFAULT_SYSTEM_MESSAGE

    def render(self, turns: Sequence[tuple[str, str | None]], system_message: str | None = None) -> str:
        """turns: (question, answer) pairs; answer None/"" leaves the assistant slot open (role only)."""
        system = self.system_message if system_message is None else system_message
        out = self.system_template.format(system_message=system) + self.sep
        for question, answer in turns:
            for role, message in zip(self.roles, (question, answer)):
                out += role + message + self.sep if message else role
        return out


INTERNLM2_CHAT = ChatTemplate()


def effective_question(question: str, has_images: bool, history=None) -> str:
    """The question as chat() stores it: "<image>\\n" prepended on a first turn with images and no placeholder.

    The original tests `history is None`; an empty history is treated the same here, because otherwise the
    images would have no placeholder and the original fails later on a token-count mismatch.
    """
    if not history and has_images and IMAGE_PLACEHOLDER not in question:
        return IMAGE_PLACEHOLDER + "\n" + question
    return question


def with_image_labels(text: str, n_images: int, first_index: int = 1) -> str:
    """``text`` about ``n_images`` images it has no placeholders for: one image as "<image>\n" + text, several
    as "Image-k: <image>\n" lines before it (InternVL's multi-image examples), k counted from ``first_index``."""
    if n_images == 1:
        return IMAGE_PLACEHOLDER + "\n" + text
    return "".join(f"Image-{first_index + i}: {IMAGE_PLACEHOLDER}\n" for i in range(n_images)) + text


def image_block(num_patches: int, num_image_token: int = 256) -> str:
    return IMG_START + IMG_CONTEXT * (num_image_token * num_patches) + IMG_END


def build_query(
    question: str,
    num_patches_list: Sequence[int] | None = None,
    history=None,
    system_message: str = DEFAULT_SYSTEM_MESSAGE,
    num_image_token: int = 256,
    template: ChatTemplate = INTERNLM2_CHAT,
) -> str:
    """The exact prompt string the original chat() tokenizes (BOS is added by the tokenizer, not here).

    num_patches_list: tiles per image, in placeholder order (None or [] = text only: no prepend, no expansion,
    a literal "<image>" stays text as in the original). history: (question, answer) pairs of earlier turns.
    """
    if not isinstance(question, str):
        raise PromptError(f"question must be a str, got {type(question).__name__}")
    patches = [] if num_patches_list is None else list(num_patches_list)
    for n in patches:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise PromptError(f"num_patches_list {patches} must hold positive integer tile counts")
    if isinstance(num_image_token, bool) or not isinstance(num_image_token, int) or num_image_token < 1:
        raise PromptError(f"num_image_token must be a positive integer, got {num_image_token!r}")
    turns = []
    for k, turn in enumerate(history or []):
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2 and all(isinstance(m, str) for m in turn)):
            raise PromptError(f"history[{k}] must be a (question, answer) pair of strings, got {turn!r}")
        turns.append((turn[0], turn[1]))
    turns.append((effective_question(question, bool(patches), history), None))
    query = template.render(turns, system_message)
    if not patches:
        return query
    found = query.count(IMAGE_PLACEHOLDER)
    if found != len(patches):
        # Stricter than the original, which expands the first len(patches) placeholders and leaves any others
        # in the prompt as plain text: a stray "<image>" is far more often a mistake than meant literally.
        rule = (
            f"pyvl refuses placeholders beyond the images (the original chat() expands the first "
            f"{len(patches)} and keeps the rest as plain text)"
            if found > len(patches)
            else "every image needs its own placeholder"
        )
        raise PromptError(
            f"the prompt (history included) has {found} '{IMAGE_PLACEHOLDER}' placeholder(s) but "
            f"{len(patches)} image(s) were given (num_patches_list {patches}); use exactly one "
            f"placeholder per image: {rule}"
        )
    # replace the k-th placeholder by the k-th block: split once instead of len(patches) str.replace calls
    pieces = query.split(IMAGE_PLACEHOLDER)
    return pieces[0] + "".join(image_block(n, num_image_token) + rest for n, rest in zip(patches, pieces[1:]))
