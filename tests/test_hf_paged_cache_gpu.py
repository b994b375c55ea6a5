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


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_decode_passes_refill_one_plan(family, monkeypatch):
    """A GPU pool's decode passes refill the last pass's plan in place (no new plan a
    token): from the prompt's pass on, a new plan only where the rows outgrow the
    kept plan's tables (twice the longest row when it was made) or change (beams);
    transformers' tokens all the same (Mistral: windows, blocks given back)."""
    model = make_model(family, **GPU_SIZES, **FAMILIES.get(family, {})).cuda()
    pool = KVPool(spec_for_model(model, num_blocks=256, block_size=16), device="cuda:0")
    made, refilled = [], []
    plan, refill = pool.plan, pool.refill
    monkeypatch.setattr(pool, "plan", lambda *a, **k: made.append(1) or plan(*a, **k))
    monkeypatch.setattr(pool, "refill", lambda *a, **k: refilled.append(1) or refill(*a, **k))
    try:
        ids, mask = (t.cuda() for t in padded_batch())
        new = 60  # rows of 9-20 prompt tokens outgrow the first decode pass's plan
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        with PagedCache(model, pool) as cache:
            cache.release_margin = 0  # (Mistral: blocks behind the windows given back as the rows grow)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                 **cache_kw(model, cache))
        assert torch.equal(ref, out)
        # plans made: the prompt's pass, the first decode pass's (made at 21 tokens a row: room for
        # 42, 3 blocks of 16) and the 29th's (49 tokens: 7 blocks); the other 57 decode passes refill
        assert len(made) == 3 and len(refilled) == new - 1 - 2, (len(made), len(refilled))
        with PagedCache(model, pool) as cache:  # beams: rows reordered each step, plans made anew
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, num_beams=3,
                                 do_sample=False, **cache_kw(model, cache))
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, num_beams=3, do_sample=False)
        assert torch.equal(ref, out)
        assert pool.stats().num_sequences == 0
        pool.check_integrity()
    finally:
        pool.close()


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(num_beams=3, do_sample=False)], ids=["greedy", "beams"])
def test_a_shared_prompt_not_yet_cached_is_written_once_first(family, kw):
    """Rows sharing 256 tokens not yet cached: a pass writes them once (one row), then
    each row runs its own tail (beams: each distinct row once), on the GPU kernels;
    transformers' tokens."""
    from test_hf_paged_cache_tails import batch, widths_of

    model = make_model(family, **GPU_SIZES, **FAMILIES.get(family, {})).cuda()
    pool = KVPool(spec_for_model(model, num_blocks=256, block_size=16), device="cuda:0")
    try:
        ids, mask = (t.cuda() for t in batch((3, 13, 9), system=256))
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, **kw)

        def paged():
            with PagedCache(model, pool) as cache:
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12,
                                      **cache_kw(model, cache), **kw)

        out, widths = widths_of(model, paged)
        assert torch.equal(ref, out)
        assert widths[:2] == [256, 13], widths
        assert pool.stats().num_sequences == 0
        pool.check_integrity()
    finally:
        pool.close()


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(num_beams=3, do_sample=False),
                                dict(do_sample=True, top_k=20, num_return_sequences=2)],
                         ids=["greedy", "beams", "sampled"])
def test_decode_passes_replayed_from_cuda_graphs_give_transformers_tokens(family, kw):
    """cuda_graphs: a PagedCache's decode passes replayed from captured steps give the
    tokens of transformers' own cache (windows' blocks given back meanwhile: Mistral;
    soft caps: Gemma-2); steps kept in a CapturedSteps serve a second cache (on prefix
    hits) without capturing again. (GPT-OSS's float32 experts read the host: a step
    that cannot be captured, refused by name as `PagedGeneration` refuses it.)"""
    from kvpager.hf import CapturedSteps

    model = make_model(family, **GPU_SIZES, **FAMILIES.get(family, {})).cuda()
    pool = KVPool(spec_for_model(model, num_blocks=256, block_size=16), device="cuda:0")
    steps = CapturedSteps(model, pool)
    try:
        ids, mask = (t.cuda() for t in padded_batch())
        torch.manual_seed(5)
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, **kw)
        captured = []
        for graphs in (True, steps, steps):
            with PagedCache(model, pool, cuda_graphs=graphs) as cache:
                cache.release_margin = 0
                torch.manual_seed(5)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40,
                                     **cache_kw(model, cache), **kw)
            assert torch.equal(ref, out), graphs
            captured.append(steps.captures)
        assert captured[1] >= 1 and captured[2] == captured[1]  # the third replayed the second's
        assert pool.stats().num_sequences == 0
        pool.check_integrity()
    finally:
        steps.close()
        pool.close()


