"""Tiny transformers models for tests, built offline from configs.

Every builder is deterministic (seeded), fp32, a few MB at most, and never touches the
network. Other test files import these helpers: keep the names and signatures stable.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["tiny_llama", "tiny_moe", "tiny_tied", "input_ids", "VOCAB", "HIDDEN", "LAYERS"]

VOCAB = 128  # vocabulary size of every tiny model
HIDDEN = 32  # hidden size of every tiny model
LAYERS = 2  # decoder layers of every tiny model


def _seeded(build, seed: int, device: torch.device | str | None = None) -> nn.Module:
    """Runs ``build()`` with torch's global RNG seeded (restored afterwards), under ``device``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device is None:
            model = build()
        else:
            with torch.device(device):
                model = build()
    model.eval()
    return model


def _llama_config(tie: bool, layers: int = LAYERS):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg._attn_implementation = "eager"
    return cfg


def tiny_llama(tie: bool = False, seed: int = 0, device: torch.device | str | None = None,
               layers: int = LAYERS) -> nn.Module:
    """A 2-layer ``LlamaForCausalLM`` (hidden 32, vocab 128, GQA 4/2 heads), fp32, eval mode.

    Args:
        tie: tie ``lm_head.weight`` to ``model.embed_tokens.weight``.
        seed: the weights are a pure function of the seed.
        device: build the tensors there (``"meta"`` for a model without bytes).
        layers: decoder layers (more layers make each one a smaller share of the model).
    """
    from transformers import LlamaForCausalLM

    model = _seeded(lambda: LlamaForCausalLM(_llama_config(tie, layers)), seed, device)
    model.to(torch.float32)
    if tie:
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight, "tie_word_embeddings did not tie"
    else:
        assert model.lm_head.weight is not model.model.embed_tokens.weight
    return model


def tiny_tied(seed: int = 0, device: torch.device | str | None = None) -> nn.Module:
    """:func:`tiny_llama` with ``tie_word_embeddings=True``: ``lm_head.weight is embed_tokens.weight``."""
    model = tiny_llama(tie=True, seed=seed, device=device)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _moe_builders():
    """(config class, model class, kwargs) candidates, tried in order."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    out = []
    if hasattr(transformers, "MixtralForCausalLM"):
        out.append((transformers.MixtralConfig, transformers.MixtralForCausalLM,
                    dict(common, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)))
    if hasattr(transformers, "Qwen2MoeForCausalLM"):
        out.append((transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                    dict(common, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=48,
                         num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)))
    if hasattr(transformers, "Qwen3MoeForCausalLM"):
        out.append((transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                    dict(common, intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                         num_experts_per_tok=2, decoder_sparse_step=1, head_dim=8)))
    return out


def tiny_moe(seed: int = 0, device: torch.device | str | None = None) -> nn.Module:
    """A 2-layer mixture-of-experts causal LM (4 experts, top-2), fp32, eval mode.

    ``MixtralForCausalLM`` when this transformers version can build it, else
    ``Qwen2MoeForCausalLM`` or ``Qwen3MoeForCausalLM``. ``device`` as in :func:`tiny_llama`.
    """
    errors = []
    for cfg_cls, model_cls, kwargs in _moe_builders():
        try:
            cfg = cfg_cls(**kwargs)
            cfg._attn_implementation = "eager"
            model = _seeded(lambda: model_cls(cfg), seed, device)
        except Exception as e:  # try the next architecture
            errors.append(f"{model_cls.__name__}: {e!r}")
            continue
        model.to(torch.float32)
        return model
    raise RuntimeError("no MoE architecture could be built: " + "; ".join(errors))


def input_ids(batch: int = 2, seq: int = 8, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """A ``(batch, seq)`` int64 tensor of token ids in ``[3, vocab)`` (no pad/bos/eos), seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)
