"""The output's tokenizer: a tokenizer larger than the merged embeddings is refused before
anything is written (and `mergecore verify` catches one), and mergekit's `chat_template` key
(a name, a Jinja template, or `auto`) reaches the copied tokenizer, where transformers uses it."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml

from mergecore import tokenizer as tk
from mergecore.cli import main
from mergecore.synthetic import make_family
from mergecore.verify import verify_output

CONVERSATION = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def mixed_vocab(tmp_path_factory):
    """base and ft2 with 256 tokens, ft1 with 258 (two added tokens, like a fine-tune that
    added a pad token)."""
    root = tmp_path_factory.mktemp("mixed_vocab")
    return [str(p) for p in make_family(root, n_models=3, hidden=32, layers=2,
                                        vocab_sizes=[256, 258, 256])]


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def _linear(models: list[str], **extra) -> dict:
    return {"merge_method": "linear", "dtype": "bfloat16",
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models], **extra}


def test_token_count_is_one_past_the_largest_id(mixed_vocab):
    base, ft1, _ = mixed_vocab
    for model in (base, ft1):
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        assert tk.token_count(model) == vocab  # the generator's tokenizers fill the vocabulary
    assert tk.token_count(Path(base) / "nowhere") is None


def test_token_count_reads_unigram_lists_and_added_tokens(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["a", -1.0], ["b", -2.0]]},
        "added_tokens": [{"id": 7, "content": "<pad>"}]}))
    assert tk.token_count(tmp_path) == 8
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"0": {}, "31999": {}, "32000": {}}}))
    assert tk.token_count(tmp_path) == 32001


def test_tokenizer_larger_than_the_merged_vocabulary_is_refused_before_writing(
        mixed_vocab, tmp_path, capsys):
    base, ft1, ft2 = mixed_vocab
    cfg = _write(tmp_path / "c.yml", _linear([ft1, ft2, base], tokenizer_source=ft1))
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"the tokenizer of {ft1!r} has 258 tokens" in err
    assert "embeddings have 256 rows" in err and "token ids 256..257" in err
    assert not out.exists()
    # tokenizer_source asks for that tokenizer whatever the flag (as in mergekit): refused too
    assert main(["merge", str(cfg), str(out), "--quiet", "--no-copy-tokenizer"]) == 1
    assert "has 258 tokens" in capsys.readouterr().err and not out.exists()
    # without a tokenizer_source, --no-copy-tokenizer writes none and the merge is fine
    cfg = _write(tmp_path / "c1.yml", _linear([ft1, ft2, base]))
    assert main(["merge", str(cfg), str(out), "--quiet", "--no-copy-tokenizer"]) == 0
    assert not (out / "tokenizer.json").exists()
    # ... and so is the base's tokenizer
    cfg = _write(tmp_path / "c2.yml", _linear([ft1, ft2, base], tokenizer_source="base",
                                                base_model=base))
    assert main(["merge", str(cfg), str(tmp_path / "out2"), "--quiet"]) == 0
    assert verify_output(tmp_path / "out2").ok


def test_verify_fails_an_output_whose_tokenizer_outgrows_vocab_size(mixed_vocab, tmp_path):
    base, ft1, ft2 = mixed_vocab
    cfg = _write(tmp_path / "c.yml", _linear([base, ft2]))
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "--quiet"]) == 0
    report = verify_output(out)
    assert report.ok and "tokenizer: 256 tokens, within vocab_size 256" in report.text()
    shutil.copyfile(Path(ft1) / "tokenizer.json", out / "tokenizer.json")
    report = verify_output(out)
    assert not report.ok
    assert "tokenizer: 258 tokens, but config.json's vocab_size is 256" in report.text()


def _rendered(out: Path) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    return tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)


def test_named_chat_template_is_written_and_used_by_transformers(small_family, tmp_path):
    base, ft1, _ = small_family
    cfg = _write(tmp_path / "c.yml", _linear([base, ft1], chat_template="chatml"))
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "--quiet"]) == 0
    assert (out / "chat_template.jinja").read_text() == tk.CHAT_TEMPLATES["chatml"]
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == \
        tk.CHAT_TEMPLATES["chatml"]
    assert _rendered(out) == "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"


def test_jinja_chat_template_is_written_as_given(small_family, tmp_path):
    base, ft1, _ = small_family
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    cfg = _write(tmp_path / "c.yml", _linear([base, ft1], chat_template=template))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 0
    assert _rendered(tmp_path / "out") == "[user] hello there\n"


def test_auto_chat_template_takes_the_one_most_inputs_carry(small_family, tmp_path):
    models = []
    for i, src in enumerate(small_family):
        dst = tmp_path / f"m{i}"
        shutil.copytree(src, dst)
        models.append(str(dst))
    plurality = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    (Path(models[1]) / "chat_template.jinja").write_text(plurality)
    config = json.loads((Path(models[2]) / "tokenizer_config.json").read_text())
    config["chat_template"] = plurality
    (Path(models[2]) / "tokenizer_config.json").write_text(json.dumps(config))
    cfg = _write(tmp_path / "c.yml", _linear(models, chat_template="auto"))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 0
    assert _rendered(tmp_path / "out") == "<hello there>"
    # no input carries one: the copied tokenizer stays as it was
    cfg = _write(tmp_path / "c2.yml", _linear(list(small_family), chat_template="auto"))
    assert main(["merge", str(cfg), str(tmp_path / "out2"), "--quiet"]) == 0
    assert not (tmp_path / "out2" / "chat_template.jinja").exists()


@pytest.mark.parametrize("template, message", [
    ("chatmlx", ("'chatmlx' is neither 'auto', a template name "
                 "(chatml, llama3, mistral, alpaca, exaone)")),
    ("{% for m in messages %}{{ m }}", "the Jinja template does not parse"),
])
def test_bad_chat_template_is_a_config_error(small_family, tmp_path, capsys, template, message):
    base, ft1, _ = small_family
    cfg = _write(tmp_path / "c.yml", _linear([base, ft1], chat_template=template))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "chat_template" in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_chat_template_without_a_tokenizer_copy_is_a_warning(small_family, tmp_path, capsys):
    base, ft1, _ = small_family
    cfg = _write(tmp_path / "c.yml", _linear([base, ft1], chat_template="chatml"))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet", "--no-copy-tokenizer"]) == 0
    assert "chat_template is ignored: with --no-copy-tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["base", "ft1"])
def test_a_tokenizer_source_writes_its_tokenizer_even_with_no_copy_tokenizer(
        small_family, tmp_path, capsys, source):
    """mergekit 0.1.5 builds and saves the tokenizer a tokenizer_source names whatever
    --no-copy-tokenizer says; mergecore writes it too, and says the flag had no effect."""
    from mergecore.testing.mergekit_harness import run_mergekit_yaml

    base, ft1, _ = small_family
    doc = _linear([base, ft1], base_model=base,
                  tokenizer_source="base" if source == "base" else ft1)
    cfg = _write(tmp_path / "c.yml", doc)
    ours = tmp_path / "ours"
    assert main(["merge", str(cfg), str(ours), "--quiet", "--no-copy-tokenizer"]) == 0
    assert "--no-copy-tokenizer has no effect" in capsys.readouterr().err
    theirs = run_mergekit_yaml(cfg, tmp_path / "theirs", extra_args=["--no-copy-tokenizer"])
    for out in (ours, theirs):
        assert (out / "tokenizer.json").is_file(), sorted(p.name for p in out.iterdir())
    donor = Path(base if source == "base" else ft1)
    assert tk.token_count(ours) == tk.token_count(donor) == tk.token_count(theirs)
    assert verify_output(ours).ok


# --- the named chat templates render what mergekit 0.1.5's templates of the same name render

BOS, EOS = "<s>", "</s>"
CONTENTS = ["hello there", "  leading spaces", "trailing spaces  ", "\nnewline first",
            "newline last\n", " \n both ends \n ", "two\nlines", "", "tab\there ok"]


def _conversations() -> list[list[dict]]:
    """System first or not, one to five user turns, ending with the user or the assistant, with
    contents carrying leading/trailing spaces and newlines; variants with a user_context
    message, several or misplaced system messages, roles mistral refuses, and edge cases."""
    rng = random.Random(1234)

    def msg(role: str) -> dict:
        return {"role": role, "content": rng.choice(CONTENTS)}

    out: list[list[dict]] = []
    for _ in range(3):
        for system in (False, True):
            for turns in range(1, 6):
                for answered in (False, True):
                    roles = ["system"] * system + ["user", "assistant"] * turns
                    roles = roles if answered else roles[:-1]
                    out.append([msg(r) for r in roles])
                    # a user_context message after a user's (alpaca's ### Input:)
                    i = roles.index("user") + 1
                    out.append([msg(r) for r in roles[:i] + ["user_context"] + roles[i:]])
    for roles in ([], ["system"], ["assistant"], ["assistant", "user"], ["user", "user"],
                  ["system", "assistant"], ["user", "system", "assistant"],
                  ["system", "user", "assistant", "system", "user"], ["user", "tool"],
                  ["system", "system", "user"], ["user_context"], ["user", "assistant", "tool"],
                  ["user", "assistant", "assistant"]):
        out.append([msg(r) for r in roles])
    return out


CONVERSATIONS = _conversations()
# conversations mergekit's mistral template rejects (mergecore's must reject them too)
MISTRAL_REJECTS = [
    [], [{"role": "assistant", "content": "a"}],
    [{"role": "user", "content": "u"}, {"role": "user", "content": "u"}],
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
    [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}],
    [{"role": "user", "content": "u"}, {"role": "user_context", "content": "c"}],
    [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
     {"role": "tool", "content": "t"}],
]


def _transformers_render(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    """The prompt transformers' apply_chat_template renders (its sandboxed Jinja environment,
    trim_blocks and lstrip_blocks, raise_exception), bos/eos tokens given."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:  # transformers before render_jinja_template
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=BOS, eos_token=EOS)
    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=template,
        add_generation_prompt=add_generation_prompt, bos_token=BOS, eos_token=EOS)
    return rendered[0]


