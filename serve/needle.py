"""Needle in a haystack: can the served model find one fact at any depth of a long context?

    ministack serve needle --url http://127.0.0.1:8000 --lengths 1024,2048,4096 --depths 0,0.25,0.5,0.75,1
    python -m serve.needle ...   # the same

For each (context length, depth) it builds a haystack of filler sentences (generated here,
offline, from a seeded grammar: no downloads), hides "The secret passphrase is <word>." at
that depth, asks the model for the passphrase through /v1/chat/completions (greedy), and
scores 1 if the answer contains the word. It talks only HTTP, so it measures any
OpenAI-compatible server: ours with either engine, or vLLM's own. Output: a markdown table
on stdout and a heatmap PNG.
"""

from __future__ import annotations

import argparse
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

SUBJECTS = (
    "the farmer",
    "a tired engineer",
    "the old river",
    "my neighbour",
    "the committee",
    "a small bird",
    "the city",
    "the night train",
    "an orchestra",
    "the librarian",
    "a quiet student",
    "the harbour master",
)
VERBS = (
    "watched",
    "repaired",
    "forgot",
    "described",
    "carried",
    "painted",
    "measured",
    "followed",
    "ignored",
    "praised",
)
OBJECTS = (
    "the northern fields",
    "a broken clock",
    "the morning fog",
    "seven wooden boxes",
    "the tall lighthouse",
    "an unfinished letter",
    "the market square",
    "a map of the coast",
    "the winter harvest",
    "a brass compass",
)
CODAS = (
    "before the rain began",
    "without saying a word",
    "for the third time that week",
    "as the bells rang",
    "while the bread was baking",
    "long after midnight",
    "under a grey sky",
    "with great patience",
)
PASSPHRASES = (
    "tangerine",
    "obsidian",
    "marzipan",
    "heliotrope",
    "quokka",
    "saxophone",
    "juniper",
    "zeppelin",
    "labyrinth",
    "periwinkle",
    "kumquat",
    "sassafras",
)
QUESTION = "What is the secret passphrase mentioned in the text above? Answer with the passphrase only."


@dataclass
class Trial:
    length: int  # target context length in tokens
    depth: float  # 0 = the needle opens the context, 1 = it closes it
    passphrase: str
    prompt_tokens: int = 0
    answer: str = ""
    cut: bool = False  # the answer hit max_tokens (finish_reason "length")

    @property
    def found(self) -> bool:
        return self.passphrase in self.answer.lower()


def haystack(rng: random.Random, sentences: int) -> list[str]:
    return [
        f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(CODAS)}."
        for _ in range(sentences)
    ]


def messages(filler: list[str], depth: float, passphrase: str) -> list[dict[str, str]]:
    at = round(depth * len(filler))
    text = " ".join(filler[:at] + [f"The secret passphrase is {passphrase}."] + filler[at:])
    return [{"role": "user", "content": f"{text}\n\n{QUESTION}"}]


class Client:
    def __init__(self, url: str, api_key: str | None, model: str | None, timeout: float) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.model = model or self.http.get("/v1/models").raise_for_status().json()["data"][0]["id"]

    def chat_tokens(self, msgs: list[dict[str, str]]) -> int:
        """Prompt length of these messages after the server's chat template (vLLM's /tokenize)."""
        return (
            self.http.post("/tokenize", json={"model": self.model, "messages": msgs}).raise_for_status().json()["count"]
        )

    def ask(self, msgs: list[dict[str, str]], max_tokens: int) -> tuple[str, bool]:
        """(the answer, whether it was cut off by max_tokens)."""
        body = {"model": self.model, "messages": msgs, "max_tokens": max_tokens, "temperature": 0}
        choice = self.http.post("/v1/chat/completions", json=body).raise_for_status().json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"] == "length"


