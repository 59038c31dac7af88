"""Constrained action decoding: the action JSON schema turned into a per-token mask over the vocabulary.

Two backends behind one class, :class:`ActionConstraint`:

* ``xgrammar`` (default): the schema is compiled once per (schema, tokenizer) when the constraint is built (the
  node builds it at configure). Per generated token the grammar matcher fills a bitmask of ceil(V/32) int32
  words, which is applied **in place** to the logits (``apply_(generated_ids, logits)``). On the CPU a sparse
  mask (every state of the action schema) is applied as keep-allowed / fill -inf / put back, 10-20x faster than
  xgrammar's per-bit CPU kernel at 128K; dense masks and GPU logits use xgrammar's kernel. About 1-2 ms of CPU
  per action at a 128K vocabulary (``infmllm-bench actions``).
* ``lmfe`` (lm-format-enforcer, the fallback when xgrammar is missing or cannot read the tokenizer): returns the
  allowed ids per step. Correct, but seconds of set-up and about a second per action at 128K.

Both fail closed in the same way: the decoder can only write schema-shaped JSON, and
:func:`infmllm_ros.actions.parse_action` still validates and clamps whatever comes out (it never trusts the mask).
"""

from __future__ import annotations

__all__ = ["ActionConstraint", "BACKENDS"]

BACKENDS = ("auto", "xgrammar", "lmfe")


def _regular_tokens(tokenizer, vocab_size: int) -> list[tuple[int, str, bool]]:
    """(token_id, text, starts_a_word) for every non-special token: lm-format-enforcer's transformers integration
    logic (its module cannot be imported under transformers 5: it imports the removed ``tokenization_utils``)."""
    special = set(tokenizer.all_special_ids)
    token_0 = tokenizer.encode("0", add_special_tokens=False)[-1]
    out = []
    for idx in range(vocab_size):
        if idx in special:
            continue
        after_0 = tokenizer.decode([token_0, idx])[1:]
        alone = tokenizer.decode([idx])
        out.append((idx, after_0, len(after_0) > len(alone)))
    return out


def _xgrammar_tokenizer_info(tokenizer, vocab_size: int, eos: int):
    import xgrammar as xgr

    try:  # a Hugging Face tokenizer: xgrammar reads its vocabulary and byte encoding itself
        return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[eos])
    except Exception:  # noqa: BLE001 - any other tokenizer with decode(): each token's own text, no byte encoding
        special = set(getattr(tokenizer, "all_special_ids", ())) - {eos}
        # "" marks a token the grammar never allows (xgrammar treats empty tokens as special)
        vocab = ["" if i in special else tokenizer.decode([i]) for i in range(vocab_size)]
        return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=[eos])


SPARSE_WORDS = 128  # bitmasks with at most this many non-zero words (<= 4096 allowed ids) take the sparse path


def allowed_ids(bitmask_row, vocab_size: int):
    """The allowed ids (int64 numpy, ascending) of one xgrammar bitmask row (int32 words, bit i of word w = id
    32 w + i), or None when more than SPARSE_WORDS words are non-zero (dense: the per-bit kernel is faster)."""
    import numpy as np

    words = bitmask_row.numpy() if hasattr(bitmask_row, "numpy") else bitmask_row
    live = np.flatnonzero(words)
    if len(live) > SPARSE_WORDS:
        return None
    if len(live) == 1:  # a forced token (one bit) is the commonest single-word case: no unpacking
        w = int(words[live[0]]) & 0xFFFFFFFF
        if w & (w - 1) == 0:
            idx = np.array([live[0] * 32 + w.bit_length() - 1], dtype=np.int64)
            return idx[idx < vocab_size]
    # explicit little-endian bytes, so byte k of a word holds its bits 8k..8k+7 on any host
    bits = np.unpackbits(words[live].astype("<i4").view(np.uint8), bitorder="little")
    nz = np.flatnonzero(bits)
    idx = live[nz >> 5] * 32 + (nz & 31)
    return idx[idx < vocab_size]