def _outcome(render, *args) -> str | None:
    """The rendered string, None when rendering raises."""
    try:
        return render(*args)
    except Exception:  # noqa: BLE001 - jinja2's errors, TypeError, ...: any failure counts
        return None


def _mergekit_template(name: str) -> str:
    pytest.importorskip("mergekit")
    import importlib.resources

    from mergekit._data import chat_templates

    path = importlib.resources.files(chat_templates).joinpath(f"{name}.jinja")
    if not path.is_file():
        pytest.skip(f"this mergekit has no {name}.jinja")
    return path.read_text()  # as mergekit's _set_chat_template reads it


def _without_layout(template: str) -> str:
    """exaone only: mergekit's exaone.jinja puts each tag on its own, indented line, and
    transformers' renderer keeps the indentation before each {{ }} and the newline after it, so
    its prompt has leading spaces, blank lines and a line break between a message's content
    and its [|endofturn|]. mergecore renders what the file means: the file with that layout
    removed (every line stripped and the lines joined; each line holds whole tags, so no string
    literal changes), which must render exactly mergecore's prompt. The prompt of the file as
    it is must still agree once all whitespace is removed."""
    return "".join(line.strip() for line in template.splitlines())


def _no_whitespace(text: str | None) -> str | None:
    return None if text is None else "".join(text.split())


