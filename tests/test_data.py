"""Text sources -> packed token blocks: formats, packing, the split, and every user-facing error."""

from __future__ import annotations

import json

import pytest
import torch

from spartan_cli.blocks import TokenBlocks
from spartan_cli.data import DataConfig, load_blocks, pack_tokens, read_texts, split_blocks, tokenize_texts
from spartan_cli.errors import ConfigError, DataError

DOCS = ["The first document is short.", "A second one, about a river and a mill.", "Third: the end."]


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def _joined(tok, docs: list[str]) -> list[int]:
    out: list[int] = []
    for i, doc in enumerate(docs):
        out += ([tok.eos_token_id] if i else []) + _ids(tok, doc)
    return out


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(blocks: TokenBlocks) -> list[tuple[int, ...]]:
    return sorted(tuple(r) for r in blocks.input_ids.tolist())


# ------------------------------------------------------------------------------------------- config


def test_config_round_trips_and_rejects_unknown_keys(tmp_path):
    cfg = DataConfig(source=tmp_path / "x.txt", seq_len=16, heldout_blocks=2, max_tokens=1000)
    assert cfg.source == str(tmp_path / "x.txt")  # a Path is accepted and stored as str
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"unknown data config key\(s\) \['seqlen'\].*valid keys: \['source'"):
        DataConfig.from_dict({"source": "x.txt", "seqlen": 16})
    with pytest.raises(ConfigError, match="needs 'source'"):
        DataConfig.from_dict({"seq_len": 16})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seq_len": 0}, "seq_len must be >= 2, got 0"),
        ({"seq_len": True}, "seq_len must be an integer >= 2, got True"),
        ({"heldout_blocks": 0}, "heldout_blocks must be >= 1, got 0"),
        ({"max_train_blocks": -3}, "max_train_blocks must be >= 1, got -3"),
        ({"max_tokens": "lots"}, "max_tokens must be an integer >= 1, got 'lots'"),
        ({"seed": 1.5}, "seed must be an integer >= 0, got 1.5"),
        ({"text_field": ""}, "text_field must be a non-empty string"),
        ({"seq_len": 16, "heldout_blocks": 3, "max_tokens": 50}, "max_tokens=50 is fewer than the 64 tokens"),
    ],
)
def test_config_validation_names_field_and_value(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DataConfig(source="x.txt", **kwargs)


# ------------------------------------------------------------------------------------------ packing


def test_pack_tokens_drops_the_remainder_and_scores_everything():
    blocks = pack_tokens(torch.arange(23), 5)
    assert blocks.input_ids.shape == (4, 5) and blocks.input_ids.dtype == torch.int64
    assert blocks.input_ids[-1].tolist() == [15, 16, 17, 18, 19]
    assert torch.equal(blocks.labels, blocks.input_ids)


def test_split_is_disjoint_complete_seeded_and_capped():
    blocks = pack_tokens(torch.arange(40 * 4), 4)  # block i starts with token 4 * i: rows are unique
    s = split_blocks(blocks, heldout_blocks=7, seed=3)
    held, train = s.heldout.input_ids[:, 0] // 4, s.train.input_ids[:, 0] // 4
    assert len(held) == 7 and len(train) == 33
    assert set(held.tolist()).isdisjoint(train.tolist())
    assert sorted(held.tolist() + train.tolist()) == list(range(40))
    assert held.tolist() == sorted(held.tolist())  # held-out blocks stay in corpus order
    assert train.tolist() != sorted(train.tolist())  # training blocks are shuffled
    again = split_blocks(blocks, heldout_blocks=7, seed=3)
    assert torch.equal(again.heldout.input_ids, s.heldout.input_ids)
    assert torch.equal(again.train.input_ids, s.train.input_ids)
    other = split_blocks(blocks, heldout_blocks=7, seed=4)
    assert not torch.equal(other.heldout.input_ids, s.heldout.input_ids)
    capped = split_blocks(blocks, heldout_blocks=7, seed=3, max_train_blocks=5)
    assert torch.equal(capped.heldout.input_ids, s.heldout.input_ids)  # the cap never moves held-out blocks
    assert torch.equal(capped.train.input_ids, s.train.input_ids[:5])


def test_tokenize_joins_documents_with_eos_and_stops_at_max_tokens(tiny_tokenizer):
    ids = tokenize_texts(DOCS, tiny_tokenizer)
    assert ids.tolist() == _joined(tiny_tokenizer, DOCS)
    assert tokenize_texts(DOCS, tiny_tokenizer, max_tokens=10).tolist() == ids[:10].tolist()

    pulled = []

    def lazy():
        for doc in DOCS * 1000:
            pulled.append(doc)
            yield doc

    tokenize_texts(lazy(), tiny_tokenizer, max_tokens=10)
    assert len(pulled) < 100  # reading stopped early


def test_tokenizer_without_eos_joins_documents_directly(tiny_tokenizer):
    class NoEos:
        eos_token_id = None

        def __call__(self, texts, **kwargs):
            return tiny_tokenizer(texts, **kwargs)

    ids = tokenize_texts(DOCS, NoEos())
    assert ids.tolist() == sum((_ids(tiny_tokenizer, d) for d in DOCS), [])


# ---------------------------------------------------------------------------------------- formats


def test_txt_file_gives_blocks_of_seq_len(tiny_text_file, tiny_tokenizer):
    cfg = DataConfig(source=str(tiny_text_file), seq_len=16, heldout_blocks=4)
    s = load_blocks(cfg, tiny_tokenizer)
    n_tokens = len(_ids(tiny_tokenizer, tiny_text_file.read_text()))  # one file is one document
    assert s.heldout.input_ids.shape == (4, 16)
    assert s.train.input_ids.shape == (n_tokens // 16 - 4, 16)
    assert torch.equal(s.train.labels, s.train.input_ids) and torch.equal(s.heldout.labels, s.heldout.input_ids)
    all_blocks = pack_tokens(torch.tensor(_ids(tiny_tokenizer, tiny_text_file.read_text())), 16)
    assert _rows(all_blocks) == sorted(_rows(s.train) + _rows(s.heldout))


def test_loading_is_deterministic_and_seeded(tiny_text_file, tiny_tokenizer):
    cfg = DataConfig(source=str(tiny_text_file), seq_len=16, heldout_blocks=4, seed=1)
    a, b = load_blocks(cfg, tiny_tokenizer), load_blocks(cfg, tiny_tokenizer)
    assert torch.equal(a.train.input_ids, b.train.input_ids)
    assert torch.equal(a.heldout.input_ids, b.heldout.input_ids)
    c = load_blocks(DataConfig(source=str(tiny_text_file), seq_len=16, heldout_blocks=4, seed=2), tiny_tokenizer)
    assert not torch.equal(a.heldout.input_ids, c.heldout.input_ids)


def test_max_train_blocks_and_max_tokens(tiny_text_file, tiny_tokenizer):
    s = load_blocks(DataConfig(source=str(tiny_text_file), seq_len=16, heldout_blocks=4, max_train_blocks=3),
                    tiny_tokenizer)
    assert len(s.train) == 3 and len(s.heldout) == 4
    s = load_blocks(DataConfig(source=str(tiny_text_file), seq_len=16, heldout_blocks=4, max_tokens=100),
                    tiny_tokenizer)
    assert len(s.train) + len(s.heldout) == 100 // 16


def test_jsonl_with_custom_field_joins_records_with_eos(tmp_path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"body": d, "id": i} for i, d in enumerate(DOCS)])
    cfg = DataConfig(source=str(path), text_field="body", seq_len=2, heldout_blocks=1)
    assert list(read_texts(cfg)) == DOCS
    s = load_blocks(cfg, tiny_tokenizer)
    want = _joined(tiny_tokenizer, DOCS)
    assert len(s.train) + len(s.heldout) == len(want) // 2
    assert _rows(s.train) + _rows(s.heldout) != [] and sorted(_rows(s.train) + _rows(s.heldout)) == _rows(
        pack_tokens(torch.tensor(want), 2))


