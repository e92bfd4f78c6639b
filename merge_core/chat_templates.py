"""`chat_template:` of a mergekit config: the chat template the merged model's tokenizer is saved with.

mergekit takes `auto` (the template most of the merged models' tokenizers carry), the name of a
template it ships, or the Jinja text of a template. merge-search ships `chatml` and `llama3`, written
here to render the same prompts as mergekit's; for mergekit's other names (alpaca, exaone, mistral)
give the template's Jinja text.
"""

from __future__ import annotations

from collections import Counter

CHATML = ("{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{% for message in messages %}"
          "{% if loop.first %}{{ bos_token }}{% endif %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
          " + '<|eot_id|>' + '\\n' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
SHIPPED = {"chatml": CHATML, "llama3": LLAMA3}
MERGEKIT_ONLY = ("alpaca", "exaone", "mistral")


def check_chat_template(value: str) -> str:
    """The config's value as given, or ValueError with what to write instead."""
    if value == "auto" or value in SHIPPED:
        return value
    if value in MERGEKIT_ONLY:
        raise ValueError(f"{value!r} is a template mergekit ships and merge-search does not; give its Jinja text, "
                         f"or one of auto, {', '.join(SHIPPED)}")
    if len(value) < 20 or "{" not in value:  # mergekit's test for a template's text
        raise ValueError(f"{value!r} is neither a template name (auto, {', '.join(SHIPPED)}) nor a Jinja template")
    return value


def chat_template_text(value: str, tokenizers) -> str | None:
    """The template to save: a shipped one, the given text, or for `auto` the one most of `tokenizers`
    (the merged models', None where one does not load) carry, the first of those tied; None if none has one."""
    if value in SHIPPED:
        return SHIPPED[value]
    if value != "auto":
        return value
    found = []
    for tokenizer in tokenizers:
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            found.append(template.strip())
    return Counter(found).most_common(1)[0][0] if found else None
