"""engine/sampling.py's fast paths against torch's own: greedy = torch.argmax (ties: the first maximum), and the
all-masked check raises exactly when no logit is finite."""

import pytest
import torch

from infmllm_ros.engine.sampling import choose, mask_logits


@pytest.mark.parametrize("seed", range(5))
def test_greedy_equals_torch_argmax_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (128256,), generator=g).float()  # many ties at the maximum
    assert choose(x) == int(torch.argmax(x))
    x[int(torch.argmax(x)) + 1 :] = float("-inf")
    assert choose(x) == int(torch.argmax(x))


@pytest.mark.parametrize("fill,finite_at", [(float("-inf"), None), (float("-inf"), 7), (float("nan"), None),
                                            (float("nan"), 7), (float("inf"), None), (float("inf"), 7)])
def test_all_masked_raises_exactly_when_nothing_is_finite(fill, finite_at):
    x = torch.full((50,), fill)
    x[3] = float("-inf")
    if finite_at is not None:
        x[finite_at] = 0.5
    if torch.isfinite(x).any():  # the oracle: torch's full check
        mask_logits(x, None, None)
    else:
        with pytest.raises(RuntimeError, match="every token is masked"):
            mask_logits(x, None, None)
