"""Worker-process bodies for the GPU daemon tests (spawned: importable by name).

Each maps the daemon's GPU pool through CUDA IPC in its own process. K/V and
queries come from `daemon_workers` (deterministic per seed, layer, position);
every result goes back to the test as NumPy arrays."""

from __future__ import annotations

import numpy as np
from daemon_workers import dense_kv, query

from kvpager.client import Client


def _gather(view, table: list[int], n: int) -> np.ndarray:
    """Positions [0, n) of one layer's K or V view ([blocks, H, bs, D]) along a block table."""
    import cupy

    g = view[cupy.asarray(np.asarray(table, np.int64))]  # [nb, H, bs, D]
    nb, h, bs, d = g.shape
    return cupy.asnumpy(g.transpose(0, 2, 1, 3).reshape(nb * bs, h, d)[:n])


def gpu_prefix_writer(endpoint: str, prompt: list[int], seed: int, out, done) -> None:
    """Worker A: allocate the system prompt, write its K/V through its own IPC
    mapping (CuPy), commit (which waits for the device first), hold it until ``done``."""
    import cupy

    with Client(endpoint) as c:
        assert c.gpu and c.map_pool and not c._same_process()
        spec = c.spec
        [a] = c.allocate([prompt])
        for layer in range(spec.num_layers):
            k, v = dense_kv(seed, layer, len(prompt), spec.num_kv_heads, spec.head_dim, spec.dtype)
            c.write(layer, a.slots, cupy.asarray(k), cupy.asarray(v))
        c.commit(a.seq_id)
        out.put({"seq_id": a.seq_id, "block_table": a.block_table, "session": c.session_name,
                 "memory_epoch": c.memory["epoch"], "epoch": c.epoch})
        done.wait(120)


def gpu_prefix_reader(endpoint: str, tokens: list[int], seed: int, num_q_heads: int, out, done) -> None:
    """Worker B: allocate prompt + suffix, write only the uncached K/V (torch
    tensors through DLPack when torch is there), attend through its mapping
    (``local``) and through the daemon's device staging (``remote``, a client
    that does not map the pool); read the prefix back through `kv` and `torch_kv`."""
    import cupy

    try:
        import torch
    except ImportError:
        torch = None
    with Client(endpoint) as c, Client(endpoint, map_pool=False) as r:
        spec = c.spec
        [b] = c.allocate([tokens])
        n, start = len(tokens), b.num_cached_tokens
        for layer in range(spec.num_layers):
            k, v = dense_kv(seed, layer, n, spec.num_kv_heads, spec.head_dim, spec.dtype)
            if torch is not None:
                c.write(layer, b.slots, torch.from_numpy(k[start:]).cuda(), torch.from_numpy(v[start:]).cuda())
            else:
                c.write(layer, b.slots, cupy.asarray(k[start:]), cupy.asarray(v[start:]))
        c.commit(b.seq_id)
        res = {"seq_id": b.seq_id, "block_table": b.block_table, "cached": start, "torch": torch is not None,
               "local": [], "remote": [], "local_multi": [], "remote_multi": [], "k": [], "v": [],
               "torch_k": [], "torch_same_memory": []}
        qlen = n - start
        for layer in range(spec.num_layers):
            q = query(seed, layer, 1, num_q_heads, spec.head_dim, spec.dtype)
            res["local"].append(cupy.asnumpy(c.attend(layer, [b.seq_id], cupy.asarray(q))))
            res["remote"].append(cupy.asnumpy(r.attend(layer, [b.seq_id], q)))
            qm = query(seed, layer, qlen, num_q_heads, spec.head_dim, spec.dtype)
            res["local_multi"].append(cupy.asnumpy(c.attend(layer, [b.seq_id], cupy.asarray(qm), [qlen])))
            res["remote_multi"].append(cupy.asnumpy(r.attend(layer, [b.seq_id], cupy.asarray(qm), [qlen])))
            kview, vview = c.kv(layer)
            res["k"].append(_gather(kview, list(b.block_table), n))
            res["v"].append(_gather(vview, list(b.block_table), n))
            if torch is not None:
                kt, _ = c.torch_kv(layer)
                res["torch_same_memory"].append(kt.data_ptr() == kview.data.ptr)
                res["torch_k"].append(kt[torch.as_tensor(b.block_table, device=kt.device)]
                                      .transpose(1, 2).reshape(-1, spec.num_kv_heads, spec.head_dim)[:n]
                                      .cpu().numpy())
        res["remote_staging_kind"] = r._staging.kind
        out.put(res)
        done.wait(120)
