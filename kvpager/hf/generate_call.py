"""`generate`: one call's generation, its arguments resolved as transformers' ``generate`` resolves them.

A call says what it wants in transformers' terms: ``sampling="model"`` (what
the model's generation config asks), ``num_beams`` and the beam options,
``eos_token_id="model"``. `call_options` turns them into what kvpager runs: a
beam search (`kvpager.hf.beams.beam_search`) of so many beams with its
options, or a `PagedGeneration` with a `Sampling` or none. As in transformers,
the call's ``num_beams`` and beam options override the config's, the config's
fill in what the call leaves out, and with one beam the beam options change
no token. What the config asks that kvpager does not apply is refused by
name, never left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvpager.errors import InvalidArgument
from kvpager.hf.beams import beam_search, check_beam_options
from kvpager.hf.captured_steps import CapturedSteps
from kvpager.hf.checks import model_eos
from kvpager.hf.generation import PagedGeneration
from kvpager.hf.logprobs import Completion
from kvpager.hf.sampling import Sampling
from kvpager.validate import described, integer

__all__ = ["beams_for_generate", "call_options", "config_beams", "generate", "unexpected_arguments"]


def generate(
    model: Any,
    pool: Any,
    prompts: Sequence[Sequence[int]] | None = None,
    max_new_tokens: int | Sequence[int] = None,  # type: ignore[assignment] - required: None is refused by name
    salt: str | bytes | None = None,
    eos_token_id: Any = "model",
    cuda_graphs: bool | CapturedSteps = False,
    pipeline: bool = True,
    compile: bool = False,
    *,
    input_ids: Any = None,
    attention_mask: Any = None,
    sampling: Any = None,
    logprobs: int | None = None,
    stop_sequences: Sequence[Sequence[int]] | None = None,
    num_beams: int | None = None,
    length_penalty: float | None = None,
    early_stopping: bool | str | None = None,
    **transformers_only: Any,
) -> list[list[int]] | list[Completion]:
    """Generation with the KV cache in ``pool``, greedy unless ``sampling`` (a
    `kvpager.hf.Sampling` for every prompt, a list of one per prompt, or "model":
    what the model's generation config asks of transformers' ``generate``,
    `Sampling.from_model`). Returns the new token ids
    of each prompt: ``max_new_tokens`` of them (an int, or a list of one a
    prompt), or fewer where an end-of-sequence
    token came (included, as transformers' ``generate`` does), or the new tokens
    ended with one of ``stop_sequences`` (token-id lists; included). ``eos_token_id``
    defaults to the model's generation config ("model"); None never stops early.
    ``pipeline``: launch each decode pass before the last one's tokens reach the
    host (`PagedGeneration.pipeline`; the same tokens). ``compile`` (with
    ``cuda_graphs``): capture the step compiled by ``torch.compile``
    (`PagedGeneration.compile`). ``cuda_graphs``: True captures this call's
    decode steps; a `kvpager.hf.CapturedSteps` replays those kept across calls,
    capturing what is missing. A padded batch: ``attention_mask`` (1 for a
    prompt's tokens, 0 for padding; the prompts' shape) strips each prompt's
    padding, left or right; ``input_ids`` is another name for ``prompts``, so a
    tokenizer's output passes as it is: ``generate(model, pool, **enc, max_new_tokens=n)``.
    ``logprobs`` (an int k): a `Completion` per prompt instead, its tokens with
    their log-probabilities under the model and, k > 0, the k most likely tokens'
    at each position (`kvpager.hf.logprobs`). ``num_beams`` > 1: each prompt's best
    hypothesis of a beam search (`kvpager.hf.beams.beam_search`, with
    ``length_penalty`` and ``early_stopping``, its steps captured with
    ``cuda_graphs``). As in transformers, the call's ``num_beams`` and beam options
    override a config's (``sampling="model"``), the config's fill in the rest, and
    with one beam the beam options change nothing (`call_options`). An argument of
    transformers' ``generate`` that is none of these is a TypeError saying what
    kvpager takes for it (`transformers_only`)."""
    if transformers_only:
        raise TypeError(unexpected_arguments(transformers_only))
    eos_token_id = model_eos(model, eos_token_id)
    num_beams, beam_options, sampling = call_options(model, sampling, num_beams, length_penalty, early_stopping,
                                                     eos_token_id)
    if num_beams > 1:
        return beams_for_generate(model, pool, prompts, max_new_tokens, num_beams, salt, eos_token_id,
                                  input_ids=input_ids, attention_mask=attention_mask, refused=dict(
                                      sampling=sampling, logprobs=logprobs, stop_sequences=stop_sequences),
                                  cuda_graphs=cuda_graphs, compile=compile, **beam_options)
    with PagedGeneration(model, pool, prompts, max_new_tokens, salt, eos_token_id, cuda_graphs,
                         pipeline=pipeline, compile=compile, input_ids=input_ids,
                         attention_mask=attention_mask, sampling=sampling, logprobs=logprobs,
                         stop_sequences=stop_sequences) as gen:
        while not gen.done:
            gen.step()
        return gen.outputs if logprobs is None else gen.completions()


def call_options(model: Any, sampling: Any, num_beams: Any, length_penalty: Any, early_stopping: Any,
                 eos: Any) -> tuple[int, dict[str, Any], Any]:
    """What a `generate` call runs: its beams (1: none), their options, and its
    sampling (a `Sampling`, a list of them, or None), ``sampling="model"`` read from
    the generation config under the call's end tokens ``eos``. The call's
    ``num_beams`` (an int, a NumPy integer or a 0-d integer tensor) and beam options
    override the config's; with beams from either, a config read for them gives its
    beam options and must ask nothing the beams do not apply (`beam_config`). With
    one beam the options are checked and change nothing, as in transformers."""
    given = {k: v for k, v in (("length_penalty", length_penalty), ("early_stopping", early_stopping))
             if v is not None}
    from_config = isinstance(sampling, str) and sampling == "model"
    if num_beams is not None:
        beams = integer(num_beams)  # (True is no count of beams)
        if beams is None or beams < 1:
            raise InvalidArgument(f"num_beams must be an int >= 1, got {described(num_beams)}")
    else:
        beams = config_beams(model) if from_config else 1
    if beams > 1:
        options = beam_config(model, beams, eos) if from_config else {}
        return beams, {**options, **given}, None if from_config else sampling
    check_beam_options(given.get("length_penalty", 1.0), given.get("early_stopping", False))
    called = None if num_beams is None else beams  # (the call's one beam overrides a sampling config's beams)
    return 1, {}, Sampling.from_model(model, eos_token_id=eos, num_beams=called) if from_config else sampling


def config_beams(model: Any) -> int:
    """The beams a generation config asks for: its ``num_beams`` without sampling, else
    1 (sampled beams: `Sampling.from_model` refuses them by name)."""
    config = getattr(model, "generation_config", None)
    if getattr(config, "do_sample", False):
        return 1
    return int(getattr(config, "num_beams", None) or 1)


def beam_config(model: Any, beams: int, eos: Any) -> dict[str, Any]:
    """A beam search of ``beams`` beams under the model's generation config: the
    config's ``length_penalty`` and ``early_stopping``. InvalidArgument naming what
    the config also asks that kvpager's beams do not run: sampling (transformers'
    beam sampling), more than one returned sequence, a logits processor (a penalty,
    a bias or ban, ``min_new_tokens``: `Sampling.from_model` reads them under the end
    tokens ``eos``, and refuses by name those kvpager applies nowhere)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    if getattr(config, "do_sample", False):
        raise InvalidArgument(f"the model's generation config samples (do_sample=True): with num_beams={beams} "
                              "transformers runs a sampled beam search, which kvpager does not run; pass "
                              "sampling=None for a greedy beam search, or num_beams=1 to sample")
    returned = getattr(config, "num_return_sequences", None) or 1
    if returned != 1:
        raise InvalidArgument(f"the model's generation config asks for num_return_sequences={returned!r} of its "
                              f"beam search; generate returns each prompt's best hypothesis: call "
                              f"kvpager.hf.beam_search(num_beams={beams}, num_return_sequences=...) for more")
    processors = _processors(config, Sampling.from_model(model, eos_token_id=eos))
    if processors:
        raise InvalidArgument(f"a beam search of num_beams={beams} under the model's generation config, which asks "
                              f"for logits processors ({', '.join(processors)}) that kvpager's beam search does "
                              "not apply: pass sampling=None for the beams without them (or call "
                              "kvpager.hf.beam_search)")
    penalty = getattr(config, "length_penalty", None)
    return dict(length_penalty=1.0 if penalty is None else float(penalty),
                early_stopping=getattr(config, "early_stopping", False) or False)


