"""Tiny random models built from configs, for fast core tests (no files, no network)."""

from __future__ import annotations

import torch

VOCAB = 61


def gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def neox(seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    return GPTNeoXForCausalLM(cfg).eval()


def _llama_shaped(config_cls, model_cls, seed: int, **extra):
    torch.manual_seed(seed)
    cfg = config_cls(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                     intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra)
    return model_cls(cfg).eval()


def llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _llama_shaped(LlamaConfig, LlamaForCausalLM, seed)


def qwen2(seed: int = 0):
    """Llama-shaped with q/k/v biases."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = _llama_shaped(Qwen2Config, Qwen2ForCausalLM, seed)
    with torch.no_grad():  # the init zeroes biases; random ones make the bias paths count in parity tests
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.1)
    return model


def mistral(seed: int = 0):
    """Llama-shaped with a sliding window (wider than every test sequence)."""
    from transformers import MistralConfig, MistralForCausalLM

    return _llama_shaped(MistralConfig, MistralForCausalLM, seed, sliding_window=32)


BUILDERS = {"gpt2": gpt2, "neox": neox, "llama": llama, "qwen2": qwen2, "mistral": mistral}


def logit_difference(logits, batch):
    """Mean over rows of logit(right) - logit(wrong) at the last position."""
    last = logits[:, -1]  # (batch, vocab)
    return (last.gather(1, batch.answers[:, :1]) - last.gather(1, batch.answers[:, 1:])).mean()


def contrast(rows: int = 8, pos: int = 8, seed: int = 0, corrupt: tuple[int, ...] = (2, 5)):
    """Random prompts whose corrupted twin differs at the ``corrupt`` positions; random right/wrong answers."""
    from spartan_cli.circuit import ContrastBatch

    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, VOCAB, (rows, pos), generator=g)
    corrupted = clean.clone()
    for p in corrupt:
        corrupted[:, p] = torch.randint(1, VOCAB, (rows,), generator=g)
    return ContrastBatch(clean, corrupted, torch.randint(1, VOCAB, (rows, 2), generator=g))

# the module whose input is the concatenation of per-head attention outputs, per architecture
OUT_PROJ = {"gpt2": lambda m, l: m.transformer.h[l].attn.c_proj,
            "neox": lambda m, l: m.gpt_neox.layers[l].attention.dense,
            "llama": lambda m, l: m.model.layers[l].self_attn.o_proj,
            "qwen2": lambda m, l: m.model.layers[l].self_attn.o_proj,
            "mistral": lambda m, l: m.model.layers[l].self_attn.o_proj}