class IdsCache:
    """bitmask contents -> allowed ids (a LongTensor, or None for a dense mask), exact: the key is the whole
    bitmask. A schema has few grammar states (40 distinct masks over the 5 bench actions), so after the first
    answers unpacking the bitmask (~0.1 ms per token at 128K with the caches cold from the model's forward) becomes
    a copy + hash of ceil(V/32) words (~0.02 ms). Cleared when it holds ``max_entries`` masks (16 KB each at 128K)."""

    def __init__(self, max_entries: int = 512):
        self.max_entries = max_entries
        self._map: dict = {}

    def lookup(self, bitmask, vocab_size: int):
        import torch

        key = (vocab_size, bitmask.numpy().tobytes())
        try:
            return self._map[key]
        except KeyError:
            pass
        idx = allowed_ids(bitmask[0], vocab_size)
        idx = None if idx is None else torch.from_numpy(idx)
        if len(self._map) >= self.max_entries:
            self._map.clear()
        self._map[key] = idx
        return idx

    def __len__(self) -> int:
        return len(self._map)


def apply_bitmask_cpu_(logits, bitmask, vocab_size: int, cache: IdsCache | None = None) -> None:
    """xgrammar.apply_token_bitmask_inplace on CPU logits (1, W), W >= vocab_size, plus -inf on the ids past
    vocab_size. Sparse masks (every action-schema state: at most ~80 allowed ids at 128K) keep the allowed logits,
    fill the row with -inf and put them back: ~0.03-0.1 ms at 128K against ~0.4-0.6 ms for xgrammar's per-bit CPU
    kernel, which stays for dense masks (``infmllm-bench actions``)."""
    import torch
    import xgrammar as xgr

    if cache is not None:
        idx = cache.lookup(bitmask, vocab_size)
    else:
        idx = allowed_ids(bitmask[0], vocab_size)
        idx = None if idx is None else torch.from_numpy(idx)
    if idx is None:
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab_size)
        if logits.shape[-1] > vocab_size:  # padded model vocabulary: ids the tokenizer does not have
            logits[:, vocab_size:] = float("-inf")
        return
    row = logits[0]
    keep = row.index_select(0, idx)
    row.fill_(float("-inf"))  # also the padded ids past the tokenizer
    row.index_copy_(0, idx, keep)


class _GrammarMask:
    """One answer's xgrammar matcher. ``apply_`` masks logits in place; calling it returns the allowed ids
    (the ``allowed_tokens_fn`` interface, for callers that want a list)."""

    def __init__(self, compiled, vocab_size: int, ids_cache: IdsCache | None = None):
        import torch
        import xgrammar as xgr

        self._torch, self._xgr = torch, xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # int32 (1, ceil(V/32)), on the CPU, reused
        self._fed = 0
        self._device_mask: dict = {}  # device -> int32 bitmask buffer there
        self._ids_cache = ids_cache

    def _advance(self, generated_ids) -> None:
        n = len(generated_ids)
        if n < self._fed:
            raise ValueError(f"generated ids went back from {self._fed} to {n} tokens; one mask per answer")
        for i in range(self._fed, n):  # only the new tokens (no copy of the prefix per step)
            t = int(generated_ids[i])
            if not self.matcher.accept_token(t):
                raise ValueError(f"token {t} is not allowed by the action grammar here")
        self._fed = n
        self.matcher.fill_next_token_bitmask(self.bitmask)

    def apply_(self, generated_ids, logits) -> None:
        """Set the logits (V,) or (1, V) of every token the grammar forbids after ``generated_ids`` to -inf."""
        self._advance(generated_ids)
        flat = logits.view(1, -1)
        n = min(flat.shape[-1], self.vocab_size)
        if flat.device.type == "cpu":
            apply_bitmask_cpu_(flat, self.bitmask, n, self._ids_cache)
            return
        # one device buffer and xgrammar's device kernel; the copy is ceil(V/32) words per token
        buf = self._device_mask.get(flat.device)
        if buf is None:
            buf = self._device_mask[flat.device] = self._torch.empty_like(self.bitmask, device=flat.device)
        self._xgr.apply_token_bitmask_inplace(flat, buf.copy_(self.bitmask, non_blocking=True), vocab_size=n)
        if flat.shape[-1] > n:  # padded model vocabulary: ids the tokenizer does not have are never allowed
            flat[:, n:] = float("-inf")

    def __call__(self, generated_ids) -> list[int]:
        import numpy as np

        self._advance(generated_ids)
        idx = allowed_ids(self.bitmask[0], self.vocab_size)
        if idx is None:  # dense: unpack every word
            bits = np.unpackbits(self.bitmask.numpy()[0].astype("<i4").view(np.uint8), bitorder="little")
            idx = np.flatnonzero(bits[: self.vocab_size])
        return idx.tolist()


