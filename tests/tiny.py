"""Tiny random causal LMs (hidden size 64, 2-4 blocks) and a tokenizer built offline."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

FAMILIES = ("llama", "gpt_neox", "qwen2", "gemma3", "gpt2")

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. A bee lives in a hive with thousands of others.",
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have? Answer: 3 + 5 = 8.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Rivers flow into the sea; glaciers carve valleys; volcanoes erupt along plate boundaries.",
] * 20


def build_tokenizer(*, bos: str | None = "<bos>", add_bos: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on a few sentences. ``add_bos`` makes it add BOS like Llama 3 does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<eos>"] + ([bos] if bos else [])
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    if add_bos and bos:
        from tokenizers import processors

        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<eos>", pad_token="<pad>")


def build_tiny_model(family: str, vocab_size: int, *, n_layers: int = 3, seed: int = 0):
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=n_layers, num_attention_heads=4)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, intermediate_size=128, num_key_value_heads=2,
                                             max_position_embeddings=256))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, intermediate_size=128, num_key_value_heads=2,
                                             max_position_embeddings=256))
    elif family == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**common, intermediate_size=128, max_position_embeddings=256))
    elif family == "gemma3":
        cfg = Gemma3TextConfig(**common, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                               max_position_embeddings=256, sliding_window=8,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention"][:n_layers]
                               + ["full_attention"] * max(0, n_layers - 3))
        model = Gemma3ForCausalLM(cfg)
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=n_layers, n_head=4,
                                           n_positions=256, bos_token_id=2, eos_token_id=1))
    else:
        raise ValueError(family)
    return model.float().eval()
