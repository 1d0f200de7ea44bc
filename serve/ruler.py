"""A RULER-style quality harness beside the needle one: harder retrieval and aggregation at length.

    ministack serve ruler --url http://127.0.0.1:8000 --lengths 1024,2048,4096 --depths 0,0.5,1
    python -m serve.ruler ...   # the same

Four of RULER's task kinds (Hsieh et al. 2024), generated here offline from seeded filler
(serve.needle's sentences), each scored in [0, 1] from the answer's text:

- `multikey`: four needles "The special magic number for <key> is <number>." with different
  keys; asked for one key's number (found: 1, else 0). Distractor keys make it harder than one
  needle: the model must bind the number to the right key.
- `multivalue`: four numbers for the same key at spread depths; asked for all of them (the
  fraction found).
- `vartrack`: a chain "VAR A = 51234.", "VAR B = VAR A.", ... of four hops spread from the
  depth on; asked which variables hold the value (the fraction of the chain named).
- `commonwords`: a list of words (its length sets the context) where five words occur many
  times and the rest a few; asked for the five most common (the fraction named). Depth does not
  apply; it runs once per length.

It talks only HTTP (/tokenize to fill each context, /v1/chat/completions greedy), so it
measures any OpenAI-compatible server. Output: one markdown table per task (lengths x depths),
the mean per task and length, and one heatmap PNG per task (`--out-dir`).
"""

from __future__ import annotations

import argparse
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from serve.needle import Client, add_harness_arguments, fill, harness_setup, heatmap

KEYS = (
    "amber-falcon",
    "silent-harbor",
    "copper-meadow",
    "velvet-summit",
    "hollow-birch",
    "crimson-tide",
    "lunar-orchard",
    "granite-echo",
    "misty-canyon",
    "golden-thistle",
)
VARIABLES = ("QXR", "BLM", "ZTV", "KWP", "HND", "FJC", "YUE", "OGS")
WORDS = (
    "apple",
    "river",
    "candle",
    "window",
    "garden",
    "pencil",
    "thunder",
    "marble",
    "violin",
    "ladder",
    "saddle",
    "copper",
    "meadow",
    "lantern",
    "harbor",
    "falcon",
    "pepper",
    "cotton",
    "island",
    "rocket",
    "basket",
    "mirror",
    "walnut",
    "button",
    "forest",
    "ticket",
    "velvet",
    "anchor",
    "bridge",
    "cactus",
)
TASKS = ("multikey", "multivalue", "vartrack", "commonwords")


@dataclass
class Case:
    task: str
    length: int
    depth: float
    expected: list[str]  # what the answer must contain (the score is the fraction found)
    messages: list[dict[str, str]] | None = None
    prompt_tokens: int = 0
    answer: str = ""
    cut: bool = False

    @property
    def score(self) -> float:
        found = sum(bool(re.search(rf"\b{re.escape(e)}\b", self.answer, re.IGNORECASE)) for e in self.expected)
        return found / len(self.expected)


def _insert(filler: list[str], items: list[tuple[float, str]]) -> str:
    """Filler sentences with each (depth, sentence) placed at that depth, in order."""
    out, placed = [], sorted(items)
    for i, sentence in enumerate(filler + [""]):
        while placed and round(placed[0][0] * len(filler)) <= i:
            out.append(placed.pop(0)[1])
        if sentence:
            out.append(sentence)
    return " ".join(out)