class ActionConstraint:
    """The action schema compiled for one tokenizer; :meth:`allowed_tokens_fn` gives a fresh mask per answer.

    ``backend``: "xgrammar", "lmfe" or "auto" (xgrammar, else lm-format-enforcer). ``max_whitespace`` bounds
    consecutive whitespace in the JSON, so a model cannot spend its action token budget on indentation and be cut
    off mid-object. ``vocab_size``: the model's logits width when it is larger than the tokenizer (padding).
    """

    def __init__(self, spec, tokenizer, vocab_size: int | None = None, max_whitespace: int = 2,
                 backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown constraint backend {backend!r}; use one of {', '.join(BACKENDS)}")
        self.spec = spec
        self.schema = spec.json_schema()
        self.vocab_size = int(vocab_size or len(tokenizer))
        self.eos_token_id = tokenizer.eos_token_id
        if self.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id: constrained decoding could never end")
        self.max_whitespace = int(max_whitespace)
        self.fallback_reason = ""
        if backend in ("auto", "xgrammar"):
            try:
                self._build_xgrammar(tokenizer)
                self.backend = "xgrammar"
                return
            except ImportError as e:
                if backend == "xgrammar":
                    raise
                self.fallback_reason = f"xgrammar unavailable ({e})"
        self._build_lmfe(tokenizer)
        self.backend = "lmfe"

    def _build_xgrammar(self, tokenizer) -> None:
        import xgrammar as xgr

        info = _xgrammar_tokenizer_info(tokenizer, self.vocab_size, self.eos_token_id)
        compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._compiled = compiler.compile_json_schema(self.schema, any_whitespace=True,
                                                      max_whitespace_cnt=self.max_whitespace, strict_mode=True)
        self._ids_cache = IdsCache()  # shared by this constraint's answers: same grammar, same masks

    def _build_lmfe(self, tokenizer) -> None:
        from lmformatenforcer import JsonSchemaParser
        from lmformatenforcer.tokenenforcer import TokenEnforcerTokenizerData

        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids).rstrip("\ufffd")

        self._parser_cls = JsonSchemaParser
        self._data = TokenEnforcerTokenizerData(_regular_tokens(tokenizer, self.vocab_size), decode,
                                                self.eos_token_id, False, self.vocab_size)

    def allowed_tokens_fn(self):
        """A per-answer mask. xgrammar: an object with ``apply_(ids, logits)`` (in place) that is also callable
        ``(ids) -> allowed ids``; lm-format-enforcer: a plain ``(ids) -> allowed ids`` function."""
        if self.backend == "xgrammar":
            return _GrammarMask(self._compiled, self.vocab_size, self._ids_cache)
        from lmformatenforcer.tokenenforcer import TokenEnforcer

        parser = self._parser_cls(self.schema)
        enforcer = TokenEnforcer(self._data, parser)  # sets parser.config (shared by every derived parser state)
        parser.config.max_consecutive_whitespaces = self.max_whitespace  # library default 12

        def fn(generated_ids) -> list[int]:
            return list(enforcer.get_allowed_tokens(list(generated_ids)).allowed_tokens)

        return fn