@pytest.mark.parametrize("name", sorted(tk.CHAT_TEMPLATES))
def test_named_chat_templates_render_as_mergekits(name):
    theirs = _mergekit_template(name)
    ours = tk.CHAT_TEMPLATES[name]
    if name == "exaone":
        as_is, theirs = theirs, _without_layout(theirs)
    compared = rejected = 0
    for messages in CONVERSATIONS:
        for generation_prompt in (False, True):
            args = (messages, generation_prompt)
            expected = _outcome(_transformers_render, theirs, *args)
            got = _outcome(_transformers_render, ours, *args)
            assert got == expected, (name, args, got, expected)  # None: both raise
            if name == "exaone":
                assert _no_whitespace(_outcome(_transformers_render, as_is, *args)) == \
                    _no_whitespace(got), (args, got)
            compared += expected is not None
            rejected += expected is None
    # mistral rejects what is not [system,] user, assistant, user, ...; alpaca an empty
    # conversation with a generation prompt (messages[-1] is undefined); the others nothing
    assert compared >= 100 and rejected <= (len(CONVERSATIONS) * 2 - 100 if name == "mistral"
                                            else int(name == "alpaca")), (compared, rejected)
    if name == "mistral":
        for messages in MISTRAL_REJECTS:
            for generation_prompt in (False, True):
                assert _outcome(_transformers_render, theirs, messages, generation_prompt) is None
                assert _outcome(_transformers_render, ours, messages, generation_prompt) is None


