"""The traces and the three allocators `peers_vllm.py` drives on them.

A trace is a list of scheduler operations, fixed before any allocator runs:
``("alloc", rid, tokens, salt)`` admits a request (its whole prompt in one
step), ``("step", rids, tokens)`` is one decode step (each listed request gets
one token, its K/V computed in the step), ``("free", rid)`` finishes one.
Every side replays the same operations: a refused admission drops the request,
a refused decode frees it (vLLM's scheduler would preempt it and run it again
later; here it just leaves), and a dropped request's later operations are
skipped on that side only.

Sides: `VllmSide` (vLLM's own `KVCacheManager`, through the calls its
scheduler makes), `KvpagerSide` (`KVPool`, allocator only) and `ModelSide`
(`LRUReference` of tests/test_allocator_vs_lru.py, in its vLLM mode or its
one-block-per-key mode). Each answers ``allocate`` (hit tokens or None),
``decode`` (the requests refused), ``free``, ``probe`` (cached tokens of a
prompt, nothing allocated) and ``state`` (block counts)."""

from __future__ import annotations

import importlib.util
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

BS = 16
VOCAB = 50_000
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Trace:
    name: str
    num_blocks: int  # the pool's blocks, null block 0 included (num_blocks - 1 usable) on every side
    ops: list[tuple]
    prompts: list[tuple[list[int], str | None]]  # distinct prompts, probed at the end
    num_requests: int
    table_blocks: int  # block-table entries over every request's whole length


@dataclass
class Outcome:
    hits: dict[int, int | None] = field(default_factory=dict)  # rid -> hit tokens, None: refused
    cut: dict[int, int] = field(default_factory=dict)  # rid -> decode step refused
    probes: list[int] = field(default_factory=list)  # cached tokens of each of the trace's prompts at the end
    state: dict = field(default_factory=dict)


