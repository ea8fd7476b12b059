"""Conversation templates: a LLaVA-format sample -> token ids and labels, masked as the template says.

A sample is a list of turns `{"from": "human"|"gpt", "value": text}`; `<image>` in a human turn
marks where the projected image tokens go. Token ids hold IMAGE_TOKEN (-200) there, one per
image; the model replaces it with the image's patch tokens. Labels are -100 (ignored by the
loss) on the image, on everything the template says the model is given (system prompt, user
turns, role markers) and on padding; the assistant's words and the turn end it must produce are
trained on.

- `plain` (stage 1): the image, then the caption and "\\n"; only the caption and "\\n" count.
- `bunny`: "SYSTEM USER: <image>\\nQ ASSISTANT: A<eos>USER: ..." (Bunny's default).
- `phi3`: "<|system|>\\nSYSTEM<|end|>\\n<|user|>\\nQ<|end|>\\n<|assistant|>\\nA<|end|>\\n".
- `llama3`: "<|start_header_id|>system<|end_header_id|>\\n\\nSYSTEM<|eot_id|>" then per turn
  "<|start_header_id|>user<|end_header_id|>\\n\\nQ<|eot_id|><|start_header_id|>assistant
  <|end_header_id|>\\n\\nA<|eot_id|>".
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE = "<image>"
IMAGE_TOKEN = -200  # stands for the image in token ids (replaced by its patch tokens)
IGNORE = -100  # label ignored by the loss


SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Template:
    name: str
    system: str = ""  # the system prompt with its role marker (`sep` closes it)
    user: str = ""  # before a user turn
    assistant: str = ""  # between a user turn and the answer (given, not trained)
    sep: str = ""  # after the system prompt and after a user turn
    turn_end: str = ""  # after an answer (trained on); "<eos>" means the tokenizer's
    bos: bool = True  # start with the tokenizer's bos token (where it has one)


TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", turn_end="\n"),
    "bunny": Template(
        "bunny", system=SYSTEM, user="USER: ", assistant="ASSISTANT: ", sep=" ", turn_end="<eos>"
    ),
    "phi3": Template(
        "phi3",
        system=f"<|system|>\n{SYSTEM}",
        user="<|user|>\n",
        assistant="<|assistant|>\n",
        sep="<|end|>\n",
        turn_end="<|end|>\n",
    ),
    "llama3": Template(
        "llama3",
        system=f"<|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}",
        user="<|start_header_id|>user<|end_header_id|>\n\n",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
        sep="<|eot_id|>",
        turn_end="<|eot_id|>",
    ),
    "chatml": Template(  # Qwen, SmolLM2: their bos token is <|im_start|> itself
        "chatml",
        system=f"<|im_start|>system\n{SYSTEM}",
        user="<|im_start|>user\n",
        assistant="<|im_start|>assistant\n",
        sep="<|im_end|>\n",
        turn_end="<|im_end|>\n",
        bos=False,
    ),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}: use one of {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def _ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with `<image>` as IMAGE_TOKEN, no special tokens added."""
    out: list[int] = []
    for i, piece in enumerate(text.split(IMAGE)):
        if i:
            out.append(IMAGE_TOKEN)
        if piece:
            out.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return out


CHARS_PER_TOKEN_BOUND = 64  # no tokenizer's tokens average more characters than this


def encode(
    turns: list[dict], template: str | Template, tokenizer, max_length: int
) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) for one conversation."""
    t = get_template(template) if isinstance(template, str) else template
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        raise ValueError("a conversation needs human/gpt turn pairs")
    if not all(isinstance(turn, dict) and isinstance(turn.get("value"), str) for turn in turns):
        raise ValueError("every turn needs a string value")
    end = tokenizer.eos_token if t.turn_end == "<eos>" else t.turn_end
    ids: list[int] = []
    labels: list[int] = []
    # A turn longer than this many characters is cut before tokenizing: its tokens past
    # max_length would be cut anyway, and a 60 MiB caption would take minutes to tokenize.
    max_chars = max_length * CHARS_PER_TOKEN_BOUND
    cut = False

    def add(text: str, trained: bool) -> None:
        nonlocal cut
        if len(text) > max_chars:
            text, cut = text[:max_chars], True
        piece = _ids(tokenizer, text)
        ids.extend(piece)
        labels.extend([IGNORE if i == IMAGE_TOKEN or not trained else i for i in piece])

    if tokenizer.bos_token_id is not None and t.bos and t.name != "plain":
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE)
    if t.system:
        add(t.system + t.sep, False)
    for k in range(0, len(turns), 2):
        human, gpt = turns[k], turns[k + 1]
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise ValueError(f"turns {k} and {k + 1} are not a human/gpt pair")
        if t.name == "plain":  # the prompt is the image alone; the caption follows it
            add(IMAGE if IMAGE in human["value"] else "", False)
        else:
            add(t.user + human["value"] + t.sep + t.assistant, False)
        add(gpt["value"] + end, True)
    truncated = cut or len(ids) > max_length
    return ids[:max_length], labels[:max_length], truncated


def prompt(question: str, template: str | Template, tokenizer) -> list[int]:
    """Token ids that ask `question` (with `<image>` where the image goes) and leave the answer
    to the model: the same text `encode` gives up to the assistant's first word."""
    t = get_template(template) if isinstance(template, str) else template
    ids: list[int] = []
    if t.name == "plain":  # stage 1 models caption the image
        return _ids(tokenizer, IMAGE if IMAGE in question else "")
    if tokenizer.bos_token_id is not None and t.bos:
        ids.append(tokenizer.bos_token_id)
    if t.system:
        ids.extend(_ids(tokenizer, t.system + t.sep))
    ids.extend(_ids(tokenizer, t.user + question + t.sep + t.assistant))
    return ids
