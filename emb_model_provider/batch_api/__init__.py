"""The OpenAI Batch API for embeddings, on its own floor above the online path.

- ``protocol.py``: the wire models of ``/v1/files`` and ``/v1/batches`` (pure pydantic);
- ``store.py``: batch and file records in SQLite, the files on disk;
- ``service.py``: ``BatchJobs``, what the routes ask (upload, create, list, cancel);
- ``runner.py``: ``BatchRunner``, which works through a job's lines in the background lane of the
  embedding service, resumable after a restart.

It uses the embedding service (``services/``); nothing online imports it. The routes are thin and
live with the others in ``api/batches.py`` and ``api/files.py``.
"""
