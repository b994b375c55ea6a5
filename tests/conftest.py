import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import zmq

# Tests import their helpers (reference.py, ...) as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))


# the replay tests' (test_events_replay_rate.py, test_events_replay_busy.py)
@pytest.fixture
def tmpdir_ipc():
    d = tempfile.mkdtemp(prefix="kvr", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


# the event stream's daemon tests' (test_events_daemon.py, test_events_settings.py): an endpoint and its folder
@pytest.fixture
def tmp_ipc():
    from daemon_helpers import ipc_endpoint

    endpoint, d = ipc_endpoint()
    yield endpoint, d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)
