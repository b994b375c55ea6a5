"""What the installed transformers does that the hf tests depend on: families
it runs outside its attention interface (refused by kvpager there: the test
skips, and only there)."""

from __future__ import annotations

import contextlib
import inspect

import pytest

transformers = pytest.importorskip("transformers")


#: transformers 4.x, where some families attend outside the attention interface (kvpager
#: refuses them there: `served_by_this_transformers`)
OLD_TRANSFORMERS = int(transformers.__version__.split(".")[0]) < 5


@contextlib.contextmanager
def served_by_this_transformers(model=None):
    """A family that transformers 4.x (or, ``model`` given, this transformers: its
    attention modules' own code says so) runs outside its attention interface is
    refused there with the refusal that says so: the test skips. Otherwise that
    refusal fails the test, as any other."""
    from kvpager.errors import UnsupportedModel

    try:
        yield
    except UnsupportedModel as e:
        if "does not run through transformers' attention interface" in str(e) and (
                OLD_TRANSFORMERS or (model is not None and not attends_through_the_interface(model))):
            pytest.skip(f"transformers {transformers.__version__} refused: {e}")
        raise


def attends_through_the_interface(model) -> bool:
    """Whether any attention module of ``model`` calls transformers' attention interface
    (read from the modules' own code, apart from kvpager's checks)."""
    kinds = {type(m) for m in model.modules() if type(m).__name__.endswith("Attention")}
    return any("ALL_ATTENTION_FUNCTIONS" in inspect.getsource(k.forward) for k in kinds)


def falcon_attends_through_the_interface() -> bool:
    """Whether this transformers' Falcon attends through its attention interface (5.25 on)."""
    from transformers.models.falcon import modeling_falcon

    return hasattr(modeling_falcon, "ALL_ATTENTION_FUNCTIONS")