def test_json_array_and_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "a.json").write_text(json.dumps([{"text": d} for d in DOCS]), encoding="utf-8")
    assert list(read_texts(DataConfig(source=str(tmp_path / "a.json")))) == DOCS
    pq.write_table(pa.table({"text": DOCS, "n": [1, 2, 3]}), tmp_path / "p.parquet")
    assert list(read_texts(DataConfig(source=str(tmp_path / "p.parquet")))) == DOCS


def test_directory_reads_supported_files_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("from b\n")
    (tmp_path / "a.txt").write_text("from a\nsecond line of a\n")
    _write_jsonl(tmp_path / "c.jsonl", [{"text": "c one"}, {"text": "c two"}])
    (tmp_path / "notes.csv").write_text("ignored,yes\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.txt").write_text("not searched\n")
    texts = list(read_texts(DataConfig(source=str(tmp_path))))
    assert texts == ["from a\nsecond line of a\n", "from b\n", "c one", "c two"]


def test_blank_documents_and_nulls_are_skipped(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, {"text": "  "}, {"text": None}, {"text": "two"}])
    assert list(read_texts(DataConfig(source=str(path)))) == ["one", "two"]


def test_local_loading_writes_nothing_to_the_datasets_cache(tmp_path, monkeypatch, tiny_text_file, tiny_tokenizer):
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    load_blocks(DataConfig(source=str(tiny_text_file), seq_len=16, heldout_blocks=2), tiny_tokenizer)
    written = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert written == []