@pytest.mark.parametrize("name", sorted(tk.CHAT_TEMPLATES))
def test_named_chat_templates_ignore_their_layout(name):
    """Every tag trims its surroundings, so a plain Jinja environment (no trim_blocks or
    lstrip_blocks, the defaults outside transformers) renders the same prompt."""
    import jinja2

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    for environment in (jinja2.Environment(), jinja2.Environment(keep_trailing_newline=True),
                        jinja2.Environment(trim_blocks=True, lstrip_blocks=True)):
        environment.globals["raise_exception"] = raise_exception
        template = environment.from_string(tk.CHAT_TEMPLATES[name])
        for messages in CONVERSATIONS + MISTRAL_REJECTS:
            for generation_prompt in (False, True):
                kwargs = {"messages": messages, "add_generation_prompt": generation_prompt,
                          "bos_token": BOS, "eos_token": EOS}
                assert _outcome(template.render, kwargs) == \
                    _outcome(_transformers_render, tk.CHAT_TEMPLATES[name], messages,
                             generation_prompt), (name, messages, generation_prompt)


TALK = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi\n"},
        {"role": "assistant", "content": " Hello."}, {"role": "user", "content": "Bye"}]


@pytest.mark.parametrize("name, expected", [
    ("chatml", ("<|im_start|>system\n Be brief. <|im_end|>\n<|im_start|>user\nHi\n<|im_end|>\n"
                "<|im_start|>assistant\n Hello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                "<|im_start|>assistant\n")),
    ("llama3", ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n"
                "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\n"
                "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\n"
                "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\n"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")),
    ("mistral", "<s> [INST]  Be brief. \n\nHi\n [/INST]  Hello.</s> [INST] Bye [/INST]"),
    ("alpaca", ("Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello.\n\n"
                "### Instruction:\nBye### Response:\n")),
    ("exaone", ("[|system|] Be brief. [|endofturn|]\n[|user|]Hi\n\n[|assistant|] Hello."
                "[|endofturn|]\n[|user|]Bye\n[|assistant|]")),
])
def test_named_chat_templates_render_these_prompts(name, expected):
    assert _transformers_render(tk.CHAT_TEMPLATES[name], TALK, True) == expected
    if name == "exaone":  # an empty system turn opens a conversation without one
        assert _transformers_render(tk.CHAT_TEMPLATES[name], TALK[1:2], False) == \
            "[|system|][|endofturn|]\n[|user|]Hi\n\n"


def test_processor_files_travel_with_the_tokenizer(small_family, tmp_path):
    """A vision model's processor files (mergekit copies them from the base for those
    architectures) are copied with the tokenizer, recorded in the manifest (verify checks
    them), and count as merge output for --overwrite."""
    base_src, ft1, _ = small_family
    base = tmp_path / "base"
    shutil.copytree(base_src, base)
    files = {"preprocessor_config.json": {"image_processor_type": "Qwen2VLImageProcessor"},
             "processor_config.json": {"processor_class": "Qwen2VLProcessor"}}
    for name, content in files.items():
        (base / name).write_text(json.dumps(content))
    cfg = _write(tmp_path / "c.yml", _linear([str(base), ft1]))
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "--quiet"]) == 0
    for name, content in files.items():
        assert json.loads((out / name).read_text()) == content
    assert verify_output(out).ok
    (out / "processor_config.json").write_text("{}")
    assert not verify_output(out).ok  # recorded: an edit is caught
    assert main(["merge", str(cfg), str(out), "--overwrite", "--quiet"]) == 0
