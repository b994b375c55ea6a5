"""Padded prompts into kvpager.hf: a tokenizer's batch (``input_ids`` padded on
the left or the right to the longest prompt, and its ``attention_mask``).

Before, ``generate(model, pool, enc["input_ids"], n)`` took each row whole,
pads included, as its prompt (other tokens, silently) and ``generate(model,
pool, **enc, max_new_tokens=n)`` was a TypeError. Now ``attention_mask``
strips each row to its tokens where the mask is 1, ``input_ids`` is another
name for the prompts, and the tokens are those of the same prompts given as
lists without padding, of transformers' greedy ``generate`` of each prompt
alone, and (left padding) of transformers' ``generate`` of the padded batch
with its mask. A mask that is not padding is refused by name with nothing
changed in the pool; a batch that looks padded, given without a mask, warns.
Float32 on the CPU backend, the tiny random models of test_hf_models.py, a
word-level tokenizer built here (one word per token id, pad id 0: the models'
``pad_token_id``)."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from test_hf_models import VOCAB, make_model, one_thread, prompt, reference  # noqa: E402, F401

from kvpager import KVPool  # noqa: E402
from kvpager.hf import PagedGeneration, calibrate_kv_scales, generate, spec_for_model  # noqa: E402

SYSTEM = prompt(35, seed=1)  # shared by two prompts: 4 blocks of 8 shared in the batch
PROMPTS = [SYSTEM + prompt(5, seed=2), prompt(9, seed=3), SYSTEM + prompt(13, seed=4), prompt(1, seed=5)]
NEW = 12


def tokenizer(side: str):
    """A fast tokenizer as transformers gives a causal LM's: ``tok(texts, padding=True,
    return_tensors="pt")`` gives ``input_ids`` and ``attention_mask``; "w<id>" is token <id>."""
    vocab = {f"w{i}": i for i in range(VOCAB)}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w2"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="w0", padding_side=side,
                                                model_input_names=["input_ids", "attention_mask"])


def texts(prompts):
    return [" ".join(f"w{t}" for t in p) for p in prompts]


@functools.cache
def model_of(family: str):
    return make_model(family)


@functools.cache
def references(family: str, n: int = NEW) -> tuple[tuple[int, ...], ...]:
    """transformers' greedy tokens for each prompt alone (no padding anywhere)."""
    return tuple(tuple(reference(model_of(family), p, n)) for p in PROMPTS)


def _pool(model, num_blocks=96):
    return KVPool(spec_for_model(model, num_blocks=num_blocks, block_size=8))


def _refs(family, n=NEW):
    return [list(r) for r in references(family, n)]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "llama4"])
def test_a_tokenizers_padded_batch_gives_the_unpadded_prompts_tokens(family, side):
    """``PagedGeneration(model, pool, **enc, max_new_tokens=n)`` on a padded batch:
    its prompts are the unpadded ones (the shared system prompt is shared in the
    batch, as it would not be with left pads in front of it), and its tokens are
    those of the prompts as lists, and transformers' for each prompt alone. With
    left padding, transformers' own batched ``generate`` of the padded batch and
    its mask gives them too (not for Llama-4, whose chunks transformers counts in
    cache slots, pads included; kvpager's tokens are the unpadded prompts' there).
    Sliding windows (Mistral, Gemma-2) and Llama-4's chunks and position scaling
    count from each prompt's first real token."""
    model = model_of(family)
    enc = tokenizer(side)(texts(PROMPTS), padding=True, return_tensors="pt")
    assert enc["input_ids"].shape == (4, 48) and not enc["attention_mask"].all()
    assert (enc["attention_mask"][:, 0 if side == "left" else -1] == 0).any()
    pool = _pool(model)
    with PagedGeneration(model, pool, **enc, max_new_tokens=NEW) as gen:
        assert gen.prompts == PROMPTS
        assert gen.num_cached_tokens == [0, 0, 32, 0]  # the system prompt's 4 full blocks, shared in the batch
        while not gen.done:
            gen.step()
        padded = gen.outputs
    assert padded == _refs(family)
    assert generate(model, _pool(model), PROMPTS, NEW) == padded
    assert generate(model, _pool(model), enc["input_ids"], NEW, attention_mask=enc["attention_mask"]) == padded
    if side == "left" and family != "llama4":
        with torch.no_grad():
            hf = model.generate(**enc, max_new_tokens=NEW, do_sample=False, num_beams=1)
        assert hf[:, enc["input_ids"].shape[1]:].tolist() == padded
    pool.check_integrity()


