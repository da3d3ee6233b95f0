"""Offline embedding, the ``embed`` command (not the Batch API, ``batch_api/``, nor the
scheduler's dynamic batching, ``scheduler.py``): a corpus file or an image folder in, a Parquet
or ``.npy`` file of vectors out.

One job, three engines over the same registry and encoders as the server:

- ``local``: the encoder in this process (``local.LocalEmbedder``);
- ``http``: a running server's ``/v1/embeddings`` with bounded concurrency (``http.HttpEmbedder``);
- ``ray``: Ray Data ``map_batches`` over a pool of encoder actors (``ray_engine``).

The local and HTTP engines run in chunks (``job.run_job``): each finished chunk is a part file
written atomically, so an interrupted run resumes from the parts on disk; the final output is
assembled from the parts and renamed into place.
"""
