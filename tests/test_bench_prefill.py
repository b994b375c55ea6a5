"""tools/bench_prefill.py off the GPU, on a tiny float32 Llama and a CPU pool: each
case's rows, kvpager's prefix-cache hits as the tool reports them (none cold, across
cases of other sizes too; the system prompt exactly warm), and its first tokens
equal to transformers'."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tool_helpers import tool_module  # noqa: E402


@pytest.fixture(scope="module")
def tool():
    with tool_module("bench_prefill") as module:
        yield module


@pytest.fixture(scope="module")
def model():
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=32000,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_cold_and_warm_cases(tool, model):
    import kvpager.hf.generation as khf
    from kvpager import KVPool

    pool = KVPool(khf.spec_for_model(model, num_blocks=2048))
    try:
        rows = []
        # the second cold case's prompts begin with the first's (same seeds): still no hits
        for case in [("cold", 1, 0, 96), ("cold", 3, 0, 40), ("warm", 4, 64, 24)]:
            rows += tool.run_case(model, pool, *case, rounds=2)
    finally:
        pool.close()
    assert [(r["case"], r["path"]) for r in rows] == [
        ("cold", "kvpager"), ("cold", "hf"), ("cold", "kvpager"), ("cold", "hf"),
        ("warm", "kvpager, system prompt cached"), ("warm", "hf, prefix reused"), ("warm", "hf, recomputed")]
    assert [r["kv_cached"] for r in rows] == [0, 0, 0, 0, 64, 64, 64]
    assert all(r["agree"] == 1.0 for r in rows)  # float32: kvpager's first tokens are transformers'
    # tokens computed: the own tokens where the system prompt is cached or reused, all of them recomputed
    computed = [r["tok_s"] * r["ms"] / 1e3 for r in rows]
    assert computed == pytest.approx([96, 96, 120, 120, 96, 96, 352])
