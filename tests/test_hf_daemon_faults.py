"""kvpager.hf over a daemon that stalls past the client's timeout or refuses a
step by its limits: a generation whose step timed out refuses to go on by name
(its next steps gave other tokens than transformers', without a word: the
timed-out append ran later, when the client sent it again) and `close` frees
its sequences; `generate`, `score` and `beam_search` that time out leave
nothing held once the daemon answers; a beam search refused by the ids limit
frees every beam and says why. CPU backend, a daemon subprocess per test."""

from __future__ import annotations

import os
import signal
import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from daemon_helpers import daemon_process, ipc_endpoint  # noqa: E402
from test_hf_models import make_model, prompt, reference  # noqa: E402

from kvpager.client import Client  # noqa: E402
from kvpager.errors import InvalidArgument, LimitExceeded, RequestTimeout  # noqa: E402
from kvpager.hf import PagedGeneration, beam_search, generate, score, spec_for_model  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")


def _args(model, *extra: str) -> list[str]:
    spec = spec_for_model(model, num_blocks=256, block_size=8)
    return ["--layers", str(spec.num_layers), "--kv-heads", str(spec.num_kv_heads), "--head-dim",
            str(spec.head_dim), "--block-size", "8", "--blocks", "256", "--dtype", "float32", "--device", "cpu",
            "--heartbeat-timeout", "30", *extra]


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_step_that_timed_out_stops_the_generation_by_name(pipeline):
    model = make_model("llama")
    ids = prompt(20, 1)
    endpoint, _ = ipc_endpoint()
    with daemon_process(_args(model), endpoint) as proc, Client(endpoint, timeout=0.5) as client:
        gen = PagedGeneration(model, client, [ids], 12, pipeline=pipeline)
        for _ in range(3):
            gen.step()
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(RequestTimeout):
                gen.step()
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        with pytest.raises(InvalidArgument, match="timed out during an earlier step"):
            gen.step()
        got = gen.outputs[0]
        assert got == reference(model, ids, 12)[: len(got)]  # what it gave before is right
        gen.close()
        assert client.stats().num_sequences == 0 and client.stats().used_blocks == 0
        # and the next generation on the same client gives transformers' tokens
        assert generate(model, client, [ids], 12) == [reference(model, ids, 12)]


@pytest.mark.parametrize("call", ["generate", "score", "beam_search"])
def test_a_call_that_timed_out_leaves_nothing_held(call):
    model = make_model("llama")
    ps = [prompt(20, 1), prompt(30, 2)]
    endpoint, _ = ipc_endpoint()
    with daemon_process(_args(model), endpoint) as proc, Client(endpoint, timeout=0.5) as client:
        run = {"generate": lambda: generate(model, client, ps, 40),
               "score": lambda: score(model, client, ps, tokens_per_pass=8),
               "beam_search": lambda: beam_search(model, client, ps, 40, num_beams=2)}[call]
        stalled = False

        def stall_once(*_):  # the daemon stops past the client's timeout in the middle of the call
            nonlocal stalled
            if not stalled:
                stalled = True
                os.kill(proc.pid, signal.SIGSTOP)

        hook = model.model.layers[0].register_forward_hook(stall_once)
        try:
            with pytest.raises(RequestTimeout):
                run()
        finally:
            hook.remove()
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.2)
        stats = client.stats()  # (the free its cleanup could not send goes first)
        assert (stats.num_sequences, stats.used_blocks) == (0, 0)


def test_a_beam_search_refused_by_the_ids_limit_frees_every_beam():
    model = make_model("llama")
    ps = [prompt(9 + i, 100 + i) for i in range(4)]
    endpoint, _ = ipc_endpoint()
    with daemon_process(_args(model, "--max-ids", "8"), endpoint), Client(endpoint) as client:
        with pytest.raises(LimitExceeded, match="append"):  # 12 beams a step; `free` masked it before
            beam_search(model, client, ps, 6, num_beams=3)
        assert (client.stats().num_sequences, client.stats().used_blocks) == (0, 0)