def _user(text: str, question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{text}\n\n{question}"}]


def make_case(client: Client, task: str, length: int, depth: float, rng: random.Random) -> Case:
    """One case of `task` whose templated prompt fills `length` tokens, its content from `depth` on."""
    spread = [min(1.0, depth + i * (1 - depth) / 4) for i in range(4)]  # four items from the depth to the end
    if task == "multikey":
        keys, numbers = rng.sample(KEYS, 4), [str(rng.randrange(10**6, 10**7)) for _ in range(4)]
        target = rng.randrange(4)
        items = [
            (spread[i] if i == target else rng.random(), f"The special magic number for {k} is {n}.")
            for i, (k, n) in enumerate(zip(keys, numbers))
        ]
        question = f"What is the special magic number for {keys[target]} mentioned in the text above? Answer with the number only."
        render, expected = (lambda filler: _user(_insert(filler, items), question)), [numbers[target]]
    elif task == "multivalue":
        key, numbers = rng.choice(KEYS), [str(rng.randrange(10**6, 10**7)) for _ in range(4)]
        items = [(d, f"One of the special magic numbers for {key} is {n}.") for d, n in zip(spread, numbers)]
        question = (
            f"What are all the special magic numbers for {key} mentioned in the text above? List the numbers only."
        )
        render, expected = (lambda filler: _user(_insert(filler, items), question)), numbers
    elif task == "vartrack":
        names, value = rng.sample(VARIABLES, 4), str(rng.randrange(10**4, 10**5))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        question = (
            f"Find all variables that are assigned the value {value} in the text above. List the variable names only."
        )
        render, expected = (lambda filler: _user(_insert(filler, list(zip(spread, chain))), question)), names
    elif task == "commonwords":
        common = rng.sample(WORDS, 5)
        rare = [w for w in WORDS if w not in common]
        question = "What are the 5 most common words in the list above? Answer with the words only."

        def render(filler: list[str]) -> list[dict[str, str]]:  # the list grows with the filler it replaces
            n = len(filler)
            words = [w for w in common for _ in range(max(3, n // 4))] + [
                w for w in rare[: max(3, n // 2)] for _ in range(2)
            ]
            random.Random(len(filler)).shuffle(words)
            return _user(
                "Below is a numbered list of words. " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)), question
            )

        expected = common
    else:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    case = Case(task, length, depth, expected)
    case.messages, case.prompt_tokens = fill(client, length, render, rng)
    return case


def tables(cases: list[Case], lengths: list[int], depths: list[float]) -> str:
    out = []
    for task in dict.fromkeys(c.task for c in cases):
        mine = {(c.length, c.depth): c for c in cases if c.task == task}
        cols = sorted({d for _, d in mine})
        out += [
            f"### {task}",
            "",
            "| context \\ depth | " + " | ".join(f"{d:.0%}" for d in cols) + " | mean |",
            "|---|" + "---|" * (len(cols) + 1),
        ]
        for n in lengths:
            row = [mine[n, d] for d in cols]
            cells = [f"{c.score:.2f}{' (cut off)' if c.cut and c.score < 1 else ''}" for c in row]
            out.append(f"| {n} | " + " | ".join(cells) + f" | {sum(c.score for c in row) / len(row):.2f} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ministack serve ruler", description=__doc__.split("\n")[0])
    add_harness_arguments(p, lengths="1024,2048,4096", depths="0,0.5,1", max_tokens=64)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--out-dir", default="ruler", help="one heatmap PNG per task here")
    args = p.parse_args(argv)
    tasks = args.tasks.split(",")
    if unknown := [t for t in tasks if t not in TASKS]:
        p.error(f"--tasks: unknown {', '.join(unknown)} (known: {', '.join(TASKS)})")
    lengths, depths, client = harness_setup(p, args)
    rng = random.Random(args.seed)
    plan = [(t, n, d) for t in tasks for n in lengths for d in (depths if t != "commonwords" else [0.0])]
    cases = [make_case(client, t, n, d, random.Random(rng.random())) for t, n, d in plan]

    def run(case: Case) -> None:
        case.answer, case.cut = client.ask(case.messages, args.max_tokens)

    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(run, cases))
    print(f"model {client.model}, {args.url}\n")
    print(tables(cases, lengths, depths))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        mine = {(c.length, c.depth): c.score for c in cases if c.task == task}
        cols = sorted({d for _, d in mine})
        heatmap(mine, lengths, cols, f"{task}: {client.model}", str(out / f"{task}.png"))
    print(f"heatmaps: {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
