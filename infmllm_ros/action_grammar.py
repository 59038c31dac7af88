"""Constrained action decoding: the action JSON schema turned into a per-token mask over the vocabulary.

Two backends behind one class, :class:`ActionConstraint`:

* ``xgrammar`` (default): the schema is compiled once per (schema, tokenizer) when the constraint is built (the
  node builds it at configure). Per generated token the grammar matcher fills a bitmask of ceil(V/32) int32
  words, which is applied **in place** to the logits (``apply_(generated_ids, logits)``); no list of allowed ids
  is ever built. About 0.5 ms per action at a 128K vocabulary (``infmllm-bench actions``).
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


class _GrammarMask:
    """One answer's xgrammar matcher. ``apply_`` masks logits in place; calling it returns the allowed ids
    (the ``allowed_tokens_fn`` interface, for callers that want a list)."""

    def __init__(self, compiled, vocab_size: int):
        import torch
        import xgrammar as xgr

        self._torch, self._xgr = torch, xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # int32 (1, ceil(V/32)), on the CPU
        self._fed = 0
        self._device_mask: dict = {}  # device -> int32 bitmask buffer there

    def _advance(self, generated_ids) -> None:
        ids = list(generated_ids)
        if len(ids) < self._fed:
            raise ValueError(f"generated ids went back from {self._fed} to {len(ids)} tokens; one mask per answer")
        for t in ids[self._fed:]:
            if not self.matcher.accept_token(int(t)):
                raise ValueError(f"token {int(t)} is not allowed by the action grammar here")
        self._fed = len(ids)
        self.matcher.fill_next_token_bitmask(self.bitmask)

    def apply_(self, generated_ids, logits) -> None:
        """Set the logits (V,) or (1, V) of every token the grammar forbids after ``generated_ids`` to -inf."""
        self._advance(generated_ids)
        flat = logits.view(1, -1)
        n = min(flat.shape[-1], self.vocab_size)
        mask = self.bitmask
        if flat.device.type == "cpu" and self._apply_sparse_(flat, n):
            return
        if flat.device.type != "cpu":  # keep one device buffer; the copy is ceil(V/32) words per token
            buf = self._device_mask.get(flat.device)
            if buf is None:
                buf = self._device_mask[flat.device] = self._torch.empty_like(mask, device=flat.device)
            mask = buf.copy_(mask, non_blocking=True)
        self._xgr.apply_token_bitmask_inplace(flat, mask, vocab_size=n)
        if flat.shape[-1] > n:  # padded model vocabulary: ids the tokenizer does not have are never allowed
            flat[:, n:] = float("-inf")

    def _apply_sparse_(self, flat, n: int) -> bool:
        """Few allowed tokens (most JSON states): keep their logits, fill the rest with -inf. About 0.07 ms at 128K
        against 0.3-0.5 ms for the per-bit kernel; False (nothing done) when the mask is dense."""
        import numpy as np

        words = self.bitmask.numpy()[0]
        live = np.flatnonzero(words)
        if len(live) > self.SPARSE_WORDS:
            return False
        bits = (words[live, None] >> np.arange(32, dtype=np.int32)) & 1
        idx = (live[:, None] * 32 + np.arange(32))[bits.astype(bool)]
        idx = self._torch.from_numpy(idx[idx < n])
        keep = flat[0, idx]
        flat.fill_(float("-inf"))  # also the padded ids past the tokenizer
        flat[0, idx] = keep
        return True

    SPARSE_WORDS = 128  # at most 4096 allowed ids take the sparse path

    def __call__(self, generated_ids) -> list[int]:
        self._advance(generated_ids)
        torch = self._torch
        words = self.bitmask[0]
        bits = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
        return torch.nonzero(bits.reshape(-1)[: self.vocab_size]).flatten().tolist()


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
            return _GrammarMask(self._compiled, self.vocab_size)
        from lmformatenforcer.tokenenforcer import TokenEnforcer

        parser = self._parser_cls(self.schema)
        enforcer = TokenEnforcer(self._data, parser)  # sets parser.config (shared by every derived parser state)
        parser.config.max_consecutive_whitespaces = self.max_whitespace  # library default 12

        def fn(generated_ids) -> list[int]:
            return list(enforcer.get_allowed_tokens(list(generated_ids)).allowed_tokens)

        return fn
