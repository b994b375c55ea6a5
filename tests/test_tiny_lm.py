"""tools/tiny_lm.py and the text path of tools/fp8_accuracy.py, on the CPU.

A very small byte-level Llama is trained for 120 steps on a slice of
the standard library: its training loss must fall and its held-out loss must
end below the corpus's unigram entropy (a model that ignores context), while
the same model untrained sits near log2(vocabulary). fp8_accuracy then runs
its held-out-text prompts on the saved folder."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


tiny_lm = _tool("tiny_lm")
fp8_accuracy = _tool("fp8_accuracy")

ARGS = ["--steps", "120", "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
        "--head-dim", "16", "--seq-len", "64", "--batch", "16", "--warmup", "10", "--lr", "1e-2",
        "--log-every", "20", "--train-bytes", "300000", "--heldout-bytes", "60000", "--eval-windows", "32",
        "--seed", "3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))  # the same arithmetic on any machine
    try:
        args = tiny_lm.parse_args(ARGS)
        corpus = tiny_lm.load_corpus(args.train_bytes, args.heldout_bytes)
        model = tiny_lm.build_model(args)
        untrained = tiny_lm.evaluate(model, torch.from_numpy(corpus.heldout), args.seq_len, args.batch, False,
                                     args.eval_windows)
        lines: list[str] = []
        result = tiny_lm.train(model, corpus, args, log=lines.append)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("tiny")
    tiny_lm.save(model, corpus, args, result, out)
    return dict(args=args, corpus=corpus, result=result, untrained=untrained, lines=lines, out=out)


def test_corpus_is_fixed_and_split_by_file():
    a = tiny_lm.load_corpus(200_000, 30_000)
    b = tiny_lm.load_corpus(200_000, 30_000)
    assert a.sha256 == b.sha256 and a.train_files == b.train_files
    assert not set(a.train_files) & set(a.heldout_files)
    assert len(a.train) <= 200_000 + 2 * len(a.train_files) and len(a.heldout_text) <= 30_000
    for rel in a.train_files + a.heldout_files:
        assert rel.endswith(".py")
        assert not {"test", "tests", "site-packages"} & set(rel.split("/")[:-1])
    # Each file is BOS + its bytes + EOS, in order.
    root = Path(a.root)
    first = (root / a.heldout_files[0]).read_bytes()
    assert a.heldout[0] == tiny_lm.BOS and a.heldout[len(first) + 1] == tiny_lm.EOS
    assert bytes(a.heldout[1:len(first) + 1].astype(np.uint8)) == first
    assert a.heldout_text == b"".join((root / r).read_bytes() for r in a.heldout_files)
    assert tiny_lm.load_corpus(300_000, 30_000).heldout_files == a.heldout_files  # whatever the train budget


def test_unigram_and_schedule():
    ids = np.array([0, 1, 2, 3] * 5)
    assert tiny_lm.unigram_bits(ids) == pytest.approx(2.0)
    assert tiny_lm.lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert tiny_lm.lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert tiny_lm.lr_factor(99, 10, 100) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90)))
    assert tiny_lm.lr_factor(100, 10, 100) == pytest.approx(0.1)


def test_training_lowers_the_loss(trained):
    history, result = trained["result"]["history"], trained["result"]
    assert [s for s, _ in history] == [20, 40, 60, 80, 100, 120]
    assert len(trained["lines"]) == 7 and "held-out" in trained["lines"][-1]
    assert trained["untrained"] > math.log2(tiny_lm.VOCAB) - 0.5
    assert history[-1][1] < history[0][1] - 1.0
    unigram = tiny_lm.unigram_bits(trained["corpus"].heldout)
    assert result["heldout_bits_per_byte"] < unigram - 0.25


def test_saved_folder(trained):
    out = trained["out"]
    meta = json.loads((out / tiny_lm.META).read_text())
    assert meta["byte_level"] and meta["settings"]["hidden"] == 64 and meta["settings"]["steps"] == 120
    assert meta["heldout_bits_per_byte"] == trained["result"]["heldout_bits_per_byte"]
    assert (out / meta["heldout_text"]).read_bytes() == trained["corpus"].heldout_text
    assert meta["corpus"]["sha256"] == trained["corpus"].sha256


def test_text_inputs_are_held_out_lines():
    text = b"".join(b"line %d of the held-out text\n" % i for i in range(400))
    inputs = fp8_accuracy.text_inputs(text, 3, 40, 8, 100)
    assert len(inputs.cases) == 3 and len(inputs.sample) == 100
    starts = []
    for prompt, feed in inputs.cases:
        assert len(prompt) == 40 and len(feed) == 8
        snippet = bytes(prompt + feed)
        starts.append(text.index(snippet))
        assert starts[-1] == 0 or text[starts[-1] - 1:starts[-1]] == b"\n"
    assert starts == sorted(set(starts)) and text.index(bytes(inputs.sample)) > starts[-1] + 48
    with pytest.raises(ValueError, match="too short"):
        fp8_accuracy.text_inputs(text[:300], 3, 40, 8, 100)


def test_fp8_accuracy_on_held_out_text(trained, capsys):
    rows = fp8_accuracy.main(["--model", str(trained["out"]), "--prompts", "2", "--prompt-len", "48",
                              "--steps", "4"])
    table = capsys.readouterr().out
    assert "byte-level Llama, 2 layers, hidden 64" in table and "2 prompt(s) x (prefill + 4 steps)" in table
    assert [(r["kv_dtype"], r["scales"]) for r in rows] == [
        ("float16", "-"), ("float8_e4m3", "calibrated"), ("float8_e4m3", "1.0"), ("float8_e5m2", "calibrated"),
        ("float8_e5m2", "1.0")]
    for r in rows:
        assert 0 < r["min"] <= r["median"] <= r["max"] < 0.5  # the pool moved the logits, but not wildly
        assert r["memory"] == (1.0 if r["scales"] == "-" else 0.5) and 0 <= r["agree"] <= 1
    # e4m3 keeps 3 mantissa bits, float16 10: its rounding moves the logits further
    assert rows[1]["median"] > rows[0]["median"]


def test_fp8_accuracy_refuses_text_for_random_models():
    with pytest.raises(SystemExit):
        fp8_accuracy.main(["--text", __file__])