def test_captured_steps_of_another_model_or_pool_are_refused_before_anything_is_taken():
    """cuda_graphs: CapturedSteps of another pool, compiled ones, or closed ones are
    refused when the cache is made (not at its first decode pass), the model untouched."""
    from kvpager.errors import InvalidArgument
    from kvpager.hf import CapturedSteps
    from kvpager.hf.paged_cache import open_caches

    model = make_model("llama", **GPU_SIZES).cuda()
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=16), device="cuda:0")
    other = KVPool(spec_for_model(model, num_blocks=64, block_size=16), device="cuda:0")
    try:
        closed = CapturedSteps(model, pool)
        closed.close()
        for steps, match in ((CapturedSteps(model, other), "another model or pool"), (closed, "closed")):
            with pytest.raises(InvalidArgument, match=match):
                PagedCache(model, pool, cuda_graphs=steps)
            assert "forward" not in model.__dict__ and open_caches(model) == 0
    finally:
        other.close()
        pool.close()


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_replayed_passes_are_taken_ahead(family, monkeypatch):
    """A replayed decode pass after two others replays the captured step refilled while
    the one before ran (`kvpager.hf.cache_ahead`): from the third decode pass on, no pass
    appends or refills before its replay; between passes each row holds the next slot;
    a conversation's next turn and prompt-lookup drafts (crops) give them back; the tokens
    are transformers' (Mistral: windows' blocks given back meanwhile)."""
    import transformers
    from test_hf_paged_cache import PROMPT_LOOKUP

    from kvpager.hf.graphs import DecodeGraphs

    model = make_model(family, **GPU_SIZES, **FAMILIES.get(family, {})).cuda()
    pool = KVPool(spec_for_model(model, num_blocks=256, block_size=16), device="cuda:0")
    launches = []
    launch = DecodeGraphs.launch

    def counted(self, seq_ids, input_ids, position_ids, slots, ready=None):
        launches.append(ready is not None and self.graphs.get(self._bucket(len(seq_ids))) is ready)
        return launch(self, seq_ids, input_ids, position_ids, slots, ready)

    monkeypatch.setattr(DecodeGraphs, "launch", counted)
    try:
        ids, mask = (t.cuda() for t in padded_batch())
        turn = torch.randint(3, 128, (3, 5), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
        dyn = transformers.DynamicCache()
        ref1 = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                              **cache_kw(model, dyn))
        ids2 = torch.cat([ref1, turn], 1)
        mask2 = torch.cat([mask, torch.ones_like(ids2[:, mask.shape[1]:])], 1)
        ref2 = model.generate(input_ids=ids2, attention_mask=mask2, max_new_tokens=24, do_sample=False,
                              **cache_kw(model, dyn))
        seen = []

        class Watch(transformers.StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                seen.append([pool.sequence(s).num_tokens - n for s, n in zip(cache.seq_ids, cache._rows.lens)])
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        with PagedCache(model, pool, cuda_graphs=True) as cache:
            cache.release_margin = 0
            out1 = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                                  stopping_criteria=transformers.StoppingCriteriaList([Watch()]),
                                  **cache_kw(model, cache))
            out2 = model.generate(input_ids=ids2, attention_mask=mask2, max_new_tokens=24, do_sample=False,
                                  **cache_kw(model, cache))
        assert torch.equal(out1, ref1) and torch.equal(out2, ref2)
        assert seen[:2] == [[0] * 3] * 2 and seen[2:] == [[1] * 3] * 22
        # 23 decode passes a call: the first replay captures, the second refills, the rest ready
        assert launches == ([False] * 2 + [True] * 21) * 2
        ref = model.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=24, do_sample=False,
                             **PROMPT_LOOKUP)
        with PagedCache(model, pool, cuda_graphs=True) as cache:
            out = model.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=24, do_sample=False,
                                 **cache_kw(model, cache), **PROMPT_LOOKUP)
        assert torch.equal(out, ref)
        assert pool.stats().num_sequences == 0
        pool.check_integrity()
    finally:
        pool.close()
