"""Transformers as the reference: greedy output must match `model.generate` token for token.

Different kernels sum in different orders, so two correct implementations may disagree where
the top two logits are nearly equal. A mismatch is therefore accepted only at a proven near-tie
(HF's own logits for the two tokens closer than `tie_tolerance`); the comparison stops there,
since the two continuations legitimately diverge after it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig, PreTrainedModel

FLOAT32_TIE_TOLERANCE = 1e-3


def hf_greedy(model: PreTrainedModel, prompt_ids: Sequence[int], num_new_tokens: int) -> list[int]:
    """The new tokens of `model.generate(do_sample=False)`, never stopping early on EOS."""
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=num_new_tokens,
        eos_token_id=None,
        pad_token_id=model.config.pad_token_id or 0,
    )
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(prompt_ids)], device=device)
    with torch.inference_mode():
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
        )
    return output[0, len(prompt_ids) :].tolist()


def hf_next_logits(model: PreTrainedModel, token_ids: Sequence[int]) -> torch.Tensor:
    """HF's float32 logits for the token after `token_ids`, from a fresh, cache-free forward."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(torch.tensor([list(token_ids)], device=device)).logits
    return logits[0, -1].float().cpu()


def assert_greedy_matches(
    model: PreTrainedModel,
    prompt_ids: Sequence[int],
    ours: Sequence[int],
    ref: Sequence[int],
    *,
    tie_tolerance: float = FLOAT32_TIE_TOLERANCE,
    allow_length_mismatch: bool = False,
) -> None:
    """Passes if `ours` equals `ref` (HF's greedy tokens after `prompt_ids`), or if they first
    differ where HF's logits show a near-tie between the two tokens; compares no further.

    Lengths must match unless `allow_length_mismatch` (e.g. HF stopped early); then only the
    common prefix is compared.
    """
    ours, ref = list(ours), list(ref)
    for index, (our_token, ref_token) in enumerate(zip(ours, ref, strict=False)):
        if our_token == ref_token:
            continue
        logits = hf_next_logits(model, [*prompt_ids, *ref[:index]])
        gap = abs(float(logits[ref_token] - logits[our_token]))
        top = float(logits.max())
        assert gap < tie_tolerance and top - float(logits[our_token]) < tie_tolerance, (
            f"greedy mismatch at new token {index}: ours {our_token}, HF {ref_token}; HF logit "
            f"gap {gap:.3g} (top {top:.4f}) is no near-tie (< {tie_tolerance}).\n"
            f"ours {ours}\nref  {ref}"
        )
        return
    if not allow_length_mismatch:
        assert len(ours) == len(ref), f"ours has {len(ours)} tokens, HF {len(ref)}"
