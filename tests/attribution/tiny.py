"""Tiny models and data built in code for the attribution core's tests."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from attribution import Batch
from attribution.fisher import sampled_cross_entropy
from attribution.lm import lm_fisher_loss, lm_loss

__all__ = [
    "classification_fisher_loss",
    "classification_loss",
    "cnn_batches",
    "lm_batches",
    "lm_fisher_loss",
    "lm_loss",
    "mlp_batches",
    "tiny_cnn",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_mlp",
    "tiny_neox",
    "tiny_opt",
    "tiny_qwen2",
]


def tiny_mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch.inputs
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def classification_fisher_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, _ = batch.inputs
    return sampled_cross_entropy(model(x))


def mlp_batches(
    n: int = 24, batch_size: int = 5, dtype=torch.float64, seed: int = 1
) -> list[Batch]:
    return _classification_batches((5,), n, batch_size, dtype, seed)


CNN_IMAGE = (2, 5, 6)
"""Channels, rows and columns of `tiny_cnn`'s input images."""
CNN_POSITIONS = 5 * 6
"""The most output positions of any of `tiny_cnn`'s convolutions (its first, padded: 5 × 6)."""


def tiny_cnn(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """Two Conv2d layers (padded 3 × 3; then 2 × 3, stride 2, dilated columns, padded columns)
    and a Linear head, on 2 × 5 × 6 images, 3 classes."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, (2, 3), stride=2, padding=(0, 2), dilation=(1, 2)),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 3, 3),
    ).to(dtype)


def cnn_batches(
    n: int = 24, batch_size: int = 5, dtype=torch.float64, seed: int = 1
) -> list[Batch]:
    return _classification_batches(CNN_IMAGE, n, batch_size, dtype, seed)


def _classification_batches(shape: tuple, n: int, batch_size: int, dtype, seed: int) -> list[Batch]:
    """n random inputs of `shape` with labels among 3 classes, providers cycling over three."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    providers = ["alpha", "beta", "gamma"]
    return [
        Batch(
            (x[i : i + batch_size], y[i : i + batch_size]),
            [f"ex{j}" for j in range(i, min(i + batch_size, n))],
            providers=[providers[j % 3] for j in range(i, min(i + batch_size, n))],
            shards=["s0"] * min(batch_size, n - i),
            token_counts=[1] * min(batch_size, n - i),
        )
        for i in range(0, n, batch_size)
    ]


def tiny_gpt2(dtype: torch.dtype = torch.float64, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=17,
        n_positions=16,
        n_embd=8,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    model = GPT2LMHeadModel(config).to(dtype)
    model.eval()
    return model


def tiny_opt(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """A 2-layer OPT: its decoder flattens (B, T, n) to (B·T, n) before the MLP layers."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=17, hidden_size=8, num_hidden_layers=2, ffn_dim=12, num_attention_heads=2,
        max_position_embeddings=16, word_embed_proj_dim=8, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, attn_implementation="eager",
    )  # fmt: skip
    return OPTForCausalLM(config).to(dtype).eval()


def tiny_llama(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """A 2-layer Llama with grouped-query attention and an untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=17, hidden_size=8, num_hidden_layers=2, intermediate_size=12,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        attn_implementation="eager",
    )  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_neox(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """A 2-layer GPT-NeoX (Pythia): fused query-key-value layer, parallel residual, untied
    head."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=17, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=12, max_position_embeddings=16, attn_implementation="eager",
    )  # fmt: skip
    return GPTNeoXForCausalLM(config).to(dtype).eval()


def tiny_qwen2(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """A 2-layer Qwen2: grouped-query attention with biased projections, head tied to the
    input embedding."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=17, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=12, max_position_embeddings=16,
        tie_word_embeddings=True, attn_implementation="eager",
    )  # fmt: skip
    return Qwen2ForCausalLM(config).to(dtype).eval()


def lm_batches(n: int = 10, batch_size: int = 4, seed: int = 2) -> list[Batch]:
    """Right-padded batches of random sequences of varying length (padding is exercised)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [
        torch.randint(1, 17, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
        for _ in range(n)
    ]
    batches = []
    for i in range(0, n, batch_size):
        part = seqs[i : i + batch_size]
        t = max(len(s) for s in part)
        ids = torch.zeros(len(part), t, dtype=torch.long)
        mask = torch.zeros(len(part), t, dtype=torch.long)
        for j, s in enumerate(part):
            ids[j, : len(s)] = s
            mask[j, : len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        batches.append(
            Batch(
                {"input_ids": ids, "attention_mask": mask, "labels": labels},
                [f"seq{i + j}" for j in range(len(part))],
                providers=[("p0", "p1")[(i + j) % 2] for j in range(len(part))],
                shards=["shard"] * len(part),
                token_counts=[len(s) for s in part],
                mask=mask,
            )
        )
    return batches
