"""Which model types' recurrent layers continue a pass from the states an earlier pass left.

A model with recurrent layers (`kvpager.hf.recurrent`) prefills a prompt in
parts, resumes it from states held for its cached blocks, and scores in parts
(`kvpager.hf.scoring_rows`) only where its layers carry a state across passes
as transformers runs them. That is a fact about each family's transformers
code, not something a pass can see: a Mamba scan that restarts from zero
gives other tokens without an error. So the families checked are listed here
by model type, the ones known not to continue too, and any other type is
taken as one that does not (its tokens right, its prompts run whole), with a
warning once a process.
"""

from __future__ import annotations

import warnings
from typing import Any

from kvpager.hf.model import text_config

#: model types whose recurrent layers continue a pass of several tokens from the states a pass
#: left, as transformers runs them (each checked against transformers' tokens, prefilled in parts
#: and resumed from held states: tests/test_hf_recurrent.py; and against a plain forward pass's
#: log-probabilities with its built constants moved as training moves them:
#: tests/test_hf_scoring_recurrent.py). Zamba's and Jamba's Mamba layers do not: a pass of more
#: than one token scans from a zero state whatever its cache holds (Zamba's prompts run in parts,
#: or resumed, gave other tokens than transformers'; Jamba's log-probabilities were 0.02-0.03 off
#: once its convolution bias was not zero, as in every trained Jamba, with no error; transformers'
#: own Jamba code says so of its scan). A model of a type not listed (`continues`)
#: runs each prompt from its first token in one pass (left-padded) and holds no states for later
#: prompts: its tokens are right, its prompts' recurrent layers recomputed.
CONTINUING = frozenset({
    "bailing_hybrid", "bamba", "falcon_h1", "granitemoehybrid", "kimi_linear", "lara_mini", "lfm2",
    "lfm2_moe", "lfm2_vl", "lfm3", "nemotron_h", "olmo_hybrid", "qwen3_5", "qwen3_5_text", "qwen3_5_moe",
    "qwen3_5_moe_text", "qwen3_next", "zaya",
})


#: model types known not to continue (`CONTINUING`): taken so without a warning. Zamba2's Mamba-2
#: layers continue a pass of several tokens from a state a pass of several tokens left, but a pass of
#: one token (a decode step, a part of one token) takes their step path, which leaves another state
#: than their chunked scan over the same tokens (layer 0's SSM state 1.8e-3 apart after 13 + 3 tokens
#: against 16, values up to 1.3): a prompt resumed from such a state (a conversation's next turn, a
#: score in parts) was 0.03-0.3 off a plain forward pass's log-probabilities, its tokens other in 4
#: of 12 seeds. Its prompts run whole.
NOT_CONTINUING = frozenset({"zamba", "jamba", "zamba2"})
#: model types whose decode steps leave other hidden states, so other K/V in their attention layers,
#: than a pass of several tokens over the same tokens (Zamba2's: above): a later prompt reading the
#: blocks a generation's decode steps filled was 0.008-0.03 off a plain forward pass. Their calls'
#: blocks are matched within the call alone (`kvpager.hf.recurrent.recurrent_salt`).
DECODE_STATES_APART = frozenset({"zamba2"})


def model_types(model: Any) -> set[Any]:
    """``model``'s model type and its text config's (a multimodal wrapper's)."""
    return {getattr(getattr(model, "config", None), "model_type", None),
            getattr(text_config(model), "model_type", None)}


def decode_states_apart(model: Any) -> bool:
    """Whether ``model``'s decode steps leave other states than its passes of several
    tokens (`DECODE_STATES_APART`, by its model type or its text config's)."""
    return bool(model_types(model) & DECODE_STATES_APART)
#: model types whose recurrent layers keep their states in their modules: refused at their first
#: pass (`kvpager.hf.recurrent_states.check_layout`), so not warned about as a type that may continue first
MODULE_STATES = frozenset({"recurrent_gemma"})
_warned: set[Any] = set()  # the unknown types warned about, once a process each


def continues(model: Any) -> bool:
    """Whether ``model``'s recurrent layers continue a pass of several tokens from held
    states (`CONTINUING`, by its model type or its text config's;
    `Recurrent.continues` overrides it). A type in neither list warns, once a
    process: its prompts run whole, no states held for later prompts."""
    types = model_types(model)
    if types & CONTINUING:
        return True
    name = tuple(sorted(str(t) for t in types))
    if not types & (NOT_CONTINUING | MODULE_STATES) and name not in _warned:
        _warned.add(name)
        warnings.warn(f"kvpager: {type(model).__name__} (model type {' / '.join(name)}) is not among the types whose "
                      "recurrent layers are known to continue a pass from held states "
                      "(kvpager.hf.recurrent.CONTINUING): its prompts run whole from their first tokens and no "
                      "states are held for later prompts (its tokens are right). Recurrent.continues = True takes "
                      "it as one that continues, once checked against transformers' tokens", stacklevel=3)
    return False
