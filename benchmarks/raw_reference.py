"""The reference the servers are measured against: the model called in-process, no HTTP.

Run by ``benchmarks/run.py`` in its own process (so its torch threads and memory are its own)
and prints one JSON object on its last line.

    python benchmarks/raw_reference.py text --model-dir DIR --corpus benchmarks/corpus.jsonl
    python benchmarks/raw_reference.py image --out-dir DIR --n-images 256
    python benchmarks/raw_reference.py rerank --model-dir DIR --pairs pairs.json
    python benchmarks/raw_reference.py sparse --model-dir DIR --texts texts.json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def text(args: argparse.Namespace) -> dict[str, Any]:  # noqa: PLR0915 - one measured sequence
    import torch
    from sentence_transformers import SentenceTransformer

    corpus = [json.loads(line)["text"] for line in Path(args.corpus).read_text().splitlines()]
    corpus = corpus[: args.n_inputs]
    model = SentenceTransformer(args.model_dir, device="cpu")
    model.encode(["warm up"] * 4)
    out: dict[str, Any] = {"bare_rss_kb": rss_kb(), "torch_threads": torch.get_num_threads()}

    short = args.single_text
    single: list[float] = []
    end = time.perf_counter() + args.budget_s / 4
    for _ in range(args.n_single):
        if single and time.perf_counter() > end:
            break
        start = time.perf_counter()
        model.encode([short], normalize_embeddings=True)
        single.append((time.perf_counter() - start) * 1000)
    out["single_ms"] = {
        "p50": pct(single, 50),
        "p99": pct(single, 99),
        "mean": statistics.fmean(single),
    }

    # Whole corpus in one call: sentence-transformers sorts by length, then cuts batches of 32.
    sorted_s = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        model.encode(corpus, batch_size=32, normalize_embeddings=True)
        sorted_s.append(time.perf_counter() - start)
    out["sorted_s"] = min(sorted_s)
    out["sorted_inputs_per_s"] = len(corpus) / min(sorted_s)

    # One call per 32-input chunk, in corpus order: what a server that never merges requests gets.
    chunk_ms: list[float] = []
    start, done = time.perf_counter(), 0
    end = start + args.budget_s / 2
    for i in range(0, len(corpus), 32):
        if done and time.perf_counter() > end:  # bounded: the rate of the chunks that ran
            break
        t0 = time.perf_counter()
        model.encode(corpus[i : i + 32], batch_size=32, normalize_embeddings=True)
        chunk_ms.append((time.perf_counter() - t0) * 1000)
        done += len(corpus[i : i + 32])
    out["chunked_s"] = time.perf_counter() - start
    out["chunked_inputs"] = done
    out["chunked_inputs_per_s"] = done / out["chunked_s"]
    out["chunk_ms"] = {"p50": pct(chunk_ms, 50), "p99": pct(chunk_ms, 99)}

    # Where the time of the sorted run goes: tokenisation alone, and padding.
    start = time.perf_counter()
    features = model.tokenize(corpus)
    out["tokenize_corpus_s"] = time.perf_counter() - start
    lengths = [int(x) for x in features["attention_mask"].sum(dim=1)]
    real = sum(lengths)
    by_len = sorted(lengths)
    padded_sorted = sum(
        max(by_len[i : i + 32]) * len(by_len[i : i + 32]) for i in range(0, len(by_len), 32)
    )
    padded_chunks = sum(
        max(lengths[i : i + 32]) * len(lengths[i : i + 32]) for i in range(0, len(lengths), 32)
    )
    out["tokens"] = {
        "real": real,
        "mean": real / len(lengths),
        "max": max(lengths),
        "padded_sorted": padded_sorted,
        "padded_chunks": padded_chunks,
    }
    if args.thread_check:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        start = time.perf_counter()
        model.encode(corpus[:512], batch_size=32, normalize_embeddings=True)
        out["sorted_inputs_per_s_1_thread"] = 512 / (time.perf_counter() - start)
        single_1 = []
        for _ in range(min(args.n_single, 50)):
            t0 = time.perf_counter()
            model.encode([short], normalize_embeddings=True)
            single_1.append((time.perf_counter() - t0) * 1000)
        out["single_ms_1_thread"] = {"p50": pct(single_1, 50), "p99": pct(single_1, 99)}
        torch.set_num_threads(threads)
    out["n_inputs"] = len(corpus)
    return out


def _images(n: int, size: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    images = []
    for i in range(n):
        base = np.stack(
            [(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, (xx + yy + 13 * i) % 256], -1
        )
        noise = rng.integers(0, 24, size=(size, size, 3))
        buf = io.BytesIO()
        Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    return images


def image(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from PIL import Image
    from transformers import (
        AutoImageProcessor,
        AutoModel,
        DINOv3ViTConfig,
        DINOv3ViTImageProcessor,
        DINOv3ViTModel,
    )

    out_dir = Path(args.out_dir)
    model_dir = out_dir / "dinov3"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        DINOv3ViTModel(DINOv3ViTConfig(num_register_tokens=4)).save_pretrained(model_dir)
        DINOv3ViTImageProcessor().save_pretrained(model_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    pngs = _images(args.n_images, args.image_size)
    for i, data in enumerate(pngs):
        (images_dir / f"{i:04d}.png").write_bytes(data)

    # Untyped in transformers.
    processor = cast(Callable[[str | Path], Any], AutoImageProcessor.from_pretrained)(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        model(**processor(images=[Image.new("RGB", (224, 224))] * 2, return_tensors="pt"))
    start = time.perf_counter()
    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in pngs]
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(decoded), 32):
            inputs = processor(images=decoded[i : i + 32], return_tensors="pt")
            model(**inputs).pooler_output.numpy()
    forward_s = time.perf_counter() - start
    return {
        "model_dir": str(model_dir),
        "images_dir": str(images_dir),
        "n_images": len(pngs),
        "png_bytes_mean": sum(map(len, pngs)) / len(pngs),
        "decode_s": decode_s,
        "process_forward_s": forward_s,
        "images_per_s": len(pngs) / forward_s,
        "images_per_s_with_decode": len(pngs) / (forward_s + decode_s),
    }


def multimodal(args: argparse.Namespace) -> dict[str, Any]:
    """A CLIP/SigLIP directory through transformers alone: the processor and
    ``get_image_features`` on batches of 32 decoded images, and ``get_text_features`` on batches
    of 32 texts, in corpus order and sorted by length."""
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    images_dir = Path(args.out_dir) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    pngs = _images(args.n_images, args.image_size)
    for i, data in enumerate(pngs):
        (images_dir / f"{i:04d}.png").write_bytes(data)
    texts = [json.loads(line)["text"] for line in Path(args.corpus).read_text().splitlines()]
    texts = texts[: args.n_texts]
    # Untyped in transformers.
    processor = cast(Callable[[str], Any], AutoProcessor.from_pretrained)(args.model_dir)
    model = AutoModel.from_pretrained(args.model_dir).eval()
    # SigLIP was trained with texts padded to a fixed length; CLIP pads to the longest.
    padding = "max_length" if "siglip" in type(model).__name__.lower() else True

    def embed_texts(batch: list[str]) -> None:
        inputs = processor(text=batch, padding=padding, truncation=True, return_tensors="pt")
        model.get_text_features(**inputs)

    def embed_images(batch: list[Any]) -> None:
        model.get_image_features(**processor(images=batch, return_tensors="pt"))

    with torch.inference_mode():
        embed_images([Image.new("RGB", (224, 224))] * 2)
        embed_texts(["warm up"] * 2)
        start = time.perf_counter()
        decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in pngs]
        decode_s = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(0, len(decoded), 32):
            embed_images(decoded[i : i + 32])
        image_s = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(0, len(texts), 32):
            embed_texts(texts[i : i + 32])
        text_s = time.perf_counter() - start
        by_length = sorted(texts, key=len)
        start = time.perf_counter()
        for i in range(0, len(by_length), 32):
            embed_texts(by_length[i : i + 32])
        text_sorted_s = time.perf_counter() - start
    return {
        "images_dir": str(images_dir),
        "n_images": len(pngs),
        "n_texts": len(texts),
        "images_per_s": len(pngs) / image_s,
        "images_per_s_with_decode": len(pngs) / (image_s + decode_s),
        "texts_per_s": len(texts) / text_s,
        "texts_sorted_per_s": len(texts) / text_sorted_s,
    }


def rerank(args: argparse.Namespace) -> dict[str, Any]:
    """Pairs per second of ``CrossEncoder.predict(pairs, batch_size=32)``, per pair set."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(args.model_dir, device="cpu")
    pair_sets: dict[str, list[list[str]]] = json.loads(Path(args.pairs).read_text())
    model.predict([("warm up", "the model")] * 32, batch_size=32)
    out: dict[str, Any] = {}
    for name, pairs in pair_sets.items():
        start = time.perf_counter()
        model.predict([(query, document) for query, document in pairs], batch_size=32)
        out[name] = len(pairs) / (time.perf_counter() - start)
    return out


