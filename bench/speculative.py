"""n-gram speculative decoding on a copying task: decode speed with drafts on and off.

The workload prompt lookup is for: the model is asked to repeat a passage of its prompt, so
its answer copies n-grams that are already in the context. One engine plain and one with
`--speculative-config`-style n-gram drafts (`--tokens` drafts per step) decode the same greedy
requests (`--batch` of them, `--max-tokens` each) in one process, one after the other; printed:
output tokens/s of each, the speed-up, the acceptance rate (accepted / verified draft tokens)
and whether the outputs are identical. The passage is bench/passage.txt: a thousand words of
this repository's own README as it stood when the figures in bench/RESULTS.md were measured,
kept in a file of its own so the workload does not change when the README does.

    python bench/speculative.py --tokens 4 --batch 1 --max-tokens 256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from profiling.cpu import prepare_cpu  # noqa: E402
from serve.config import EngineConfig  # noqa: E402
from serve.engine import LLMEngine, SamplingParams  # noqa: E402


def copy_prompt(engine: LLMEngine, words: int) -> list[int]:
    """A chat prompt asking the model to repeat the first `words` words of bench/passage.txt verbatim."""
    passage = " ".join((ROOT / "bench" / "passage.txt").read_text().split()[:words])
    messages = [{"role": "user", "content": f"Repeat the following text exactly, word for word:\n\n{passage}"}]
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return engine.tokenizer.encode(text, add_special_tokens=False)


def run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    engine.generate([prompts[0][:8]], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    return [o.outputs[0].token_ids for o in outs], time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4, help="num_speculative_tokens: drafts per step")
    p.add_argument("--lookup-max", type=int, default=4)
    p.add_argument("--lookup-min", type=int, default=2)
    p.add_argument("--batch", type=int, default=1, help="concurrent requests")
    p.add_argument("--words", type=int, default=150, help="words of the passage to copy (at most 1000)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()
    if not 1 <= args.words <= 1000:
        p.error(f"--words must be in [1, 1000] (bench/passage.txt holds 1000), got {args.words}")
    prepare_cpu()
    results = {}
    for label, k in (("plain", 0), ("ngram", args.tokens)):
        engine = LLMEngine(
            EngineConfig(
                dtype=args.dtype,
                num_speculative_tokens=k,
                prompt_lookup_max=args.lookup_max,
                prompt_lookup_min=args.lookup_min,
                max_model_len=4096,
            )
        )
        prompts = [copy_prompt(engine, args.words)] * args.batch
        tokens, seconds = run(engine, prompts, args.max_tokens)
        results[label] = (tokens, seconds, engine.stats())
    (plain, t0, _), (spec, t1, stats) = results["plain"], results["ngram"]
    generated = sum(map(len, plain))
    rate = stats.spec_accepted_tokens / stats.spec_draft_tokens if stats.spec_draft_tokens else 0.0
    print(f"\ncopying {args.words} words, {args.batch} request(s), {generated} tokens generated in all, greedy")
    print(
        f"plain: {sum(map(len, plain)) / t0:.1f} tok/s   ngram k={args.tokens}: {sum(map(len, spec)) / t1:.1f} tok/s   "
        f"speed-up {t0 / t1 * sum(map(len, spec)) / max(1, generated):.2f}x"
    )
    print(
        f"acceptance {rate:.1%} ({stats.spec_accepted_tokens} of {stats.spec_draft_tokens} draft tokens, {stats.spec_drafts} proposals); "
        f"outputs identical: {spec == plain}"
    )


if __name__ == "__main__":
    main()
