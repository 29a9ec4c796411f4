"""TransformerLens interop: ``to_hooked(model)`` -> a HookedTransformer that runs the model's sparse gates.

transformer-lens is an optional extra (``pip install 'spartan-cli[lens]'``; its 3.x series, which keeps
``HookedTransformer`` and runs on transformers 5 and numpy 2; 4.x replaced HookedTransformer). The weights
go through TransformerLens's own converters, unprocessed (no LayerNorm folding or centring, so logits match
the Hugging Face model's), and the config is built from the Hugging Face one, so nothing is read from the hub.
A gated model's gates become two permanent hooks per layer: ``hook_attn_scores`` (the scaled, causally
masked scores s) computes the deterministic gates M = 1[s + b > 0] (the checkpoint's gate kind and bias),
and ``hook_pattern`` returns P * M: the same A = P * M, no renormalisation, as spartan's attention.
Supported: GPT-2 and the Llama family (Llama, Qwen2, Mistral shapes without a sliding window in use).
Scopes that force gates (``gates_open`` ...) act on the spartan model, not on the hooked copy.
"""

from __future__ import annotations

import warnings

from spartan_cli.errors import ConfigError, ModelError


def _lens():
    try:
        import transformer_lens
        from transformer_lens import HookedTransformer  # noqa: F401  (removed in transformer-lens 4)
    except ImportError:
        raise ConfigError("to_hooked needs transformer-lens 3.x: pip install 'spartan-cli[lens]' (or pip install "
                          "'transformer-lens<4')") from None
    return transformer_lens


def hooked_config(config) -> dict:
    """The HookedTransformerConfig fields of a GPT-2 or Llama-family Hugging Face config."""
    kind = config.model_type
    if kind == "gpt2":
        return {"d_model": config.n_embd, "d_head": config.n_embd // config.n_head, "n_heads": config.n_head,
                "d_mlp": config.n_inner or 4 * config.n_embd, "n_layers": config.n_layer, "n_ctx": config.n_positions,
                "eps": config.layer_norm_epsilon, "d_vocab": config.vocab_size, "act_fn": config.activation_function,
                "normalization_type": "LN", "positional_embedding_type": "standard", "use_attn_scale": True,
                "scale_attn_by_inverse_layer_idx": bool(config.scale_attn_by_inverse_layer_idx),
                "original_architecture": "GPT2LMHeadModel"}
    if kind in ("llama", "qwen2", "mistral"):
        d_head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope = getattr(config, "rope_parameters", None) or {}
        base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        kv = config.num_key_value_heads
        return {"d_model": config.hidden_size, "d_head": d_head, "n_heads": config.num_attention_heads,
                "n_key_value_heads": kv if kv != config.num_attention_heads else None,
                "d_mlp": config.intermediate_size, "n_layers": config.num_hidden_layers,
                "n_ctx": min(config.max_position_embeddings, 8192), "eps": config.rms_norm_eps,
                "d_vocab": config.vocab_size, "act_fn": config.hidden_act, "normalization_type": "RMS",
                "positional_embedding_type": "rotary", "rotary_dim": d_head, "rotary_base": float(base),
                "rotary_adjacent_pairs": False, "final_rms": True, "gated_mlp": True,
                "original_architecture": {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                          "mistral": "MistralForCausalLM"}[kind]}
    raise ModelError(f"to_hooked supports gpt2 and llama-family models (llama, qwen2, mistral), not {kind!r}")


def _convert(model, cfg):
    from transformer_lens.pretrained import weight_conversions as wc

    convert = {"gpt2": wc.convert_gpt2_weights, "llama": wc.convert_llama_weights,
               "qwen2": wc.convert_qwen2_weights, "mistral": wc.convert_mistral_weights}[model.config.model_type]
    return convert(model, cfg)


def to_hooked(model, tokenizer=None):
    """A HookedTransformer with ``model``'s weights (unprocessed) and, if it is gated, its deterministic gates
    as hooks on every layer's ``hook_attn_scores`` / ``hook_pattern``. In eval mode, on the model's device."""
    _lens()
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from spartan_cli.gating.attention import gate_states, is_gated
    from spartan_cli.gating.gates import gate_kind

    param = next(model.parameters())
    fields = hooked_config(model.config)
    if fields.get("original_architecture") == "Qwen2ForCausalLM":
        fields["use_qk_norm"] = False
    cfg = HookedTransformerConfig(**fields, device=str(param.device), dtype=param.dtype)
    with warnings.catch_warnings():  # 3.x announces HookedTransformer's removal in 4.0
        warnings.simplefilter("ignore", DeprecationWarning)
        hooked = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=True)
    with torch.no_grad():
        hooked.load_and_process_state_dict(_convert(model, cfg), fold_ln=False, center_writing_weights=False,
                                           center_unembed=False, fold_value_biases=False,
                                           refactor_factored_attn_matrices=False)
    if is_gated(model):
        for layer, state in enumerate(gate_states(model)):
            _add_gate_hooks(hooked, layer, gate_kind(state.cfg.kind), state.cfg.bias)
    return hooked.eval()


def _add_gate_hooks(hooked, layer: int, kind, bias: float) -> None:
    kept = {}

    def gates_from_scores(scores, hook):  # (batch, head, q, k), -inf where a query may not read
        kept["gates"] = kind.deterministic(kind.logits(scores.float(), bias))
        return None

    def gated_pattern(pattern, hook):  # A = P * M, rows may sum to < 1
        return pattern * kept.pop("gates").to(pattern.dtype)

    hooked.add_hook(f"blocks.{layer}.attn.hook_attn_scores", gates_from_scores, is_permanent=True)
    hooked.add_hook(f"blocks.{layer}.attn.hook_pattern", gated_pattern, is_permanent=True)
