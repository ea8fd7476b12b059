"""Tokenizers: a Hugging Face tokenizer from a local path, or `bytes`, a byte-level tokenizer
built in code (one token per byte plus bos/eos/pad) for tiny random-weight tests and demos."""

from __future__ import annotations

SPECIALS = ["<s>", "</s>", "<pad>"]


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def load_tokenizer(path: str | None, gguf_file: str | None = None):
    if path in (None, "bytes"):
        return byte_tokenizer()
    from transformers import AutoTokenizer

    from condense.train.model import local_path

    return AutoTokenizer.from_pretrained(local_path(path), gguf_file=gguf_file)
