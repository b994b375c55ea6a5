"""A config's ``sliding_window`` is applied only where the family's masks apply one:
a Llama config that carries the key and Moshi (its code names it only as an
unused attribute) attend in full, warned, with the tokens and scores of a full
forward pass; OLMoE (it passes the window only to the attention function, which
flash-attention reads and sdpa and eager do not) is refused by name; Mistral's
window stays."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_models import COMMON, WINDOW, make_model, one_thread, prompt  # noqa: E402, F401

from kvpager import KVPool  # noqa: E402
from kvpager.errors import UnsupportedModel  # noqa: E402
from kvpager.hf import generate, layer_windows, score, spec_for_model  # noqa: E402


def test_a_window_in_the_config_of_a_family_that_never_windows_attends_in_full():
    """A Llama whose config carries ``sliding_window`` (a config.json that has the
    key): its transformers code never reads it (full causal masks), so kvpager
    attends in full, warned: each greedy token that of a full forward pass over
    everything before it (no cache), where the window gave others before. Mistral's
    window, which its code applies, stays."""
    model = make_model("llama", sliding_window=WINDOW)
    tokens = prompt(30, seed=11)
    with pytest.warns(UserWarning, match="never reads a sliding window"):
        assert layer_windows(model) == [None] * 4
    want, ids = [], list(tokens)
    with torch.no_grad():
        for _ in range(8):
            want.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            ids.append(want[-1])
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    with pytest.warns(UserWarning, match="never reads a sliding window"):
        assert generate(model, pool, [tokens], 8, eos_token_id=None) == [want]
    assert layer_windows(make_model("mistral")) == [WINDOW] * 4
    pool.check_integrity()


def _family(config_cls: str, model_cls: str, **config):
    if not hasattr(transformers, config_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {model_cls}")
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**COMMON, **config})).eval()


def test_a_window_named_only_as_an_attribute_or_a_flash_argument_is_not_applied():
    """Moshi's code names ``sliding_window`` (an attribute of its decoder layers, never
    read: its masks full causal; a real config holds 3,000), so kvpager windowed it:
    scores 1.8 off transformers' from the first position past the window. Attended in
    full now, warned, as Llama's. OLMoE's passes it to the attention function, which
    only flash-attention reads (sdpa and eager: full causal): refused by name, not
    windowed, since transformers itself disagrees there."""
    model = _family("MoshiConfig", "MoshiForCausalLM", sliding_window=WINDOW)
    tokens = prompt(30, seed=12)
    with pytest.warns(UserWarning, match="never reads a sliding window"):
        assert layer_windows(model) == [None] * model.config.num_hidden_layers
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([tokens]), use_cache=False).logits[0].double(), -1)
    want = logp[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].numpy()
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    with pytest.warns(UserWarning, match="never reads a sliding window"):
        got = score(model, pool, [tokens])[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    pool.check_integrity()
    olmoe = _family("OlmoeConfig", "OlmoeForCausalLM", sliding_window=WINDOW, num_experts=4, num_experts_per_tok=2)
    pool = KVPool(spec_for_model(olmoe, num_blocks=64, block_size=8))
    with pytest.warns(UserWarning, match="never reads a sliding window"), \
            pytest.raises(UnsupportedModel, match=f"sliding_window={WINDOW}.*full causal"):
        generate(olmoe, pool, [tokens], 2, eos_token_id=None)
    assert pool.stats().num_sequences == 0
    pool.check_integrity()
