"""The tokenizer an output gets: how many token ids it uses (so a merge whose embeddings are
smaller than its tokenizer is refused before any tensor is read), and the chat template a
config asks for with mergekit's ``chat_template`` key.

``chat_template`` is ``auto`` (the template most of the input models' tokenizers carry), one of
the names in ``CHAT_TEMPLATES`` (they render what mergekit 0.1.5's templates of those names
render; exaone without the whitespace mergekit's file leaks into the prompt), or a Jinja
template. The chosen template is written as ``chat_template.jinja`` and into
``tokenizer_config.json`` of the copied tokenizer.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _jinja(text: str) -> str:
    """A template written indented in this file, without the indentation."""
    return textwrap.dedent(text).strip()


# Conversation formats by name, mergecore's own Jinja, written to render exactly what mergekit
# 0.1.5's templates of the same name render (mergekit/_data/chat_templates/*.jinja under
# transformers' renderer), raising where they raise; exaone renders what mergekit's file means
# without the indentation it leaks into the prompt. Every tag trims the whitespace around it
# ({%- -%}), so the layout below never reaches the prompt, with or without trim_blocks and
# lstrip_blocks.
CHAT_TEMPLATES: dict[str, str] = {
    # <|im_start|>role\ncontent<|im_end|>\n per message, content as given
    "chatml": _jinja(r"""
        {%- for message in messages -%}
            {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
        {%- endfor -%}
        {%- if add_generation_prompt -%}
            {{- '<|im_start|>assistant\n' -}}
        {%- endif -%}
    """),
    # bos before the first message only; content trimmed; a newline after every <|eot_id|>
    "llama3": _jinja(r"""
        {%- for message in messages -%}
            {{- (bos_token if loop.first else '') + '<|start_header_id|>' + message['role']
                + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>\n' -}}
        {%- endfor -%}
        {%- if add_generation_prompt -%}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {%- endif -%}
    """),
    # <s> [INST] system\n\nuser [/INST] answer</s> [INST] user [/INST]: an optional first system
    # message goes into the first [INST]; then user and assistant must alternate, user first;
    # no generation prompt (the prompt ends with [/INST])
    "mistral": _jinja(r"""
        {%- if not messages -%}
            {{- raise_exception('mistral chat template: the conversation is empty') -}}
        {%- endif -%}
        {%- set skip = 1 if messages[0]['role'] == 'system' else 0 -%}
        {{- bos_token -}}
        {%- for message in messages[skip:] -%}
            {%- if message['role'] not in ('user', 'assistant')
                  or (message['role'] == 'user') != (loop.index0 is even) -%}
                {{- raise_exception('mistral chat template: after an optional first system '
                                    'message, roles must alternate user, assistant, user, ...') -}}
            {%- endif -%}
            {%- if message['role'] == 'user' -%}
                {{- ' [INST] ' + (messages[0]['content'] + '\n\n' if skip and loop.first else '')
                    + message['content'] + ' [/INST]' -}}
            {%- else -%}
                {{- ' ' + message['content'] + eos_token -}}
            {%- endif -%}
        {%- endfor -%}
    """),
    # the last system message (trimmed) and a blank line, then a header and the trimmed content
    # per user / assistant / user_context message, a blank line after each but the very last
    # message; '### Response:\n' as generation prompt unless the assistant spoke last
    "alpaca": _jinja(r"""
        {%- set headers = {'user': '### Instruction:\n', 'assistant': '### Response:\n',
                           'user_context': '### Input:\n'} -%}
        {%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}
        {{- ((systems | last)['content'] | trim if systems else '') + '\n\n' -}}
        {%- for message in messages -%}
            {%- if message['role'] in headers -%}
                {{- headers[message['role']] + message['content'] | trim -}}
                {%- if not loop.last -%}{{- '\n\n' -}}{%- endif -%}
            {%- endif -%}
        {%- endfor -%}
        {%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}
            {{- '### Response:\n' -}}
        {%- endif -%}
    """),
    # [|role|]content, then '\n' after a user message and '[|endofturn|]\n' after any other; an
    # empty system turn first when the conversation does not open with one
    "exaone": _jinja(r"""
        {%- for message in messages -%}
            {%- if loop.first and message['role'] != 'system' -%}
                {{- '[|system|][|endofturn|]\n' -}}
            {%- endif -%}
            {{- '[|' + message['role'] + '|]' + message['content']
                + ('\n' if message['role'] == 'user' else '[|endofturn|]\n') -}}
        {%- endfor -%}
        {%- if add_generation_prompt -%}
            {{- '[|assistant|]' -}}
        {%- endif -%}
    """),
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
