"""Tokenizers: the model's own (or --tokenizer_name), or a built-in byte-level one for fresh models.

The byte-level tokenizer needs no files and no network: every UTF-8 text maps to its bytes, one token
per byte, plus a single ``<|endoftext|>`` special token that separates packed documents.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..run.config import ModelConfig
from .hub import unreachable_hub_problem

END_OF_TEXT = "<|endoftext|>"
BYTE_VOCAB_SIZE = 257  # 256 byte symbols + END_OF_TEXT


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level tokenizer without merges: ids 0..255 are bytes, 256 is ``<|endoftext|>``.

    ``<|endoftext|>`` is the bos, eos and pad token. Encoding then decoding gives back any UTF-8 text exactly.
    """
    # Sorted so ids do not depend on the order in which the tokenizers library lists its alphabet.
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: token_id for token_id, symbol in enumerate(byte_symbols)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    """``--tokenizer_name`` or the model's own tokenizer; the byte-level one when neither is given.

    A tokenizer without a pad token gets its eos token as pad. Raises ValueError when loading fails
    or when the tokenizer has no eos token (packing needs one between documents).
    """
    name = model.tokenizer_name or model.model_name_or_path
    if name is None:
        return byte_level_tokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        # the model's own name: its folder holds the tokenizer too, and --tokenizer_name cannot bring the model
        flag = "--tokenizer_name" if model.tokenizer_name else "--model_name_or_path"
        unreachable = unreachable_hub_problem(name, err, flag)
        if unreachable:
            raise ValueError(f"could not load a tokenizer: {unreachable}") from None
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
        raise ValueError(f"could not load a tokenizer from {name!r}: {reason}. Pass --tokenizer_name with a local "
                         "tokenizer folder (one written by save_pretrained).") from err
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer {name!r} has no eos token, which separates documents packed into one "
                         "block; pass --tokenizer_name with a tokenizer that has one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
