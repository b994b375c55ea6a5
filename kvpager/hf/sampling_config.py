"""A model's generation config read as kvpager's sampling settings
(`kvpager.hf.Sampling.from_model`): its single-token biases and bans, its
``min_new_tokens``, and the settings kvpager does not apply, refused by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvpager.errors import InvalidArgument

#: Generation-config settings that change transformers' tokens, greedy, sampled or
#: in beams, which kvpager does not apply: refused by name (a value other than None
#: and the neutral one), never left out. (``renormalize_logits`` and
#: ``remove_invalid_values`` change no token: -inf stays the least.)
UNAPPLIED = (("min_length", 0), ("begin_suppress_tokens", None), ("forced_bos_token_id", None),
             ("forced_eos_token_id", None), ("exponential_decay_length_penalty", None),
             ("no_repeat_ngram_size", 0), ("encoder_no_repeat_ngram_size", 0), ("encoder_repetition_penalty", 1.0),
             ("guidance_scale", 1.0), ("watermarking_config", None), ("penalty_alpha", None), ("dola_layers", None),
             ("constraints", None), ("force_words_ids", None), ("num_beam_groups", 1), ("diversity_penalty", 0.0),
             ("stop_strings", None), ("token_healing", False), ("num_return_sequences", 1))


def config_adjustments(config: Any, eos: set[int]) -> tuple[dict[int, float], int]:
    """A generation config's single-token biases ({id: bias}: ``sequence_bias``,
    ``suppress_tokens`` and ``bad_words_ids`` as -inf) and ``min_new_tokens``;
    InvalidArgument naming a setting kvpager does not apply (`UNAPPLIED`). A banned
    word that is one end token of ``eos`` is left out, as transformers' processor
    leaves it (so the end token still ends the generation; banned, other tokens came)."""
    for name, neutral in UNAPPLIED:
        value = getattr(config, name, None)
        if value is not None and value != neutral and not (isinstance(value, (list, tuple, dict)) and not value):
            raise InvalidArgument(f"the model's generation config sets {name}={value!r}, which kvpager's sampling does "
                                  "not apply: pass a Sampling of your own (min_tokens counts new tokens)")
    bias: dict[int, float] = {}
    sequence_bias = getattr(config, "sequence_bias", None) or {}
    # (a dict of id tuples, or its JSON form: [[ids, bias], ...])
    for key, value in sequence_bias.items() if isinstance(sequence_bias, Mapping) else sequence_bias:
        ids = list(key) if isinstance(key, (list, tuple)) else [key]
        if len(ids) != 1:
            raise InvalidArgument(f"the model's generation config biases the sequence {key!r}: kvpager biases single "
                                  "tokens alone (Sampling.logit_bias)")
        bias[int(ids[0])] = bias.get(int(ids[0]), 0.0) + float(value)
    for t in getattr(config, "suppress_tokens", None) or ():
        bias[int(t)] = float("-inf")
    for words in getattr(config, "bad_words_ids", None) or ():
        if len(words) == 1 and int(words[0]) in eos:
            continue
        if len(words) != 1:
            raise InvalidArgument(f"the model's generation config bans the sequence {words!r}: kvpager bans single "
                                  "tokens alone (Sampling.logit_bias of -inf)")
        bias[int(words[0])] = float("-inf")
    return bias, int(getattr(config, "min_new_tokens", None) or 0)