def _processors(config: Any, greedy: Sampling | None) -> list[str]:
    """The generation-config settings behind ``greedy`` (what `Sampling.from_model`
    read from a greedy config; None: nothing), by name and value."""
    if greedy is None:
        return []
    names = [] if greedy.repetition_penalty == 1 else [f"repetition_penalty={config.repetition_penalty!r}"]
    if greedy.logit_bias:
        names += [f"{name}={getattr(config, name)!r}" for name in ("sequence_bias", "suppress_tokens", "bad_words_ids")
                  if getattr(config, name, None)]
    if greedy.min_tokens:
        names.append(f"min_new_tokens={config.min_new_tokens!r}")
    return names


def beams_for_generate(model: Any, pool: Any, prompts: Any, max_new_tokens: Any, num_beams: Any, salt: Any,
                       eos_token_id: Any, *, input_ids: Any, attention_mask: Any, refused: dict[str, Any],
                       length_penalty: float = 1.0, early_stopping: bool | str = False, cuda_graphs: bool = False,
                       compile: bool = False) -> list[list[int]]:
    """`generate` with ``num_beams``: each prompt's best hypothesis. What a
    beam search does not take (a sampling, log-probabilities, stop sequences,
    ``refused``) is refused by name."""
    given = sorted(name for name, value in refused.items() if value is not None)
    if given:
        raise InvalidArgument(f"generate with num_beams={num_beams!r} takes no {', '.join(given)}: beam search here "
                              "is greedy, without log-probabilities or stop sequences (kvpager.hf.beam_search)")
    found = beam_search(model, pool, prompts, max_new_tokens, num_beams, 1, length_penalty, early_stopping,
                        eos_token_id, salt, input_ids=input_ids, attention_mask=attention_mask,
                        cuda_graphs=cuda_graphs, compile=compile)
    return [b.tokens[0] for b in found]


