"""Careless callers of the embedded API's transformers side: a flat tensor as the
prompts of ``generate``, a 0-d tensor as its end token, a bool as its count of
beams, a device or dtype name given to ``PagedBatch``. Each was answered wrongly
before (a TypeError from deep inside, a dtype read as a device); each is now a
typed error with nothing held, or the right answer. CPU, small pools."""

from __future__ import annotations

import numpy as np
import pytest
from pool_helpers import make_pool

from kvpager import InvalidArgument


def _tiny():
    pytest.importorskip("transformers")
    from test_hf_models import make_model, prompt

    from kvpager import KVPool
    from kvpager.hf import spec_for_model

    model = make_model("llama")
    return model, KVPool(spec_for_model(model, num_blocks=16)), prompt


def test_generate_refuses_one_flat_tensor_as_the_prompts_by_name():
    """A 1-D tensor (one prompt's ids, not a list of prompts) raised TypeError
    "'int' object is not iterable"; a 1-D array was refused by name already."""
    torch = pytest.importorskip("torch")
    from kvpager.hf import generate

    model, pool, prompt = _tiny()
    ids = prompt(5, 1)
    before = pool.stats()
    for flat in (torch.tensor(ids), np.array(ids)):
        with pytest.raises(ValueError, match=r"prompts\[0\] must be a list of token ids"):
            generate(model, pool, flat, 2)
    assert pool.stats() == before
    assert generate(model, pool, torch.tensor([ids]), 2) == generate(model, pool, [ids], 2)


def test_generate_takes_a_0d_integer_tensor_as_eos_and_refuses_a_float_one_by_name():
    """A 0-d tensor as eos_token_id raised TypeError "iteration over a 0-d tensor".
    An integer one is the id it holds (the tokens of the int); a float one is
    refused by name, nothing held."""
    torch = pytest.importorskip("torch")
    from kvpager.hf import generate

    model, pool, prompt = _tiny()
    before = pool.stats()
    p = prompt(4, 1)
    assert generate(model, pool, [p], 4, eos_token_id=torch.tensor(3)) == generate(model, pool, [p], 4,
                                                                                     eos_token_id=3)
    with pytest.raises(ValueError, match="eos_token_id must be"):
        generate(model, pool, [p], 2, eos_token_id=torch.tensor(3.0))
    assert pool.stats().num_sequences == before.num_sequences == 0
    pool.check_integrity()


def test_paged_batch_takes_a_device_name_and_refuses_a_dtype_name():
    """PagedBatch(plan, torch.float32, "cpu") raised AttributeError ('str' object has
    no attribute 'type'); a dtype given as a name got as far as the first layer,
    where torch read it as a device string (RuntimeError)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from kvpager.hf import PagedBatch
    from kvpager.hf.attention import write_attend

    outs = []
    for device in ("cpu", torch.device("cpu")):
        pool = make_pool()
        [c] = pool.allocate([[1, 2, 3]])
        batch = PagedBatch(pool.plan(c.seq_id, 3, c.slots), torch.float32, device)
        assert batch.device == torch.device("cpu") and batch.on_cpu
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 3, 64, generator=g) for _ in range(3))
        outs.append(write_attend(batch, 0, q, k, v, None, None, None))
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(TypeError, match="dtype"):
        PagedBatch(None, "float32", "cpu")


# -- sizing from a config, token ids, FP8 scales, backends ---------------------------------


def test_generate_refuses_a_bool_as_its_count_of_beams():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_hf_models import make_model

    from kvpager import KVPool
    from kvpager.hf import generate, spec_for_model

    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=16, block_size=8))
    with pytest.raises(InvalidArgument, match="num_beams"):
        generate(model, pool, [[5, 6, 7]], 3, num_beams=True)
    assert pool.stats().num_sequences == 0 and torch is not None


# -- arguments whose own comparison or sorting failed --------------------------------------
