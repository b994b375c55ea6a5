"""Models with recurrent layers (`kvpager.hf.recurrent`) on a GPU pool: float32,
head dim 32 (the smallest the CUDA kernels take), tokens identical to
transformers' greedy ``generate`` of the same model on the same GPU, sequences
ending at different steps; eager decode steps refill one plan in place while
their rows stay. Skips without CUDA."""

from __future__ import annotations

import pytest
from gpu_helpers import cupy_or_skip

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
cupy_or_skip()
if not torch.cuda.is_available():
    pytest.skip("torch has no CUDA here", allow_module_level=True)

from test_hf_recurrent import make, prompts, reference  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.hf import generate, spec_for_model  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next", "jamba", "lfm2", "nemotron_h"])
def test_tokens_equal_transformers_on_a_gpu_pool(family):
    model = make(family, head_dim=32, hidden_size=128).cuda()
    ps = prompts(9, 40, 1, 17)
    with torch.inference_mode():
        free = reference(model, ps, 6)
        eos = [free[1][2]]
        want = reference(model, ps, 6, eos=eos)
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=16), device="cuda:0")
    assert generate(model, pool, ps, max_new_tokens=6, eos_token_id=eos) == want
    assert pool.stats().num_sequences == 0
    pool.check_integrity()
    pool.close()