def _padded(prompts, side, both=False):
    """The prompts padded with 0 to one length (on ``side``; ``both``: split over both
    sides), and the mask, as NumPy int64."""
    width = max(map(len, prompts)) + (3 if both else 0)
    ids = np.zeros((len(prompts), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        pad = width - len(p)
        start = (pad // 2 if both else pad) if side == "left" else ((pad + 1) // 2 if both else 0)
        ids[i, start:start + len(p)] = p
        mask[i, start:start + len(p)] = 1
    return ids, mask


FORMS = {
    "tensor, long mask": (torch.tensor, torch.tensor),
    "tensor, bool mask": (torch.tensor, lambda m: torch.tensor(m).bool()),
    "tensor, float mask": (torch.tensor, lambda m: torch.tensor(m).float()),
    "tensor, bfloat16 mask": (torch.tensor, lambda m: torch.tensor(m).bfloat16()),
    "tensor, NumPy int32 mask": (torch.tensor, lambda m: m.astype(np.int32)),
    "NumPy, NumPy bool mask": (lambda i: i, lambda m: m.astype(bool)),
    "lists, lists of ints": (lambda i: i.tolist(), lambda m: m.tolist()),
    "lists, lists of bools": (lambda i: i.tolist(), lambda m: m.astype(bool).tolist()),
    "1-D tensors, 1-D tensors": (lambda i: list(torch.tensor(i)), lambda m: list(torch.tensor(m))),
}


@pytest.mark.parametrize("both", [False, True], ids=["one side", "both sides"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_of_a_mask_strips_the_padding(form, side, both):
    """Prompts and mask as tensors, NumPy arrays or lists (0/1 ints, bools, 0.0/1.0
    floats, bfloat16), padded on either side or on both: each prompt's tokens
    where its mask is 1."""
    model = model_of("llama")
    ids, mask = _padded(PROMPTS, side, both)
    as_ids, as_mask = FORMS[form]
    out = generate(model, _pool(model), as_ids(ids), 3, attention_mask=as_mask(mask))
    assert out == _refs("llama", 3)


def test_a_tokenizers_lists_pass_as_keywords():
    """``tok(texts)`` without padding (lists of other lengths, a mask of 1s each) and
    ``tok(texts, padding=True)`` (lists padded to one length) pass as ``**enc``."""
    model = model_of("llama")
    for side in ("left", "right"):
        tok = tokenizer(side)
        ragged = tok(texts(PROMPTS))
        assert list(map(len, ragged["input_ids"])) == list(map(len, PROMPTS))
        assert generate(model, _pool(model), **ragged, max_new_tokens=3) == _refs("llama", 3)
        padded = tok(texts(PROMPTS), padding=True)
        assert len({len(r) for r in padded["input_ids"]}) == 1
        assert generate(model, _pool(model), **padded, max_new_tokens=3) == _refs("llama", 3)
    # a prompt without padding and its mask of 1s: taken as it is
    assert generate(model, _pool(model), [PROMPTS[1]], 3, attention_mask=[[1] * len(PROMPTS[1])]) == \
        [_refs("llama", 3)[1]]


def test_a_pad_id_past_the_vocabulary_is_stripped_before_the_vocabulary_check():
    """A pad token added to the tokenizer without resizing the model's embeddings
    (``tok.add_special_tokens({"pad_token": "[PAD]"})``: id = the vocabulary size)
    is no token the model has: with its mask it is stripped first and the prompts
    are taken; without one the row is refused as before, naming the id."""
    model = model_of("llama")
    ids, mask = _padded(PROMPTS, "left")
    ids[mask == 0] = VOCAB
    pool = _pool(model)
    assert generate(model, pool, ids, 3, attention_mask=mask) == _refs("llama", 3)
    with pytest.raises(ValueError, match=f"holds token id {VOCAB}, outside the model's vocabulary"):
        generate(model, pool, ids, 3)
    pool.check_integrity()


# Two prompts of 3 and 6 tokens, left-padded to 6; each case: (prompts, attention_mask, what the error names)
IDS, MASK = _padded([PROMPTS[3] * 3, PROMPTS[1][:6]], "left")
HOLE, ZEROS, TWO = MASK.copy(), MASK.copy(), MASK.copy()
HOLE[0, 4] = 0
ZEROS[0] = 0
TWO[1, 2] = 2
ADDITIVE = np.where(MASK == 1, 0.0, -np.inf)  # transformers' 4-D masks add 0 or -inf: no 0/1 mask
REFUSED = {
    "a 0 between the 1s": (IDS, HOLE, r"attention_mask\[0\] has a 0 at column 4, between its 1s"),
    "a row of 0s": (IDS, ZEROS, r"attention_mask\[0\] is all 0: prompts\[0\] would have no tokens"),
    "a 2": (IDS, TWO, r"attention_mask\[1\] holds 2: its values must be 0 or 1"),
    "an additive mask": (IDS, ADDITIVE, r"attention_mask\[0\] holds -inf: its values must be 0 or 1"),
    "a half": (IDS, MASK * 0.5, r"holds 0.5"),
    "NaN": (IDS, np.where(MASK == 1, 1.0, np.nan), r"holds nan"),
    "strings": (IDS, [["1"] * 6, ["1"] * 6], r"holds '1'"),
    "None": (IDS, [[None, 1, 1, 1, 1, 1], [1] * 6], r"holds None"),
    "a column short": (IDS, MASK[:, 1:], r"attention_mask\[0\] has 5 entries for the 6 tokens of prompts\[0\]: "
                                         r"it must have the prompts' shape \(attention_mask \(2, 5\), prompts \(2, 6\)\)"),
    "a row short": (IDS, MASK[:1], r"attention_mask has 1 row for 2 prompts"),
    "transposed": (IDS, MASK.T, r"attention_mask has 6 rows for 2 prompts"),
    "flat": (IDS, MASK[1], r"attention_mask is one flat row of 6: it must have the prompts' shape"),
    "flat, one prompt": (IDS[1:], MASK[1], r"attention_mask is one flat row of 6.*\[mask\] for one prompt"),
    "3-D": (IDS, MASK[:, None], r"attention_mask\[0\] is a 2-D row"),
    "a string": (IDS, "left", r"attention_mask must be a tensor, array or list"),
    "a number": (IDS, 1, r"attention_mask must be a tensor, array or list"),
    # ragged prompts with the padded batch's mask: its rows are not theirs
    "ragged prompts, padded mask": ([PROMPTS[3] * 3, PROMPTS[1][:6]], MASK,
                                    r"attention_mask\[0\] has 6 entries for the 3 tokens of prompts\[0\]"),
}


def _busy_pool(model):
    """A pool holding cached blocks of an earlier generation, so that a refusal's
    "nothing changed" covers the prefix cache and its counters too."""
    pool = _pool(model, num_blocks=32)
    generate(model, pool, PROMPTS[:2], 2)
    assert pool.stats().cached_blocks > 0
    return pool


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_mask_that_is_not_padding_is_refused_with_nothing_changed(case):
    """Only padding, a run of 0s before or after a row's tokens, is stripped. A 0
    between a row's 1s (kvpager cannot skip a prompt's middle tokens, and a mask
    with holes is no tokenizer's padding: most likely another batch's), a row of 0s,
    a mask of another shape (or a padded batch's mask for ragged prompts) and values
    other than 0 and 1 (an additive float mask) are each a ValueError (kvpager's
    InvalidArgument) naming the row, raised before anything is allocated."""
    from kvpager.errors import InvalidArgument

    model = model_of("llama")
    pool = _busy_pool(model)
    before = pool.stats()
    ids, mask, needle = REFUSED[case]
    with pytest.raises(InvalidArgument, match=needle):
        generate(model, pool, ids, 3, attention_mask=mask)
    with pytest.raises(ValueError, match=needle):
        PagedGeneration(model, pool, input_ids=ids, attention_mask=mask, max_new_tokens=3)
    assert pool.stats() == before
    pool.check_integrity()
    # the same pool takes the right mask afterwards
    assert generate(model, pool, IDS, 3, attention_mask=MASK) == \
        [reference(model, PROMPTS[3] * 3, 3), reference(model, PROMPTS[1][:6], 3)]


def test_prompts_under_two_names_or_none_or_a_whole_encoding_are_refused():
    """``prompts`` and ``input_ids`` are one argument under two names: both given is
    refused (as transformers refuses ``inputs`` with ``input_ids``), neither too; a
    tokenizer's whole output given as the prompts (``generate(model, pool, enc,
    n)``, where ``**enc`` was meant: its keys were read as prompts) says what to
    pass. Nothing allocated."""
    model = model_of("llama")
    pool = _busy_pool(model)
    before = pool.stats()
    enc = tokenizer("left")(texts(PROMPTS[:2]), padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match="prompts and input_ids were both given"):
        generate(model, pool, enc["input_ids"], 3, input_ids=enc["input_ids"])
    with pytest.raises(ValueError, match="no prompts: give them as prompts"):
        generate(model, pool, max_new_tokens=3, attention_mask=enc["attention_mask"])
    with pytest.raises(ValueError, match=r"prompts is a tokenizer's output.*\*\*enc"):
        generate(model, pool, enc, 3)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got None"):
        generate(model, pool, **enc)
    assert pool.stats() == before
    pool.check_integrity()


def test_a_padded_batch_through_a_daemon_client():
    """The padding is stripped before the pool is asked anything: a daemon ``Client``
    gets the unpadded prompts, and a refused mask sends it nothing."""
    pytest.importorskip("zmq")
    from daemon_helpers import running_server

    from kvpager.client import Client

    model = model_of("llama")
    enc = tokenizer("left")(texts(PROMPTS), padding=True, return_tensors="pt")
    spec = spec_for_model(model, num_blocks=64, block_size=8)
    with running_server(spec) as server, Client(server.endpoint) as pool:
        assert generate(model, pool, **enc, max_new_tokens=NEW) == _refs("llama")
        before = pool.stats()
        hole = enc["attention_mask"].clone()
        hole[0, -3] = 0
        with pytest.raises(ValueError, match="between its 1s"):
            generate(model, pool, enc["input_ids"], 3, attention_mask=hole)
        assert pool.stats() == before


# -- a batch that looks padded, given without a mask -------------------------------------------
def _whole(model, tokens, n):
    """transformers' tokens for ``tokens`` taken whole, pads included (its ``generate``
    guesses a mask from the pad id where none is given: a mask of 1s says none is wanted)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([tokens]), attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, num_beams=1)
    return out[0, len(tokens):].tolist()


def test_a_padded_batch_without_its_mask_warns_at_the_callers_line():
    """Rows of one length that the model's pad id leads (or ends) a different number
    of times: a UserWarning naming the way out, attributed to the caller's line, and
    under Python's default filters shown once for that line. The rows are still
    taken whole (what the caller asked for), so the tokens are the padded rows'."""
    model = model_of("llama")
    for side in ("left", "right"):
        enc = tokenizer(side)(texts(PROMPTS), padding=True, return_tensors="pt")
        with pytest.warns(UserWarning, match=r"prompts look padded.*pad token id 0.*attention_mask") as caught:
            out = generate(model, _pool(model), enc["input_ids"], 2)
        assert [w.filename for w in caught] == [__file__]
        assert out == [_whole(model, row, 2) for row in enc["input_ids"].tolist()]
        assert out != _refs("llama", 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            generate(model, _pool(model), enc["input_ids"].numpy(), 1)
    assert len(caught) == 1


def test_unpadded_input_does_not_warn():
    """No warning where nothing says padding: a batch of rows of one length without
    the pad id at their ends (or with it in their middle), rows that each start with
    the pad id once (a model whose pad id is its BOS), prompts of other lengths, a
    batch given with its mask, and a single row (whose padding cannot be told from
    its tokens: not warned, a miss by design)."""
    model = model_of("llama")
    same = [prompt(6, seed=s) for s in range(3)]
    middle = [p[:3] + [0] + p[3:] for p in same]
    ids, mask = _padded(PROMPTS, "left")
    bos_pad = make_model("llama", pad_token_id=1)
    bos_pad.generation_config.pad_token_id = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(model, _pool(model), torch.tensor(same), 1)
        generate(model, _pool(model), torch.tensor(middle), 1)
        generate(bos_pad, _pool(bos_pad), torch.tensor([[1] + p for p in same]), 1)
        generate(model, _pool(model), PROMPTS, 1)
        generate(model, _pool(model), ids, 1, attention_mask=mask)
        generate(model, _pool(model), ids[3:], 1)


# -- FP8 calibration takes a padded batch too ------------------------------------------------
def test_calibration_strips_a_padded_batchs_padding():
    """``calibrate_kv_scales(model, **enc)``: the scales of the unpadded prompts (the
    largest of each prompt's own), where the pads would have been calibrated on
    (before: a TypeError for the keyword). A flat prompt takes a flat mask; a mask
    that is not padding is refused by name."""
    from kvpager.errors import InvalidArgument

    model = model_of("llama")
    own = np.max([np.asarray(calibrate_kv_scales(model, p)) for p in PROMPTS], axis=0)
    for side in ("left", "right"):
        enc = tokenizer(side)(texts(PROMPTS), padding=True, return_tensors="pt")
        np.testing.assert_allclose(np.asarray(calibrate_kv_scales(model, **enc)), own, rtol=1e-5)
    ids, mask = _padded([PROMPTS[1]], "right")
    np.testing.assert_allclose(calibrate_kv_scales(model, ids[0].tolist(), attention_mask=mask[0].tolist()),
                               calibrate_kv_scales(model, PROMPTS[1]), rtol=1e-5)
    mask[0, 2] = 0
    with pytest.raises(InvalidArgument, match="between its 1s"):
        calibrate_kv_scales(model, ids, attention_mask=mask)
