"""Pipelined decode steps through a daemon `Client`: pipelined only where the
daemon answers `record_tokens`; one round trip a step where it answers `batch`;
a step's calls one by one where the daemon's limits refuse them together; and
what a batch that fails part way leaves (nothing leaked, `close` frees the rest).
The tokens are transformers' throughout."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("zmq")

from kvpager.hf import PagedGeneration, default_salt, spec_for_model  # noqa: E402
from tests.test_hf_client import make_model, prompt, reference  # noqa: E402


def without_batch(server, monkeypatch) -> None:
    """``server`` as a daemon that predates the `batch` op: hello's ``ops`` lack it."""
    hello = server._handlers["hello"]
    monkeypatch.setitem(server._handlers, "hello", lambda s, a: {
        **hello(s, a), "ops": [o for o in hello(s, a)["ops"] if o != "batch"]})


@pytest.fixture(scope="module")
def model():
    return make_model(seed=4)  # its tokens vary (seed 5 repeats one a prompt)


@pytest.mark.parametrize("daemon_has_it", [True, False])
def test_through_a_daemon_pipelined_only_where_it_answers_record_tokens(model, daemon_has_it, monkeypatch):
    """A daemon `Client` pipelines when its daemon lists `record_tokens` among its
    ops (hello's ``ops``); one that predates the op (no ``ops`` in its hello, no
    handler) gets the unpipelined loop instead of an `unknown_op` mid-generation.
    Both give transformers' tokens."""
    from daemon_helpers import running_server

    from kvpager.client import Client

    prompts = [prompt(n, seed=120 + n) for n in (6, 19)]
    spec = spec_for_model(model, num_blocks=128, block_size=8)
    with running_server(spec, heartbeat_timeout=60) as server:
        if not daemon_has_it:  # as an older daemon: no op list, no such op
            hello = server._handlers["hello"]
            monkeypatch.setitem(server._handlers, "hello",
                                lambda s, a: {k: v for k, v in hello(s, a).items() if k != "ops"})
            monkeypatch.delitem(server._handlers, "record_tokens")
        with Client(server.endpoint) as c:
            assert ("record_tokens" in c.ops) == daemon_has_it
            with PagedGeneration(model, c, prompts, 10) as gen:
                assert gen._pipelined == daemon_has_it
                while not gen.done:
                    gen.step()
                assert gen.outputs == [reference(model, p, 10) for p in prompts]
            assert c.stats().num_sequences == 0
            c.check_integrity()


