"""Store setups the remote tier could never use, or would misread, found at its
start (real redis-server processes, nothing mocked):
- a TLS certificate that cannot verify as configured (no CA given for a
  self-signed one, another host's name): it read "does not answer", and the
  daemon ran with every call failing;
- an endpoint that answers ``+OK`` to every command (a sidecar, a proxy):
  redis-py's handshake failed with AttributeError and `kvpager serve` died with
  a traceback; now it is a store that does not answer, as one speaking HTTP.
(URL options: test_remote_urls.py; the rest of the check, a query buffer under one write
among it: test_remote_careless.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from redis_helpers import listener, need_redis, tls_redis_server

need_redis()

redis = pytest.importorskip("redis")

from kvpager import KVPool, PoolSpec  # noqa: E402
from kvpager.remote_store import StoreMisconfigured  # noqa: E402
from kvpager.remote_tier import RemoteTier  # noqa: E402

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=48, block_size=16, dtype="float32")


def test_check_refuses_a_certificate_that_cannot_verify(tmp_path):
    with tls_redis_server(str(tmp_path)) as (_, port, cert):
        for url in (f"rediss://127.0.0.1:{port}",  # self-signed, no CA given
                    f"rediss://localhost:{port}?ssl_ca_certs={cert}"):  # the certificate names 127.0.0.1
            t = RemoteTier(url, timeout=2.0)
            with pytest.raises(StoreMisconfigured, match="TLS certificate does not verify.*ssl_ca_certs"):
                t.check(SPEC)
            t.close()
        t = RemoteTier(f"rediss://127.0.0.1:{port}?ssl_ca_certs={cert}", timeout=2.0)
        assert t.check(SPEC) is None
        t.close()


def test_an_endpoint_that_answers_ok_to_everything_is_a_store_that_does_not_answer():
    with listener("ok") as port:
        t = RemoteTier(f"redis://127.0.0.1:{port}", timeout=0.5)
        why = t.check(SPEC)  # a warning, as for an endpoint that answers HTTP (it raised AttributeError)
        assert why is not None and "AttributeError" in why
        pool = KVPool(SPEC, remote=t)
        prompt = list(range(3, 3 + 4 * 16 + 1))
        [a] = pool.allocate([prompt])
        k = np.ones((len(prompt), 2, 16), np.float32)
        pool.write(0, a.slots, k, k)
        pool.write(1, a.slots, k, k)
        pool.commit(a.seq_id)
        pool.free([a.seq_id])
        t.flush(timeout=10)
        st = t.stats()
        assert st.written_blocks == 0 and st.errors >= 1  # failed writes counted (no "unexpected error")
        [b] = pool.allocate([prompt])  # served from the local cache all the same
        assert b.num_cached_tokens == 64
        pool.check_integrity()
        pool.close()
