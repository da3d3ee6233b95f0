"""emb-model-provider: an OpenAI-compatible embeddings server for text and images."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("emb-model-provider")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
