"""The tokenizer an output gets: how many token ids it uses (so a merge whose embeddings are
smaller than its tokenizer is refused before any tensor is read), and the chat template a
config asks for with mergekit's ``chat_template`` key.

``chat_template`` is ``auto`` (the template most of the input models' tokenizers carry), one of
the names in ``CHAT_TEMPLATES``, or a Jinja template. The chosen template is written as
``chat_template.jinja`` and into ``tokenizer_config.json`` of the copied tokenizer.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Conversation formats by name, written for mergecore (roles: system, user, assistant).
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}"
        "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _ids(values: Iterable[Any]) -> list[int]:
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def token_count(directory: str | os.PathLike) -> int | None:
    """Number of token ids the tokenizer in ``directory`` can produce: 1 + its largest id.

    Ids come from ``tokenizer.json`` (the model's vocabulary: a token -> id map, or Unigram's
    list of pieces whose ids are their positions; and ``added_tokens``), ``vocab.json`` and
    ``added_tokens.json``, and the keys of ``tokenizer_config.json``'s
    ``added_tokens_decoder``. None when none of these says anything (e.g. a tokenizer that is
    only a sentencepiece ``tokenizer.model``)."""
    d = Path(directory)
    ids: list[int] = []
    fast = _read_json(d / "tokenizer.json")
    if isinstance(fast, dict):
        vocab = (fast.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            ids += _ids(vocab.values())
        elif isinstance(vocab, list) and vocab:
            ids.append(len(vocab) - 1)
        ids += _ids(t.get("id") for t in fast.get("added_tokens") or [] if isinstance(t, dict))
    for name in ("vocab.json", "added_tokens.json"):
        mapping = _read_json(d / name)
        if isinstance(mapping, dict):
            ids += _ids(mapping.values())
    config = _read_json(d / "tokenizer_config.json")
    if isinstance(config, dict) and isinstance(config.get("added_tokens_decoder"), dict):
        ids += [int(k) for k in config["added_tokens_decoder"] if str(k).isdigit()]
    return max(ids) + 1 if ids else None


def tokenizer_size_problems(directory: str | os.PathLike, vocab_size: int | None) -> list[str]:
    """The tokenizer to be copied from ``directory`` uses ids the merged embeddings
    (``vocab_size`` rows) do not have: the output would fail on those tokens."""
    count = token_count(directory)
    if vocab_size is None or count is None or count <= vocab_size:
        return []
    message = (f"the tokenizer of {str(directory)!r} has {count} tokens, but the merged "
               f"model's embeddings have {vocab_size} rows (vocab_size): token ids {vocab_size}"
               f"..{count - 1} would index past them. Take the tokenizer from a model with at "
               f"most {vocab_size} tokens (tokenizer_source: base, or that model's path), or "
               "leave tokenizer_source out, pass --no-copy-tokenizer and supply a matching "
               "tokenizer yourself")
    return [message]


def chat_template_problem(value: str) -> str | None:
    """Why ``value`` is not a usable ``chat_template`` (None when it is)."""
    if value == "auto" or value in CHAT_TEMPLATES:
        return None
    if "{{" not in value and "{%" not in value:
        return (f"{value!r} is neither 'auto', a template name ({', '.join(CHAT_TEMPLATES)}) "
                "nor a Jinja template")
    import jinja2

    try:
        jinja2.Environment().parse(value)
    except jinja2.TemplateSyntaxError as exc:
        return f"the Jinja template does not parse: {exc.message} (line {exc.lineno})"
    return None


def read_chat_template(directory: str | os.PathLike) -> str | None:
    """The chat template a model's tokenizer carries: ``chat_template.jinja``, else
    ``tokenizer_config.json``'s ``chat_template`` (a string, or named templates: 'default')."""
    d = Path(directory)
    try:
        text = (d / "chat_template.jinja").read_text(encoding="utf-8")
        return text.strip() or None
    except OSError:
        pass
    config = _read_json(d / "tokenizer_config.json")
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template.strip() or None if isinstance(template, str) else None


def resolve_chat_template(value: str, model_dirs: Iterable[str | os.PathLike]) -> str | None:
    """The template text for a valid ``chat_template`` value; for ``auto`` the one most of
    ``model_dirs`` carry (the first seen on a tie), None when none carries one."""
    if value == "auto":
        found = [t for t in map(read_chat_template, model_dirs) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return CHAT_TEMPLATES.get(value, value)


def write_chat_template(out_dir: str | os.PathLike, template: str) -> None:
    """Give the tokenizer in ``out_dir`` the chat template ``template``: ``chat_template.jinja``
    (what transformers reads first) and ``tokenizer_config.json``'s ``chat_template`` (what
    older versions read), replacing what the copied tokenizer had."""
    from mergecore.output_files import atomic_write_text

    out = Path(out_dir)
    atomic_write_text(out / "chat_template.jinja", template)
    (out / "chat_template.json").unlink(missing_ok=True)
    config_path = out / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.exists() else None
    config = config if isinstance(config, dict) else {}
    config["chat_template"] = template
    atomic_write_text(config_path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