@pytest.mark.parametrize("name", ["tiny_gpt2_dir", "tiny_neox_dir", "tiny_llama_dir"])
def test_blocks_feed_the_tiny_models(name, request, tiny_text_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = request.getfixturevalue(name)
    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert len(tok) <= model.config.vocab_size
    max_positions = model.config.max_position_embeddings
    s = load_blocks(DataConfig(source=str(tiny_text_file), seq_len=32, heldout_blocks=2), tok,
                    max_positions=max_positions)
    with torch.no_grad():
        loss = model(input_ids=s.heldout.input_ids, labels=s.heldout.labels).loss
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(320.0)).item()) < 1.0  # ~uniform
    if name == "tiny_llama_dir":
        assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)


# ------------------------------------------------------------------------------------------ errors


def _error(cfg: DataConfig, tok, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_blocks(cfg, tok, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path, tiny_tokenizer):
    msg = _error(DataConfig(source=str(tmp_path / "nope.txt")), tiny_tokenizer)
    assert "nope.txt' does not exist" in msg and ".jsonl" in msg


def test_unsupported_extension(tmp_path, tiny_tokenizer):
    (tmp_path / "d.csv").write_text("text\nhello\n")
    msg = _error(DataConfig(source=str(tmp_path / "d.csv")), tiny_tokenizer)
    assert "unsupported extension '.csv'" in msg and "supported: .json, .jsonl, .parquet, .txt" in msg


def test_directory_without_supported_files(tmp_path, tiny_tokenizer):
    (tmp_path / "d.csv").write_text("text\nhello\n")
    msg = _error(DataConfig(source=str(tmp_path)), tiny_tokenizer)
    assert "holds no .json, .jsonl, .parquet, .txt files" in msg and "found: d.csv" in msg


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.txt", ""), ("e.txt", "\n  \n")])
def test_empty_files(tmp_path, tiny_tokenizer, name, content):
    (tmp_path / name).write_text(content)
    msg = _error(DataConfig(source=str(tmp_path / name)), tiny_tokenizer)
    assert "is empty: it holds no rows" in msg if name.endswith(".jsonl") else "empty or whitespace only" in msg


def test_missing_text_field_names_the_fields_present(tmp_path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"content": "x", "id": 1}])
    msg = _error(DataConfig(source=str(path)), tiny_tokenizer)
    assert "no field 'text'" in msg and "fields present: ['content', 'id']" in msg and "--text-field" in msg


def test_non_text_field(tmp_path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": 1, "body": "x"}])
    msg = _error(DataConfig(source=str(path)), tiny_tokenizer)
    assert "field 'text'" in msg and "holds int values, not text" in msg


def test_field_with_only_blank_text(tmp_path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "", "body": "x"}, {"text": " ", "body": "y"}])
    msg = _error(DataConfig(source=str(path)), tiny_tokenizer)
    assert "field 'text'" in msg and "holds no text in any of its 2 rows" in msg and "['body', 'text']" in msg


