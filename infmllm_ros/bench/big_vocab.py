"""Byte-level BPE tokenizers of real vocabulary sizes (32K, 128K, 152K), built offline in about a second.

No hub and no corpus big enough to train 128K merges here, so a few hundred merges are trained on robot
sentences and JSON actions (so actions encode in tens of tokens, not one per byte) and the rest are drawn at
random: every new token is the concatenation of two existing ones (a valid BPE merge list by construction),
mostly from printable ASCII, up to 16 characters (a move action takes 32 tokens). What matters
for constrained decoding is the size and shape of the vocabulary (many tokens mixing JSON punctuation, digits
and letters, as in Llama-3 / Qwen2 vocabularies), not its statistics.
Used by ``infmllm-bench actions`` and the action-constraint tests.
"""

from __future__ import annotations

import json
import random

SIZES = {"32k": 32_000, "128k": 128_256, "152k": 151_936}  # Llama-2, Llama-3, Qwen2 (model logits width)
SPECIALS = ("<pad>", "<s>", "</s>", "<image>")
_CORPUS = [
    '{"action": "move", "linear_x": 0.25, "angular_z": -0.5, "duration": 1.0}',
    '{"action": "look", "pan": 0.3, "tilt": -0.1}', '{"action": "stop"}', '{"action": "none"}',
    '{"action": "skill", "name": "dock"}', "Move forward and turn left.", "There is a red cup on the table.",
    "What is in front of the robot?", "Pick up the blue box and place it on the shelf. 0123456789",
] * 5


def build_big_tokenizer(vocab_size: int, seed: int = 0, max_len: int = 16):
    """A ``PreTrainedTokenizerFast`` with exactly ``vocab_size`` tokens (4 of them special; eos = "</s>")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte-level characters
    printable = [c for c in alphabet if c.isascii() and c.isprintable()] + ["Ġ"] * 8  # "Ġ" is a space
    seed_tok = Tokenizer(models.BPE())
    seed_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    seed_tok.train_from_iterator(_CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=min(600, vocab_size // 2), initial_alphabet=alphabet, show_progress=False))
    trained = json.loads(seed_tok.to_str())["model"]
    vocab = {c: i for i, c in enumerate(sorted(trained["vocab"], key=trained["vocab"].get))}
    merges: list[tuple[str, str]] = [tuple(m) for m in trained["merges"]]
    pool = printable + [t for t in vocab if len(t) > 1]  # merge parts; grows with the new tokens
    rng = random.Random(seed)
    target = vocab_size - len(SPECIALS)
    while len(vocab) < target:
        a = rng.choice(pool) if rng.random() < 0.95 else rng.choice(alphabet)
        b = rng.choice(printable) if rng.random() < 0.5 else rng.choice(pool)
        t = a + b
        if len(t) > max_len or t in vocab:
            continue
        vocab[t] = len(vocab)
        merges.append((a, b))
        pool.append(t)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    hf.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert len(hf) == vocab_size, (len(hf), vocab_size)
    return hf