def fill(client: Client, length: int, render, rng: random.Random) -> tuple[list[dict[str, str]], int]:
    """(messages, their templated token count): `render(filler)` with as many filler sentences
    as keep the prompt within `length` tokens (the answer's room is the caller's)."""
    probe = haystack(rng, 200)
    empty = client.chat_tokens(render([]))
    per_sentence = (client.chat_tokens(render(probe)) - empty) / 200
    filler = haystack(rng, max(0, int((length - empty) / per_sentence)))
    msgs = render(filler)
    tokens = client.chat_tokens(msgs)
    while tokens > length and filler:  # the estimate overshot: trim
        filler = filler[: len(filler) - max(1, int((tokens - length) / per_sentence))]
        msgs = render(filler)
        tokens = client.chat_tokens(msgs)
    return msgs, tokens


def build(client: Client, trial: Trial, rng: random.Random) -> list[dict[str, str]]:
    """Messages whose templated prompt fills `trial.length` tokens (minus room for the answer)."""
    msgs, trial.prompt_tokens = fill(
        client, trial.length, lambda filler: messages(filler, trial.depth, trial.passphrase), rng
    )
    return msgs


def table(trials: list[Trial], lengths: list[int], depths: list[float]) -> str:
    verdict = {(t.length, t.depth): "found" if t.found else "cut off" if t.cut else "missed" for t in trials}
    lines = ["| context \\ depth | " + " | ".join(f"{d:.0%}" for d in depths) + " |", "|---|" + "---|" * len(depths)]
    for n in lengths:
        lines.append(f"| {n} | " + " | ".join(verdict[n, d] for d in depths) + " |")
    total, cut = sum(t.found for t in trials), sum(t.cut and not t.found for t in trials)
    note = f" ({cut} missed answers were cut off by --max-tokens: raise it)" if cut else ""
    return "\n".join(lines) + f"\n\n{total}/{len(trials)} found{note}"


def heatmap(
    scores: dict[tuple[int, float], float], lengths: list[int], depths: list[float], title: str, path: str
) -> None:
    """A (depth x length) grid of scores in [0, 1], red to green, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [[scores[n, d] for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5))
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_harness_arguments(p: argparse.ArgumentParser, lengths: str, depths: str, max_tokens: int) -> None:
    """The flags every quality harness here takes: the server, the grid, the answer budget."""
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (not /v1)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--lengths", default=lengths, help="context lengths in tokens, comma-separated")
    p.add_argument("--depths", default=depths, help="depths in [0, 1], comma-separated")
    p.add_argument(
        "--max-tokens", type=int, default=max_tokens, help="answer budget; an answer cut off by it is reported as such"
    )
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")


def harness_setup(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[int], list[float], Client]:
    """(lengths, depths, a client of the server) from `add_harness_arguments`' flags."""
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    if any(not 0 <= d <= 1 for d in depths):
        p.error("--depths must lie in [0, 1]")
    return lengths, depths, Client(args.url, args.api_key, args.model, args.timeout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ministack serve needle", description=__doc__.split("\n")[0])
    add_harness_arguments(
        p, lengths="512,1024,2048", depths="0,0.25,0.5,0.75,1", max_tokens=48
    )  # SmolLM2 answers a needle at depth 0 in a full sentence: 16 tokens cut it
    p.add_argument("--out", default="needle.png", help="heatmap PNG")
    args = p.parse_args(argv)
    lengths, depths, client = harness_setup(p, args)
    rng = random.Random(args.seed)
    trials = [Trial(n, d, rng.choice(PASSPHRASES)) for n in lengths for d in depths]
    prompts = [build(client, t, random.Random(rng.random())) for t in trials]

    def run(i: int) -> None:
        trials[i].answer, trials[i].cut = client.ask(prompts[i], args.max_tokens)

    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(run, range(len(trials))))
    print(f"model {client.model}, {args.url}\n")
    print(table(trials, lengths, depths))
    heatmap(
        {(t.length, t.depth): float(t.found) for t in trials},
        lengths,
        depths,
        f"needle in a haystack: {client.model}",
        args.out,
    )
    print(f"heatmap: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
