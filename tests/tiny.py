"""Tiny random models and a local word-level tokenizer, built from configs: no hub, no downloads.

``tiny_model(kind)`` returns ``(model, tokenizer)`` for ``kind`` in :data:`KINDS`. Models are float32,
eval mode, eager attention (Inseq's setting), seeded.
"""

from __future__ import annotations

import functools

import torch

WORDS = (
    'the', 'a', 'an', 'of', 'in', 'on', 'at', 'to', 'is', 'was', 'and', 'or', 'but', 'not', 'with', 'for',
    'from', 'by', 'as', 'it', 'he', 'she', 'they', 'we', 'you', 'i', 'cat', 'dog', 'house', 'tower', 'city',
    'paris', 'rome', 'london', 'france', 'italy', 'located', 'built', 'big', 'small', 'red', 'blue', 'green',
    'said', 'that', 'this', 'there', 'here', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight',
    'nine', 'ten', ',', '.', '!', '?',
)
SPECIALS = ("<unk>", "<pad>", "<s>", "</s>")
UNK, PAD, BOS, EOS = 0, 1, 2, 3
VOCAB = {tok: i for i, tok in enumerate((*SPECIALS, *WORDS))}
KINDS = ("gpt2", "llama", "t5", "bart", "marian")
DECODER_ONLY = ("gpt2", "llama")
ENCODER_DECODER = ("t5", "bart", "marian")


def _tokenizer(template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    if template == "bos":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    elif template == "eos":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def _config(kind: str):
    from transformers import BartConfig, GPT2Config, LlamaConfig, MarianConfig, T5Config

    v = len(VOCAB)
    common = {"vocab_size": v, "pad_token_id": PAD, "eos_token_id": EOS, "bos_token_id": BOS}
    if kind == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **common)
    if kind == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, **common)
    if kind == "t5":
        return T5Config(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, decoder_start_token_id=PAD,
                        **common)
    enc_dec = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
               "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
               "max_position_embeddings": 128, "decoder_start_token_id": BOS if kind == "bart" else PAD}
    if kind == "bart":
        return BartConfig(**enc_dec, **common)
    if kind == "marian":
        return MarianConfig(**enc_dec, scale_embedding=True, **common)
    raise ValueError(kind)


@functools.cache
def _state(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(1234)
    config = _config(kind)
    config._attn_implementation = "eager"
    auto = AutoModelForSeq2SeqLM if kind in ENCODER_DECODER else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # larger weights than the default init, so outputs are far from uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return config, model.state_dict()


def tiny_model(kind: str):
    """A fresh copy of the tiny ``kind`` model (same weights every call) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config, state = _state(kind)
    auto = AutoModelForSeq2SeqLM if kind in ENCODER_DECODER else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="eager")
    model.load_state_dict(state)
    model.eval()
    template = {"gpt2": None, "llama": "bos"}.get(kind, "eos")
    return model, _tokenizer(template)