def test_malformed_jsonl_and_non_utf8(tmp_path, tiny_tokenizer):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops\n')
    assert "cannot read" in _error(DataConfig(source=str(tmp_path / "bad.jsonl")), tiny_tokenizer)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00binary")
    assert "is not UTF-8 text" in _error(DataConfig(source=str(tmp_path / "bin.txt")), tiny_tokenizer)


def test_too_few_tokens_says_found_and_needed(tmp_path, tiny_tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("Only a few words here.")
    n = len(_ids(tiny_tokenizer, path.read_text()))
    msg = _error(DataConfig(source=str(path), seq_len=16, heldout_blocks=4), tiny_tokenizer)
    assert f"gave {n} tokens" in msg and "5 blocks of seq_len 16 need 80" in msg and "--seq-len" in msg


def test_seq_len_beyond_max_positions(tiny_text_file, tiny_tokenizer):
    msg = _error(DataConfig(source=str(tiny_text_file), seq_len=512), tiny_tokenizer, max_positions=256)
    assert "seq_len 512 exceeds the model's max_positions 256" in msg and "--seq-len 256" in msg


def _hub_offline(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("source", ["wikitext", "someone/corpus"])
def test_unreachable_hub_suggests_a_local_file(monkeypatch, tiny_tokenizer, source):
    _hub_offline(monkeypatch)
    msg = _error(DataConfig(source=source, hub_config="cfg"), tiny_tokenizer)
    assert f"'{source}' is not a local path and the Hugging Face Hub is unreachable" in msg
    assert "--data ./file.txt" in msg


@pytest.mark.parametrize(
    "raised, expected",
    [
        (ConnectionError("Couldn't reach 'x' on the Hub (LocalEntryNotFoundError)"), "Hub is unreachable"),
        ("not_found", "Hub dataset 'x' was not found"),
        (ValueError("Bad split: dev. Available splits: ['train']"), "split 'dev': Bad split: dev"),
    ],
)
def test_hub_failures_become_data_errors(monkeypatch, tiny_tokenizer, raised, expected):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    if raised == "not_found":
        raised = DatasetNotFoundError("Dataset 'x' doesn't exist on the Hub or cannot be accessed.")

    def fake_load_dataset(*args, **kwargs):
        assert kwargs["streaming"] is True and "trust_remote_code" not in kwargs
        raise raised

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert expected in _error(DataConfig(source="x", split="dev"), tiny_tokenizer)


def test_hub_dataset_streams_until_max_tokens(monkeypatch, tiny_tokenizer):
    import datasets

    seen = []

    def fake_load_dataset(name, config, *, split, streaming, **kwargs):
        assert (name, config, split, streaming) == ("owner/corpus", "en", "validation", True)

        def rows():
            for i in range(10_000):
                seen.append(i)
                yield {"text": f"Document number {i} says hello.", "id": i}

        return rows()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(source="owner/corpus", hub_config="en", split="validation", seq_len=8, heldout_blocks=2,
                     max_tokens=64)
    s = load_blocks(cfg, tiny_tokenizer)
    assert len(s.train) + len(s.heldout) == 8
    assert len(seen) < 200


# -------------------------------------------------------------------------------------- real assets


@pytest.mark.real
def test_shakespeare_with_the_gpt2_tokenizer(shakespeare_dir, gpt2_tokenizer_dir):
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_dir)
    cfg = DataConfig(source=str(shakespeare_dir / "texts"), seq_len=128, heldout_blocks=8, max_tokens=20_000)
    s = load_blocks(cfg, tok, max_positions=1024)
    assert len(s.train) + len(s.heldout) == 20_000 // 128 and len(s.heldout) == 8
    assert int(s.train.input_ids.max()) < 50257


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_loss_on_hamlet(smollm2_dir, shakespeare_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    cfg = DataConfig(source=str(shakespeare_dir / "hamlet.txt"), seq_len=128, heldout_blocks=4)
    s = load_blocks(cfg, tok, max_positions=model.config.max_position_embeddings)
    with torch.no_grad():
        loss = model(input_ids=s.heldout.input_ids, labels=s.heldout.labels).loss  # 4 x 128 tokens
    assert 2.0 < loss.item() < 5.0, loss.item()  # pretrained; random tokens would give ~13
