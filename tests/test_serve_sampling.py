"""The sampling fields beyond temperature / top-k / top-p (serve/engine/logits_processors.py and
the sampler's min-p): each against transformers' own logits processors, on single rows and on
mixed batches, and end to end under greedy decoding against transformers' `generate` on the
same weights, alone, inside a mixed batch, and with n > 1."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_serve_model import make_engine, prompts
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from serve.engine import SamplingParams
from serve.engine.logits_processors import process_logits
from serve.engine.sampler import truncated_probs

VOCAB = 300


def fake_seq(prompt: list[int], output: list[int], bad_words_ids: list[list[int]] = (), **params) -> SimpleNamespace:
    """What process_logits reads of a Sequence."""
    return SimpleNamespace(
        params=SamplingParams(**params),
        token_ids=prompt + output,
        output_token_ids=output,
        request=SimpleNamespace(bad_words_ids=list(bad_words_ids)),
    )


def rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def history(seed: int) -> tuple[list[int], list[int]]:
    prompt, output = prompts([12, 9], vocab=VOCAB, seed=seed)
    return prompt, output + output[:3]  # some output tokens twice


def test_repetition_penalty_is_transformers():
    logits = rows(3)
    seqs = [fake_seq(*history(i), repetition_penalty=p) for i, p in enumerate((1.3, 0.7, 1.0))]
    got = process_logits(logits, seqs, set())
    for i, seq in enumerate(seqs):
        hf = RepetitionPenaltyLogitsProcessor(seq.params.repetition_penalty)(
            torch.tensor([seq.token_ids]), logits[i : i + 1].clone()
        )
        torch.testing.assert_close(got[i], hf[0], rtol=0, atol=0)
    assert torch.equal(got[2], logits[2])  # a row that asked for nothing is untouched


def test_logit_bias_is_transformers_sequence_bias():
    logits = rows(2, seed=1)
    bias = {5: -100.0, 17: 3.5, 299: 0.25}
    seqs = [fake_seq(*history(3), logit_bias=bias), fake_seq(*history(4))]
    got = process_logits(logits, seqs, set())
    hf = SequenceBiasLogitsProcessor({(t,): v for t, v in bias.items()})(
        torch.tensor([seqs[0].token_ids]), logits[:1].clone()
    )
    torch.testing.assert_close(got[0], hf[0], rtol=0, atol=0)
    assert torch.equal(got[1], logits[1])


def test_min_tokens_is_transformers_min_new_tokens():
    logits = rows(2, seed=2)
    prompt, output = history(5)
    eos = {2, 7}
    for done in (3, 6):  # before and at min_tokens
        seqs = [fake_seq(prompt, output[:done], min_tokens=6, stop_token_ids=[7]), fake_seq(prompt, output[:done])]
        got = process_logits(logits, seqs, {2})
        hf = MinNewTokensLengthLogitsProcessor(len(prompt), 6, sorted(eos))(
            torch.tensor([prompt + output[:done]]), logits[:1].clone()
        )
        torch.testing.assert_close(got[0], hf[0], rtol=0, atol=0)
        assert torch.equal(got[1], logits[1])


def test_bad_words_are_transformers_no_bad_words():
    """Bad words are checked against the generated tokens (vLLM's rule), so the history here
    is output only, where transformers' input_ids mean the same."""
    logits = rows(1, seed=3)
    _, output = history(6)
    words = [[11], [output[-2], output[-1], 42], [output[-1], 43], [9, 44]]  # one-token, two matching prefixes, one not
    got = process_logits(logits, [fake_seq([], output, words, bad_words=["x"])], set())
    hf = NoBadWordsLogitsProcessor(words, eos_token_id=None)(torch.tensor([output]), logits.clone())
    torch.testing.assert_close(got, hf, rtol=0, atol=0)
    assert torch.isinf(got[0, [11, 42, 43]]).all() and not torch.isinf(got[0, 44])


def test_presence_and_frequency_penalties_are_openais_formula():
    """OpenAI's documented rule: mu[j] - c[j] * frequency - (c[j] > 0) * presence, c[j] the
    count of token j in the output so far (the prompt does not count)."""
    logits = rows(2, seed=4)
    prompt, output = history(7)
    seqs = [
        fake_seq(prompt, output, presence_penalty=0.8, frequency_penalty=-0.3),
        fake_seq(prompt, output, frequency_penalty=1.5),
    ]
    got = process_logits(logits, seqs, set())
    for i, seq in enumerate(seqs):
        want = logits[i].clone()
        for j in set(output):
            c = output.count(j)
            want[j] -= c * seq.params.frequency_penalty + seq.params.presence_penalty
        torch.testing.assert_close(got[i], want)


def test_allowed_token_ids_leave_only_those():
    logits = rows(2, seed=5)
    got = process_logits(logits, [fake_seq([1], [], allowed_token_ids=[4, 200, 17]), fake_seq([1], [])], set())
    assert torch.isfinite(got[0]).sum() == 3 and torch.equal(got[0, [4, 17, 200]], logits[0, [4, 17, 200]])
    assert torch.equal(got[1], logits[1])


@pytest.mark.parametrize("temperature, min_p", [(1.0, 0.1), (0.7, 0.05), (1.3, 0.3)])
def test_min_p_is_transformers_min_p(temperature, min_p):
    logits = rows(1, seed=6)[0]
    probs, ids = truncated_probs(logits, temperature, -1, 1.0, min_p)
    hf = MinPLogitsWarper(min_p)(None, (logits / temperature)[None])[0]
    want = torch.softmax(hf, -1)
    assert sorted(ids.tolist()) == sorted(torch.nonzero(want).flatten().tolist())
    torch.testing.assert_close(probs, want[ids])


# ---- end to end, greedy, against transformers' generate ----------------------------------------------


@torch.no_grad()
def hf_generate(model, prompt: list[int], max_new_tokens: int, eos: int, **kwargs) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=0,
        **kwargs,
    )
    return out[0, len(prompt) :].tolist()


