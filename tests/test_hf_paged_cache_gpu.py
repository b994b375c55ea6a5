"""`kvpager.hf.PagedCache` on a GPU pool: transformers' own ``generate`` over it
gives the tokens (and beams) of its default cache for the same model on the same
GPU, left-padded and on prefix hits, windowed and soft-capped families
included (the CUDA kernels' paths). Skips without CUDA."""

from __future__ import annotations

import pytest
from gpu_helpers import cupy_torch_or_skip

pytest.importorskip("transformers")
_, torch = cupy_torch_or_skip()

from test_hf_models import make_model  # noqa: E402
from test_hf_models_gpu import FAMILIES, GPU_SIZES  # noqa: E402
from test_hf_paged_cache import cache_kw, padded_batch  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.hf import PagedCache, spec_for_model  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt_oss"])
@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(num_beams=3, do_sample=False)], ids=["greedy", "beams"])
def test_generate_on_a_gpu_pool_gives_transformers_tokens(family, kw):
    model = make_model(family, **GPU_SIZES, **FAMILIES.get(family, {})).cuda()
    pool = KVPool(spec_for_model(model, num_blocks=256, block_size=16), device="cuda:0")
    try:
        ids, mask = (t.cuda() for t in padded_batch())
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, **kw)
        for _ in range(2):  # the second on prefix hits
            with PagedCache(model, pool) as cache:
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12,
                                     **cache_kw(model, cache), **kw)
            assert torch.equal(ref, out)
        assert pool.stats().num_sequences == 0
        pool.check_integrity()
    finally:
        pool.close()
