"""`kvpager demo`'s worker process: a stand-in model (fixed random projections)
that prefills requests sharing a system prompt through its own `Client`,
decodes with paged attention over the shared blocks, and holds its sequences
at the peak until the parent has read the daemon's accounting."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from kvpager.demo import DemoConfig

SALT = "kvpager-demo-model"
VOCAB = 512


class StandInModel:
    """Fixed random projections from token ids to K, V and Q (same in every worker)."""

    def __init__(self, cfg: DemoConfig):
        rng = np.random.default_rng(1234)
        h, d = cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.k = rng.standard_normal((cfg.num_layers, VOCAB, h, d)).astype(np.float32)
        self.v = rng.standard_normal((cfg.num_layers, VOCAB, h, d)).astype(np.float32)
        self.q = rng.standard_normal((cfg.num_layers, VOCAB, cfg.num_q_heads, d)).astype(np.float32)
        self.unembed = rng.standard_normal((cfg.num_q_heads * d, VOCAB)).astype(np.float32)

    def prefill(self, client, slots: np.ndarray, tokens: np.ndarray) -> None:
        for layer in range(self.cfg.num_layers):
            client.write(layer, slots, self.k[layer, tokens], self.v[layer, tokens])

    def decode(self, client, seq_ids: list[int], last: np.ndarray) -> np.ndarray:
        """One step for a batch: K/V of each last token are already written."""
        out = None
        for layer in range(self.cfg.num_layers):
            out = client.attend(layer, seq_ids, self.q[layer, last])
        if not isinstance(out, np.ndarray):  # a CuPy array from a GPU pool
            out = out.get()
        logits = out.reshape(len(seq_ids), -1) @ self.unembed
        return logits.argmax(axis=1)


def run_worker(index: int, endpoint: str, cfg: DemoConfig, prompt_ready, at_peak, release, results) -> None:
    """The worker process: Ctrl-C is the parent's (it stops the workers), and an
    error (the daemon gone) is one line on stderr and exit code 1, not a traceback."""
    import signal
    import sys

    from kvpager.errors import KVPagerError

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _work(index, endpoint, cfg, prompt_ready, at_peak, release, results)
    except KVPagerError as e:
        print(f"error: demo worker {index}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def _work(index: int, endpoint: str, cfg: DemoConfig, prompt_ready, at_peak, release, results) -> None:
    from kvpager.client import Client

    rng = np.random.default_rng([cfg.seed, index])
    system = np.random.default_rng(cfg.seed).integers(0, VOCAB, cfg.system_prompt_tokens)
    model = StandInModel(cfg)
    with Client(endpoint, name=f"demo-worker-{index}") as client:
        if index != 0:
            prompt_ready.wait(60)  # worker 0 prefills the system prompt first
        prompts = [np.concatenate([system, rng.integers(0, VOCAB, int(rng.integers(*cfg.user_tokens)))])
                   for _ in range(cfg.requests_per_worker)]
        if index == 0:
            first = client.allocate([prompts[0]], salt=SALT)
            model.prefill(client, first[0].slots, prompts[0][first[0].num_cached_tokens:])
            client.commit([first[0].seq_id])  # the K/V is written: publish the prompt blocks
            prompt_ready.set()
            rest = client.allocate(prompts[1:], salt=SALT) if len(prompts) > 1 else []
            allocs = first + rest
        else:
            allocs = client.allocate(prompts, salt=SALT)
        for a, p in zip(allocs[1 if index == 0 else 0:], prompts[1 if index == 0 else 0:]):
            model.prefill(client, a.slots, p[a.num_cached_tokens:])
        seq_ids = [a.seq_id for a in allocs]
        client.commit(seq_ids)
        last = np.array([p[-1] for p in prompts])
        for _ in range(cfg.new_tokens):
            slots = client.append(seq_ids, 1, token_ids=[[int(t)] for t in last])
            flat = np.concatenate(slots)
            model.prefill(client, flat, last)
            last = model.decode(client, seq_ids, last)
            client.commit(seq_ids)
        results.put((index, [a.num_cached_tokens for a in allocs], [len(p) + cfg.new_tokens for p in prompts]))
        at_peak.wait(120)  # hold the sequences while the parent reads the pool
        release.wait(120)
        client.free(seq_ids)
