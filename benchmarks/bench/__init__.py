"""The benchmark behind ``benchmarks/run.py``, in parts:

- ``targets.py``: the servers under test (ours and its variants, naive FastAPI, infinity-emb);
- ``client.py``: the load generator (a keep-alive HTTP/1.1 client on asyncio streams);
- ``scenarios.py``: raw reference, bulk / chatty / single / sweep, images, repeated queries,
  profile;
- ``report.py``: the Markdown table, the plot and docs/benchmarks.md;
- ``system.py``: CPU and memory of process trees, free ports, the machine and versions.
"""