@pytest.mark.parametrize("has_batch", [True, False])
def test_through_a_daemon_a_pipelined_step_is_one_round_trip(model, has_batch, monkeypatch):
    """Where the daemon answers `batch`, each pipelined decode step is one request:
    a steady step's append alone, and a block's worth of steps later the append
    carrying the `record_tokens` and the `commit` they owed (`Owed`: one of each);
    the last step sends what is left alone. A daemon without it gets them one by
    one. The same tokens as transformers either way, every sequence freed, the
    generated blocks matchable."""
    from daemon_helpers import running_server

    from kvpager import protocol
    from kvpager.client import Client

    prompts = [prompt(n, seed=140 + n) for n in (5, 17, 30)]
    spec = spec_for_model(model, num_blocks=128, block_size=8)
    seen: list[str] = []

    with running_server(spec, heartbeat_timeout=60) as server:
        if not has_batch:  # as a daemon that predates the op
            without_batch(server, monkeypatch)
        with Client(server.endpoint) as c:
            steps = []
            with PagedGeneration(model, c, prompts, 12, eos_token_id=None) as gen:
                assert gen._pipelined and gen._batched == has_batch
                handle = server.handle

                def counted(body):  # every request the loop takes (a repeat is not decoded again)
                    req = protocol.decode_request(body, server.max_message_bytes)
                    seen.append(req.op if req.op != "batch" else "batch:" + ",".join(op for op, _ in req.args["ops"]))
                    return handle(body)

                server.handle = counted
                while not gen.done:
                    n = len(seen)
                    gen.step()
                    steps.append([op for op in seen[n:] if op != "heartbeat"])
                server.handle = handle
                assert gen.outputs == [reference(model, p, 12) for p in prompts]
            assert c.stats().num_sequences == 0
            c.check_integrity()
            salt = default_salt(model)
            assert c.cached_tokens([p + o for p, o in zip(prompts, gen.outputs)], salt) == [
                (len(p) + 11) // 8 * 8 for p in prompts]
    # 11 decode passes (12 tokens, the prefill gave the first), blocks of 8 tokens: the 9th step
    # completes the 8th pass, whose ids and commit the 10th step's append carries with the 7
    # passes' before; the last step completes the 11th pass and says what the 9th and 10th owe
    if has_batch:
        assert steps == [["append"]] * 9 + [["batch:record_tokens,commit,append"], ["append"],
                                                            ["batch:record_tokens,commit,commit,free"]], steps
    else:
        # (each call made as the step completes its pass, after the step's append)
        assert steps == [["append"]] * 8 + [["append", "record_tokens", "commit"], ["append"], ["append"],
                                            ["record_tokens", "commit", "commit", "free"]], steps


def test_a_daemon_whose_limits_refuse_a_step_together_gets_its_calls_one_by_one(model, monkeypatch):
    """A daemon whose ids limit holds each of a step's calls but not all of them in one
    batch (three sequences, a limit of four ids): the first refused batch runs its calls
    one by one, and so do the steps after it; transformers' tokens, every sequence freed."""
    from daemon_helpers import running_server

    from kvpager.client import Client
    from kvpager.limits import Limits

    prompts = [prompt(n, seed=170 + n) for n in (5, 12, 20)]
    spec = spec_for_model(model, num_blocks=128, block_size=8)
    with running_server(spec, heartbeat_timeout=60, limits=Limits(ids=4)) as server, Client(server.endpoint) as c:
        with PagedGeneration(model, c, prompts, 7, eos_token_id=None) as gen:
            assert gen._batched
            while not gen.done:
                gen.step()
            assert not gen._batched
            assert gen.outputs == [reference(model, p, 7) for p in prompts]
        assert c.stats().num_sequences == 0
        c.check_integrity()


@pytest.mark.parametrize("has_batch", [True, False])
def test_owed_ids_over_a_small_tokens_limit_go_a_pass_at_a_time(model, has_batch, monkeypatch):
    """A daemon whose tokens limit (12) holds one pass's ids for the batch (3) but
    not a block's worth of passes' (3 x 8) in one `record_tokens`: the refused
    call is made again a pass's ids a call, owing stops, and the generation ends
    with transformers' tokens, its blocks published, nothing leaked; with or
    without the `batch` op."""
    from daemon_helpers import running_server

    from kvpager.client import Client
    from kvpager.limits import Limits

    prompts = [prompt(n, seed=190 + n) for n in (2, 3, 4)]  # 9 tokens: the allocate fits too
    spec = spec_for_model(model, num_blocks=128, block_size=8)
    with running_server(spec, heartbeat_timeout=60, limits=Limits(tokens=12)) as server:
        if not has_batch:
            without_batch(server, monkeypatch)
        with Client(server.endpoint) as c:
            with PagedGeneration(model, c, prompts, 20, eos_token_id=None) as gen:
                assert gen._pipelined and gen._batched == has_batch and gen._may_owe
                while not gen.done:
                    gen.step()
                assert not gen._may_owe
                assert gen.outputs == [reference(model, p, 20) for p in prompts]
            assert c.stats().num_sequences == 0
            c.check_integrity()
            # (asked of the daemon's pool: the question itself is over the limit)
            assert server.pool.cached_tokens([p + o for p, o in zip(prompts, gen.outputs)], default_salt(model)) == [
                (len(p) + 19) // 8 * 8 for p in prompts]


def test_a_failed_batch_leaves_the_sequences_it_did_not_free_to_close(model, monkeypatch):
    """The daemon refuses a commit in the last step's batch, before the free of
    every finished sequence: the step raises that typed error, the free did not
    run, and `close` frees those sequences (they were dropped from the held set
    and stayed live until the session ended). Nothing leaks; the pool is consistent."""
    from daemon_helpers import running_server

    from kvpager.client import Client
    from kvpager.errors import InvalidArgument

    prompts = [prompt(n, seed=180 + n) for n in (6, 13)]
    spec = spec_for_model(model, num_blocks=128, block_size=8)
    with running_server(spec, heartbeat_timeout=60) as server, Client(server.endpoint) as c:
        with PagedGeneration(model, c, prompts, 4, eos_token_id=None) as gen:
            steps = 0
            while not gen.done:
                gen.step()
                steps += 1
        commit, refuse = server._handlers["commit"], []

        def flaky(session, args):
            if refuse:
                raise InvalidArgument("commit refused (test)")
            return commit(session, args)

        monkeypatch.setitem(server._handlers, "commit", flaky)
        gen = PagedGeneration(model, c, prompts, 4, eos_token_id=None)
        assert gen._batched
        for _ in range(steps - 1):
            gen.step()
        refuse.append(True)
        with pytest.raises(InvalidArgument, match="refused"):
            gen.step()  # completes the last pass: [commit, free] in one batch
        assert c.stats().num_sequences == len(prompts)
        refuse.clear()
        gen.close()
        assert c.stats().num_sequences == 0
        c.check_integrity()
