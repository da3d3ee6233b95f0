"""Write the accuracy gate's calibration texts (``emb_model_provider/encoders/calibration.json``).

Varied on purpose, and unlike the benchmark corpus: one-word queries, questions, titles, code,
JSON, URLs, numbers, several scripts and languages, emoji, shouting, typos, and long paragraphs
past 256 tokens (truncated), so that a fast path is judged on what a server meets, short and long.

    uv run python scripts/make_calibration.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "emb_model_provider" / "encoders" / "calibration.json"

WORDS = [
    "protein",
    "kinase",
    "inhibitor",
    "dosage",
    "renal",
    "clearance",
    "contract",
    "clause",
    "liability",
    "indemnity",
    "tenant",
    "landlord",
    "kernel",
    "scheduler",
    "mutex",
    "deadlock",
    "gradient",
    "descent",
    "embedding",
    "tokenizer",
    "latency",
    "throughput",
    "harbour",
    "glacier",
    "volcano",
    "migration",
    "sparrow",
    "orchestra",
    "violin",
    "sonata",
    "recipe",
    "garlic",
    "saffron",
    "mortgage",
    "equity",
    "dividend",
    "inflation",
    "satellite",
    "orbit",
    "telescope",
    "nebula",
    "quarantine",
    "vaccine",
    "tournament",
    "goalkeeper",
    "referee",
    "election",
    "ballot",
    "senator",
    "statute",
    "verdict",
    "appeal",
    "drought",
    "harvest",
]
QUERIES = [
    "cheap flights",
    "python list comprehension",
    "symptoms of flu",
    "best pizza near me",
    "how to reset router",
    "capital of Australia",
    "GDP 2023",
    "weather tomorrow",
    "BM25 vs dense",
    "error 404",
    "tax deadline",
    "laptop 16GB RAM",
    "vegan brownies",
    "k8s pod crashloop",
    "define entropy",
    "who wrote Hamlet",
    "USB-C cable",
    "translate bonjour",
    "sql join types",
    "?",
]
QUESTIONS = [
    "What is the difference between a mutex and a semaphore?",
    "How long should I boil an egg for a soft yolk?",
    "Can a landlord raise the rent during a fixed-term lease?",
    "Why does the moon always show the same face to the Earth?",
    "Which vaccines are recommended before travelling to Kenya?",
    "Is it safe to take ibuprofen with a glass of wine?",
    "How do I convert a pandas DataFrame column to datetime?",
    "What happens if I miss the deadline for filing an appeal?",
]
CODE = [
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { sum += v[i]; }",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 10;",
    "const x = await fetch(url).then(r => r.json());",
    'fn main() { println!("{}", 42); }',
    "kubectl get pods -n kube-system -o wide | grep -v Running",
    '<div class="card"><h2>Title</h2><p>Body</p></div>',
    "git rebase -i HEAD~3 && git push --force-with-lease",
]
STRUCTURED = [
    '{"id": 17, "name": "Widget", "price": 9.99, "tags": ["blue", "small"]}',
    "https://example.com/search?q=embedding+models&page=2#results",
    "contact: jane.doe@example.org, +44 20 7946 0958",
    "2024-03-17T08:15:00Z ERROR [worker-3] connection reset by peer (retry 2/5)",
    "| item | qty |\n| --- | --- |\n| apples | 3 |\n| pears | 12 |",
    "ISBN 978-3-16-148410-0, 3rd ed., pp. 112-118",
    "3.14159 2.71828 1.41421 1.61803 0.57721",
    "A1B2C3D4E5F6",
]
LANGS = [
    "Le chat dort sur le canapé pendant que la pluie tombe.",
    "Die Verhandlung wurde auf nächsten Dienstag vertagt.",
    "¿Dónde está la estación de tren más cercana?",
    "今日はとても良い天気ですね。散歩に行きましょう。",
    "机器学习模型需要大量的训练数据。",
    "Москва — столица России и крупнейший город страны.",
    "القهوة العربية تقدم مع التمر في المناسبات.",
    "इस सप्ताह बाज़ार में सब्ज़ियों के दाम बढ़ गए।",
    "Η θάλασσα ήταν ήρεμη όλο το πρωί.",
    "한국어 문장도 포함되어야 합니다.",
    "O relatório final será publicado em maio.",
    "Bu akşam toplantı saat yedide başlayacak.",
]
ODD = [
    "🙂🙂🙂 great service!!! 👍",
    "THIS IS AN URGENT NOTICE TO ALL STAFF",
    "teh qiuck brwon fox",
    "a",
    "ok",
    "…",
    "lol idk tbh",
    "Re: Re: Fwd: meeting notes (v2) FINAL final.docx",
    "!!!???...",
    "ÅÄÖ åäö ß Ç ñ",
    "x" * 300,
    "la la la la la la la la la la la la",
]


def sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + rng.choice([".", "!", "?", ";", ""])


def main() -> None:
    rng = random.Random(20261206)
    texts: list[str] = [*QUERIES, *QUESTIONS, *CODE, *STRUCTURED, *LANGS, *ODD]
    for _ in range(80):  # sentences of 3 to 30 words
        texts.append(sentence(rng, rng.randint(3, 30)))
    for _ in range(50):  # paragraphs of 2 to 8 sentences
        texts.append(" ".join(sentence(rng, rng.randint(6, 20)) for _ in range(rng.randint(2, 8))))
    for _ in range(20):  # long: past 256 tokens, truncated by most models
        texts.append(
            " ".join(sentence(rng, rng.randint(10, 25)) for _ in range(rng.randint(20, 30)))
        )
    for _ in range(20):  # mixed: a language, a code line and words
        texts.append(f"{rng.choice(LANGS)} {rng.choice(CODE).strip()} {sentence(rng, 8)}")
    rng.shuffle(texts)
    OUT.write_text(json.dumps(texts, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