def rand_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def schedule(name: str, num_blocks: int, specs: list[tuple[list[int], str | None, list[int]]], batch: int) -> Trace:
    """Requests (prompt, salt, decode tokens) admitted in order while fewer than
    ``batch`` run, all running ones decoding a token a step, each freed after
    its last."""
    ops: list[tuple] = []
    live: dict[int, int] = {}  # rid -> decode tokens done
    nxt = 0
    while nxt < len(specs) or live:
        while nxt < len(specs) and len(live) < batch:
            tokens, salt, _ = specs[nxt]
            ops.append(("alloc", nxt, tokens, salt))
            live[nxt] = 0
            nxt += 1
        rids = list(live)
        ops.append(("step", rids, [specs[r][2][live[r]] for r in rids]))
        for r in rids:
            live[r] += 1
            if live[r] == len(specs[r][2]):
                ops.append(("free", r))
                del live[r]
    prompts = list({(tuple(t), s): (t, s) for t, s, _ in specs}.values())
    table = sum(-(-(len(t) + len(d)) // BS) for t, _, d in specs)
    return Trace(name, num_blocks, ops, prompts, len(specs), table)


def shared_trace(seed: int, requests: int, num_blocks: int) -> Trace:
    """8 system prompts of 512-4,096 tokens, Zipf popularity (s = 1.1), each
    request's own tail of 16-512 tokens, 8-64 decode tokens, 32 running."""
    rng = random.Random(seed)
    systems = [rand_tokens(rng, rng.randint(512, 4096)) for _ in range(8)]
    weights = [1 / (k + 1) ** 1.1 for k in range(8)]
    specs = [(rng.choices(systems, weights)[0] + rand_tokens(rng, rng.randint(16, 512)), None,
              rand_tokens(rng, rng.randint(8, 64))) for _ in range(requests)]
    return schedule("shared system prompts", num_blocks, specs, 32)


def unshared_trace(seed: int, requests: int, num_blocks: int) -> Trace:
    """Every prompt its own (64-1,024 tokens), 8-64 decode tokens, 32 running."""
    rng = random.Random(seed)
    specs = [(rand_tokens(rng, rng.randint(64, 1024)), None, rand_tokens(rng, rng.randint(8, 64)))
             for _ in range(requests)]
    return schedule("no sharing", num_blocks, specs, 32)


def boundary_trace(seed: int, requests: int, num_blocks: int) -> Trace:
    """Prompts ending on block boundaries, sent again whole (every block cached:
    the last one computed again), cut to a boundary, extended by a token, or
    continued with the answer their earlier runs decoded (the same tokens for
    every run of a prompt); two salts; 8 running."""
    rng = random.Random(seed)
    bases = [rand_tokens(rng, BS * rng.randint(1, 32)) for _ in range(6)]
    answers = [rand_tokens(rng, 48) for _ in bases]
    specs = []
    for _ in range(requests):
        k = rng.randrange(len(bases))
        base, answer = bases[k], answers[k]
        form = rng.choice(["whole", "whole", "cut", "plus one", "continued"])
        prompt = {"whole": base, "cut": base[: BS * rng.randint(1, len(base) // BS)],
                  "plus one": base + [rng.randrange(VOCAB)],
                  "continued": base + answer[: BS * rng.randint(1, 3)]}[form]
        specs.append((prompt, rng.choice([None, None, "a"]), answer[: rng.randint(1, 48)]))
    return schedule("block boundaries, full hits", num_blocks, specs, 8)


def samples_trace(seed: int, requests: int, num_blocks: int) -> Trace:
    """n > 1: each prompt (100-1,000 tokens) sampled 2 or 4 times, as vLLM's
    front end runs it (n requests of the same prompt, `AsyncLLM.add_request`),
    each sample decoding its own 8-64 tokens; 16 running."""
    rng = random.Random(seed)
    specs: list[tuple[list[int], str | None, list[int]]] = []
    while len(specs) < requests:
        prompt = rand_tokens(rng, rng.randint(100, 1000))
        specs += [(prompt, None, rand_tokens(rng, rng.randint(8, 64))) for _ in range(rng.choice([2, 4]))]
    return schedule("n > 1 samples", num_blocks, specs, 16)


TRACES = {"shared": shared_trace, "unshared": unshared_trace, "boundary": boundary_trace, "samples": samples_trace}


def replay(side, trace: Trace) -> Outcome:
    """Run the trace's operations on one side; hits and refusals per request."""
    out, live, step = Outcome(), set(), 0
    for op in trace.ops:
        if op[0] == "alloc":
            _, rid, tokens, salt = op
            out.hits[rid] = side.allocate(rid, tokens, salt)
            if out.hits[rid] is not None:
                live.add(rid)
        elif op[0] == "step":
            pairs = [(r, t) for r, t in zip(op[1], op[2]) if r in live]
            for rid in side.decode([r for r, _ in pairs], [t for _, t in pairs]):
                out.cut[rid] = step
                live.discard(rid)
            step += 1
        elif op[1] in live:
            side.free(op[1])
            live.discard(op[1])
    return out


def finish(side, trace: Trace, out: Outcome) -> Outcome:
    """The end state and every prompt's cached tokens, after the replay."""
    out.probes = [side.probe(tokens, salt) for tokens, salt in trace.prompts]
    out.state = side.state()
    return out


class VllmSide:
    """vLLM's KVCacheManager: one full-attention group, prefix caching on, its
    default block hash (sha256 of the pickled block), driven as its scheduler
    drives it: get_computed_blocks + allocate_slots for a new request (every
    prompt token scheduled at once), append_output_token_ids + allocate_slots
    of one token per decode step, free."""

    def __init__(self, vllm, num_blocks: int):
        self.v = vllm
        spec = vllm.FullAttentionSpec(block_size=BS, num_kv_heads=1, head_size=8, dtype=vllm.torch.float32)
        config = vllm.KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                                    kv_cache_groups=[vllm.KVCacheGroupSpec(["layer.0"], spec)])
        self.manager = vllm.KVCacheManager(config, max_model_len=1 << 24, scheduler_block_size=BS,
                                           hash_block_size=BS, enable_caching=True)
        self.params = vllm.SamplingParams(max_tokens=1 << 16)
        self.reqs: dict[int, object] = {}

    def request(self, rid: int | str, tokens: list[int], salt: str | None):
        return self.v.Request(str(rid), tokens, self.params, None, cache_salt=salt, block_hasher=self.v.hasher)

    def allocate(self, rid: int, tokens: list[int], salt: str | None) -> int | None:
        req, m = self.request(rid, tokens, salt), self.manager
        blocks, hit, _ = m.get_computed_blocks(req)
        if m.allocate_slots(req, req.num_tokens - hit, hit, blocks) is None:
            return None
        req.num_computed_tokens = req.num_tokens
        req.status = self.v.RequestStatus.RUNNING
        self.reqs[rid] = req
        return hit

    def decode(self, rids: list[int], tokens: list[int]) -> list[int]:
        refused = []
        for rid, token in zip(rids, tokens):
            req = self.reqs[rid]
            req.append_output_token_ids(token)
            if self.manager.allocate_slots(req, 1) is None:
                refused.append(rid)
                self.free(rid)
            else:
                req.num_computed_tokens += 1
        return refused

    def free(self, rid: int) -> None:
        self.manager.free(self.reqs.pop(rid))

    def probe(self, tokens: list[int], salt: str | None) -> int:
        return self.manager.get_num_cached_tokens(self.request("probe", tokens, salt))

    def state(self) -> dict:
        pool = self.manager.block_pool
        blocks = pool.blocks[1:]
        free = pool.get_num_free_blocks()
        return dict(used=len(blocks) - free, free=free,
                    evictable=sum(b.ref_cnt == 0 and b.block_hash is not None for b in blocks),
                    cached=sum(b.block_hash is not None for b in blocks), usage=pool.get_usage())


class KvpagerSide:
    """kvpager's KVPool (CPU backend, 1 layer x 1 head x 8 floats a token: the
    allocator is what runs): allocate + commit at once (vLLM caches a prompt's
    full blocks as it allocates them), a decode step one append + commit of the
    batch (one request at a time, as vLLM, where the batch's is refused)."""

    def __init__(self, num_blocks: int):
        from kvpager import KVPool, PoolSpec
        from kvpager.errors import OutOfBlocks

        self.refusal = OutOfBlocks
        self.pool = KVPool(PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=num_blocks,
                                    dtype="float32"))
        self.seqs: dict[int, int] = {}

    def allocate(self, rid: int, tokens: list[int], salt: str | None) -> int | None:
        try:
            [a] = self.pool.allocate([tokens], salt=salt)
        except self.refusal:
            return None
        self.pool.commit([a.seq_id])
        self.seqs[rid] = a.seq_id
        return a.num_cached_tokens

    def decode(self, rids: list[int], tokens: list[int]) -> list[int]:
        ids = [self.seqs[r] for r in rids]
        try:
            self.pool.append(ids, 1, [[t] for t in tokens])
        except self.refusal:  # nothing changed: go one at a time, freeing the refused as vLLM
            return [r for r, t in zip(rids, tokens) if not self._decode_one(r, t)]
        self.pool.commit(ids)
        return []

    def _decode_one(self, rid: int, token: int) -> bool:
        seq = self.seqs[rid]
        try:
            self.pool.append([seq], 1, [[token]])
        except self.refusal:
            self.free(rid)
            return False
        self.pool.commit([seq])
        return True

    def free(self, rid: int) -> None:
        self.pool.free([self.seqs.pop(rid)])

    def probe(self, tokens: list[int], salt: str | None) -> int:
        return self.pool.cached_tokens([tokens], salt)[0]

    def state(self) -> dict:
        st, bp = self.pool.stats(), self.pool.manager.pool
        return dict(used=st.used_blocks, free=bp.get_num_free_blocks(), evictable=st.evictable_blocks,
                    cached=bp.num_cached, usage=bp.get_usage())


def load_model():
    """`LRUReference` from tests/test_allocator_vs_lru.py (needs pytest, as the tests)."""
    path = REPO / "tests" / "test_allocator_vs_lru.py"
    spec = importlib.util.spec_from_file_location("test_allocator_vs_lru", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.LRUReference


class ModelSide:
    """`LRUReference`: ``one_block_per_key`` False models vLLM (a recomputed
    block cached again under its key), True what kvpager keeps."""

    def __init__(self, model_cls, num_blocks: int, one_block_per_key: bool):
        self.ref = model_cls(num_blocks, one_block_per_key=one_block_per_key)

    def allocate(self, rid: int, tokens: list[int], salt: str | None) -> int | None:
        return self.ref.allocate(rid, tokens, salt)

    def decode(self, rids: list[int], tokens: list[int]) -> list[int]:
        refused = []
        for rid, token in zip(rids, tokens):
            if not self.ref.append(rid, [token]):
                refused.append(rid)
                self.ref.free(rid)
        return refused

    def free(self, rid: int) -> None:
        self.ref.free(rid)

    def probe(self, tokens: list[int], salt: str | None) -> int:
        return self.ref.cached_tokens(tokens, salt)

    def state(self) -> dict:
        ref = self.ref
        free = ref.num_free()
        return dict(used=ref.num_blocks - 1 - free, free=free, evictable=ref.num_evictable(),
                    cached=sum(h is not None for h in ref.hash[1:]), usage=ref.usage())
