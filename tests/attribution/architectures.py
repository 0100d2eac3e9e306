"""Tiny random-initialised causal language models of the architectures people train, built in
code (nothing downloaded): two layers, width 8, a vocabulary of 17 (as `lm_batches` draws)."""

from __future__ import annotations

import torch
import transformers
from torch import nn

VOCAB, WIDTH, LAYERS, HEADS, FFN, POSITIONS = 17, 8, 2, 2, 12, 16

# (config class, model class, settings beyond the common ones)
ARCHITECTURES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 1}),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                {"num_key_value_heads": 1, "sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 1}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"num_key_value_heads": 1, "head_dim": 4}),
    "phi": ("PhiConfig", "PhiForCausalLM", {"partial_rotary_factor": 0.5}),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"rotary_pct": 0.5}),
    "opt": ("OPTConfig", "OPTForCausalLM",
            {"ffn_dim": FFN, "word_embed_proj_dim": WIDTH, "intermediate_size": None}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             {"n_embd": WIDTH, "n_layer": LAYERS, "n_head": HEADS, "n_positions": POSITIONS,
              "hidden_size": None, "num_hidden_layers": None, "num_attention_heads": None,
              "intermediate_size": None, "max_position_embeddings": None,
              "bos_token_id": 0, "eos_token_id": 0}),
}  # fmt: skip
MIXTURES: dict[str, tuple[str, str, dict]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {"num_key_value_heads": 1, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {"num_key_value_heads": 1, "num_experts": 4, "num_experts_per_tok": 2,
                   "moe_intermediate_size": 6, "shared_expert_intermediate_size": 6}),
}  # fmt: skip


def tiny_causal_lm(
    name: str,
    tied: bool,
    attention: str = "eager",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> nn.Module:
    """The architecture `name` (of `ARCHITECTURES` or `MIXTURES`), its head tied to the input
    embedding or not, without dropout, in eval mode."""
    config_name, model_name, extra = {**ARCHITECTURES, **MIXTURES}[name]
    settings = {
        "vocab_size": VOCAB, "hidden_size": WIDTH, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "intermediate_size": FFN,
        "max_position_embeddings": POSITIONS, "tie_word_embeddings": tied,
    }  # fmt: skip
    settings.update(extra)
    settings = {k: v for k, v in settings.items() if v is not None}
    for dropout in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop",
                    "attn_pdrop", "dropout", "activation_dropout"):  # fmt: skip
        settings.setdefault(dropout, 0.0)
    config = getattr(transformers, config_name)(**settings)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(dtype).eval()
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert (head.weight is embedding.weight) == tied, f"{name}: tie_word_embeddings={tied}"
    return model