_SAMPLING = "sampling=kvpager.hf.Sampling(temperature=..., top_k=..., top_p=..., min_p=..., seed=...)"
_PROCESSORS = "sampling=kvpager.hf.Sampling(repetition_penalty=..., logit_bias=..., min_tokens=...)"

#: transformers' ``generate`` arguments that kvpager's spells otherwise: what to pass instead
TRANSFORMERS_ONLY = {
    "do_sample": f"{_SAMPLING}, or sampling='model' for what the model's generation config asks",
    "temperature": _SAMPLING, "top_k": _SAMPLING, "top_p": _SAMPLING, "min_p": _SAMPLING,
    "repetition_penalty": _PROCESSORS, "sequence_bias": _PROCESSORS, "min_new_tokens": _PROCESSORS,
    "generation_config": "sampling='model' (and eos_token_id='model', the default) to follow "
                         "model.generation_config; set its fields on the model",
    "max_length": "max_new_tokens (the new tokens alone, the prompt not counted)",
    "pad_token_id": "attention_mask to strip padding (a row without one is its prompt whole); the outputs are "
                    "lists of each prompt's new tokens, never padded",
    "stop_strings": "stop_sequences (lists of token ids)",
    "stopping_criteria": "stop_sequences (lists of token ids) or PagedGeneration, stepped",
    "streamer": "PagedGeneration, stepped: its outputs after each step",
    "output_scores": "logprobs=k (a Completion per prompt: each token's log-probability and k alternatives)",
    "output_logits": "logprobs=k (a Completion per prompt: each token's log-probability and k alternatives)",
    "return_dict_in_generate": "logprobs=k (a Completion per prompt) or the lists of new tokens",
    "num_return_sequences": "kvpager.hf.beam_search(num_return_sequences=...), or the prompt given once per "
                            "sample with a Sampling of its own seed",
    "use_cache": "nothing: the cache is the pool, and a prompt's cached prefix is found in it",
}


def unexpected_arguments(given: dict[str, Any]) -> str:
    """The TypeError message of `generate` called with ``given``, arguments it does not
    take: Python's own, with what kvpager takes instead of those transformers'
    ``generate`` takes (a caller moving from ``model.generate`` meets them first)."""
    names = sorted(given)
    lines = [f"generate() got unexpected keyword argument{'s' if len(names) > 1 else ''} "
             f"{', '.join(map(repr, names))}"]
    lines += [f"  for {name}: {TRANSFORMERS_ONLY[name]}" for name in names if name in TRANSFORMERS_ONLY]
    return "\n".join(lines) + ("\n(docs/hf.md)" if len(lines) > 1 else "")