CASES = {  # our SamplingParams -> transformers' generate kwargs
    "repetition_penalty": ({"repetition_penalty": 1.8}, {"repetition_penalty": 1.8}),
    "logit_bias": ({"logit_bias": {7: 4.0, 11: -100.0}}, {"sequence_bias": {(7,): 4.0, (11,): -100.0}}),
    "min_tokens": ({"min_tokens": 8}, {"min_new_tokens": 8}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_matches_transformers_generate_alone_in_a_batch_and_with_n(tiny_llama, tmp_path, case):
    ours, theirs = CASES[case]
    engine = make_engine(tiny_llama, tmp_path)
    ps = prompts([9, 23, 14], seed=11)
    plain = (
        engine.generate(ps[:1], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
    )
    eos = plain[2]  # a token greedy decoding reaches early: min_tokens must hold it back
    engine.eos_token_ids = {eos}
    tiny_llama.generation_config.bos_token_id = None
    want = [hf_generate(tiny_llama, p, 12, eos, **theirs) for p in ps]
    params = SamplingParams(max_tokens=12, temperature=0, **ours)
    alone = [engine.generate([p], params)[0].outputs[0].token_ids for p in ps]
    assert alone == want
    mixed = engine.generate(ps + ps, [params] * 3 + [SamplingParams(max_tokens=12, temperature=0)] * 3)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == want  # beside rows that process nothing
    (n3,) = engine.generate(ps[:1], SamplingParams(max_tokens=12, temperature=0, n=3, **ours))
    assert all(c.token_ids == want[0] for c in n3.outputs)


def test_penalised_sampling_is_per_sequence_with_n(tiny_llama, tmp_path):
    """n = 2 seeded (sibling i draws with seed + i) with a frequency penalty on its own output:
    each sibling equals the single request with its seed, so counts never mix between them."""
    engine = make_engine(tiny_llama, tmp_path)
    (p,) = prompts([15], seed=12)
    kw = {"max_tokens": 16, "ignore_eos": True, "frequency_penalty": 2.0, "presence_penalty": 1.0}
    (pair,) = engine.generate([p], SamplingParams(n=2, seed=5, **kw))
    singles = [engine.generate([p], SamplingParams(seed=s, **kw))[0].outputs[0].token_ids for s in (5, 6)]
    assert [c.token_ids for c in sorted(pair.outputs, key=lambda c: c.index)] == singles
    greedy = {"max_tokens": 16, "ignore_eos": True, "temperature": 0}
    (free,) = engine.generate([p], SamplingParams(**greedy))
    (fresh,) = engine.generate([p], SamplingParams(presence_penalty=2.0, **greedy))
    free, fresh = free.outputs[0].token_ids, fresh.outputs[0].token_ids
    assert len(set(free)) < len(free) and len(set(fresh)) == len(fresh)  # this model repeats itself; penalised, never
