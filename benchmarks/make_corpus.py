"""Write benchmarks/corpus.jsonl: 2048 English texts of 5 to 200 words, from a fixed seed.

The texts are built from sentence templates and the word lists below, so the corpus is the same
on every machine and needs no download. Lengths follow a log-uniform spread (many short queries,
some paragraphs), which is what embedding traffic for search and RAG looks like.

    uv run python benchmarks/make_corpus.py        # rewrites benchmarks/corpus.jsonl
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

SEED = 20240611
N_TEXTS = 2048
MIN_WORDS, MAX_WORDS = 5, 200

SUBJECTS = """the engineer|our team|the new model|a small startup|the city council|my neighbour|
the research group|the customer|this library|the server|the old bridge|a young teacher|the report|
the market|the hospital|the orchestra|the weather service|the database|the quarterly review|
every student|the museum|the delivery driver|the support agent|the farmer|the compiler|the article|
the committee|the river|the airline|the chef|the algorithm|the manager|a volunteer|the laboratory|
the school board|the courier|the novel|the storm|the protocol|the app""".replace("\n", "").split(
    "|"
)

VERBS = """improved|described|rejected|measured|explained|delayed|announced|reviewed|replaced|
tested|cleaned|summarised|predicted|designed|repaired|questioned|approved|translated|deployed|
ignored|compared|documented|shipped|cancelled|recommended|discovered|simplified|monitored|
doubled|reduced|organised|published|scheduled|inspected|recorded|updated|built|planned|sold|found"""
VERBS_L = VERBS.replace("\n", "").split("|")

OBJECTS = """the annual budget|a faster search index|the broken pipeline|three new routes|
the safety checklist|an unusual pattern in the data|the migration plan|the training schedule|
a set of photographs|the login page|the winter menu|the final draft|the price of coffee|
a long list of complaints|the evening news|the shipping costs|the test results|the garden path|
the memory leak|the user interface|a recipe for bread|the concert tickets|the travel guide|
the release notes|the solar panels|an open-source tool|the contract terms|the rental car|
the sales forecast|the recycling rules|a map of the region|the network outage|the error messages|
the conference agenda|a new bicycle lane|the cache settings|the school timetable|the energy bill"""
OBJECTS_L = OBJECTS.replace("\n", "").split("|")

ADVERBIALS = """last week|before the deadline|after a long discussion|without any warning|
in the morning|during the holidays|for the second time|with great care|in under an hour|
despite the rain|at the request of the director|on a tight budget|across all regions|
for the first time since 2019|while the system was under load|in front of the press|
after several failed attempts|with help from volunteers|at the end of the quarter|
behind schedule|ahead of the launch|in two separate steps|by a wide margin|quietly|
according to the latest survey|in response to customer feedback""".replace("\n", "").split("|")

CLAUSES = """because the earlier version was too slow|so that everyone could follow along|
although nobody expected it to work|which surprised most of the staff|
but the results were still uncertain|and the feedback was mostly positive|
since the old approach no longer scaled|while prices kept rising|
even though the instructions were unclear|so the next release will be smaller|
and several people asked for more details|which made the whole process easier|
but a few questions remain open|after the previous attempt had failed""".replace("\n", "").split(
    "|"
)

QUESTIONS = """how do I reset my password|what is the best way to store fresh herbs|
why does the build fail on Windows|where can I find the annual report|
how long does shipping to Canada take|which laptop is best for data science|
what time does the museum open on Sunday|how to cook rice without a rice cooker|
is it safe to update the firmware now|what are the side effects of caffeine|
how many people live in Lisbon|can I return an item after thirty days|
what does an embedding model do|how to speed up a slow SQL query|
when is the next train to the airport|why is the sky blue in the afternoon""".replace(
    "\n", ""
).split("|")


def _sentence(rng: random.Random) -> str:
    parts = [rng.choice(SUBJECTS), rng.choice(VERBS_L), rng.choice(OBJECTS_L)]
    if rng.random() < 0.6:
        parts.append(rng.choice(ADVERBIALS))
    if rng.random() < 0.4:
        parts.append(rng.choice(CLAUSES))
    text = " ".join(parts)
    return text[0].upper() + text[1:] + "."


def _text(rng: random.Random, target_words: int) -> str:
    if target_words <= 10 and rng.random() < 0.5:
        question = rng.choice(QUESTIONS)
        return question[0].upper() + question[1:] + "?"
    sentences: list[str] = []
    words = 0
    while words < target_words:
        sentence = _sentence(rng)
        sentences.append(sentence)
        words += len(sentence.split())
    text = " ".join(sentences).split()
    cut = text[: max(MIN_WORDS, target_words)]
    out = " ".join(cut)
    return out if out.endswith(".") else out + "."


def make_corpus(seed: int = SEED, n: int = N_TEXTS) -> list[str]:
    rng = random.Random(seed)
    lo, hi = math.log(MIN_WORDS), math.log(MAX_WORDS)
    return [_text(rng, round(math.exp(rng.uniform(lo, hi)))) for _ in range(n)]


def main() -> None:
    path = Path(__file__).with_name("corpus.jsonl")
    with path.open("w", encoding="utf-8") as out:
        for text in make_corpus():
            out.write(json.dumps({"text": text}) + "\n")


if __name__ == "__main__":
    main()