def sparse(args: argparse.Namespace) -> dict[str, Any]:
    """Texts per second of ``SparseEncoder.encode(texts, batch_size=...)``."""
    from sentence_transformers import SparseEncoder

    model = SparseEncoder(args.model_dir, device="cpu")
    texts: list[str] = json.loads(Path(args.texts).read_text())
    model.encode(texts[: args.batch_size], batch_size=args.batch_size)  # warm, a full batch
    start = time.perf_counter()
    model.encode(texts, batch_size=args.batch_size)
    return {"texts_per_s": len(texts) / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="kind", required=True)
    t = sub.add_parser("text")
    t.add_argument("--model-dir", required=True)
    t.add_argument("--corpus", required=True)
    t.add_argument("--n-inputs", type=int, default=2048)
    t.add_argument("--n-single", type=int, default=200)
    t.add_argument("--repeats", type=int, default=1)
    t.add_argument("--single-text", default="How do I reset my password?")
    t.add_argument("--thread-check", action="store_true")
    t.add_argument(
        "--budget-s", type=float, default=240.0, help="bounds the single and chunk loops"
    )
    i = sub.add_parser("image")
    i.add_argument("--out-dir", required=True)
    i.add_argument("--n-images", type=int, default=256)
    i.add_argument("--image-size", type=int, default=256)
    m = sub.add_parser("multimodal")
    m.add_argument("--model-dir", required=True)
    m.add_argument("--out-dir", required=True)
    m.add_argument("--corpus", required=True)
    m.add_argument("--n-texts", type=int, default=512)
    m.add_argument("--n-images", type=int, default=128)
    m.add_argument("--image-size", type=int, default=256)
    r = sub.add_parser("rerank")
    r.add_argument("--model-dir", required=True)
    r.add_argument("--pairs", required=True, help="JSON: name -> [[query, document], ...]")
    s = sub.add_parser("sparse")
    s.add_argument("--model-dir", required=True)
    s.add_argument("--texts", required=True, help="JSON: a list of texts")
    s.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    kinds = {
        "text": text,
        "image": image,
        "multimodal": multimodal,
        "rerank": rerank,
        "sparse": sparse,
    }
    result = kinds[args.kind](args)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
