"""The servers under test: how each starts (argv, environment), waits to be ready, stops."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.paths import BENCH, MODEL_NAME, ROOT, VENVS
from bench.system import free_port, log


@dataclass
class Target:
    name: str
    label: str
    argv: Callable[[int, str, str | None], list[str]]
    env: dict[str, str] = field(default_factory=dict)
    ready_paths: tuple[str, ...] = ("/ready",)
    start_timeout_s: float = 240.0
    version: str = ""
    error: str = ""
    #: What the load asks for: base64 (the OpenAI SDK's default), or float, int8, uint8,
    #: binary, ubinary (ours only).
    encoding_format: str = "base64"


class Server:
    def __init__(self, target: Target, model_dir: str, logs: Path, models_file: str | None) -> None:
        self.target, self.port = target, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = logs / f"{target.name}.log"
        env = {**os.environ, **target.env}
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            target.argv(self.port, model_dir, models_file),
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.startup_s = self._wait_ready()

    def _wait_ready(self) -> float:
        start = time.perf_counter()
        deadline = start + self.target.start_timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                    raise RuntimeError(f"exited with {self.proc.returncode}: {' | '.join(tail)}")
                for path in self.target.ready_paths:
                    try:
                        if client.get(self.base + path).status_code == 200:
                            return time.perf_counter() - start
                    except httpx.HTTPError:
                        pass
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"not ready after {self.target.start_timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def ours_argv(port: int, model_dir: str, models_file: str | None) -> list[str]:
    argv = [sys.executable, "-m", "emb_model_provider.cli", "serve", "--port", str(port)]
    argv += ["--log-level", "warning", "--device", "cpu"]
    return argv + (["--models-file", models_file] if models_file else [])


def _naive_argv(port: int, model_dir: str, models_file: str | None) -> list[str]:
    return [
        sys.executable,
        str(BENCH / "naive_server.py"),
        "--model-dir",
        model_dir,
        "--port",
        str(port),
    ]


def _infinity_bin() -> Path:
    return VENVS / "infinity" / "bin" / "infinity_emb"


def _infinity_argv(port: int, model_dir: str, models_file: str | None) -> list[str]:
    return [
        str(_infinity_bin()),
        "v2",
        "--model-id",
        model_dir,
        "--served-model-name",
        MODEL_NAME,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--engine",
        "torch",
        "--device",
        "cpu",
        "--batch-size",
        "32",
        "--url-prefix",
        "/v1",
        "--log-level",
        "warning",
    ]


def ensure_infinity(timeout_s: float) -> tuple[str, str]:
    """(version, error): install infinity-emb into benchmarks/.venvs/infinity once, then reuse."""
    venv = VENVS / "infinity"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('infinity-emb'))"]
    if _infinity_bin().exists():
        done = subprocess.run(probe, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode == 0:
            return done.stdout.strip(), ""
    uv = shutil.which("uv")
    if uv is None:
        return "", "uv not found"
    log(f"installing infinity-emb into {venv} (at most {timeout_s:.0f} s)")
    logfile = VENVS / "infinity-install.log"
    VENVS.mkdir(parents=True, exist_ok=True)
    try:
        with logfile.open("w") as out:
            subprocess.run(
                [uv, "venv", "-q", "-p", "3.11", str(venv)], check=True, stdout=out, stderr=out
            )
            installed = subprocess.run(
                [uv, "pip", "install", "-p", str(python), "infinity-emb[server,torch]"],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                check=False,
            )
    except subprocess.TimeoutExpired:
        return "", f"install did not finish in {timeout_s:.0f} s"
    except (subprocess.CalledProcessError, OSError) as exc:
        return "", str(exc)
    if installed.returncode != 0:
        lines = [x for x in logfile.read_text(errors="replace").splitlines() if x.strip()]
        return "", lines[-1] if lines else f"uv pip install exited {installed.returncode}"
    done = subprocess.run(probe, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        return "", (done.stderr.strip().splitlines() or ["import failed"])[-1]
    return done.stdout.strip(), ""


class TraceSink:
    """``scripts/otlp_sink.py`` on a free port: it answers the traced server's OTLP/HTTP exports
    with 200, so that tracing costs the server what it costs in production (spans, batching,
    protobuf, the POST) without a collector. Its own CPU shows as other processes' ("foreign");
    at exit it logs how many exports it received."""

    def __init__(self) -> None:
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - read and closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "otlp_sink.py"), "--port", str(port)],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the sink prints its totals on SIGINT
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if not self._out.closed:
            self._out.seek(0)
            log(f"trace sink: {self._out.read().decode(errors='replace').strip()}")
            self._out.close()


_SINK: list[TraceSink] = []


def _trace_sink() -> TraceSink:
    """One sink for the run, started when a traced target is asked for."""
    if not _SINK:
        _SINK.append(TraceSink())
    return _SINK[0]


def make_targets(names: list[str], install_timeout_s: float) -> list[Target]:
    from emb_model_provider import __version__

    known = {
        # The result cache is off: these scenarios send the corpus more than once, and what they
        # compare is the model path against raw and the peers (none of which caches). The
        # `repeat` scenario measures the cache, on and off.
        "ours": Target(
            "ours",
            f"emb-model-provider {__version__}",
            ours_argv,
            env={"EMB_PROVIDER_CACHE": "off"},
            version=__version__,
        ),
        # Same server, torch limited to one intra-op thread (EMB_PROVIDER_NUM_THREADS=1).
        "ours-t1": Target(
            "ours-t1",
            "emb-model-provider, 1 torch thread",
            ours_argv,
            env={"EMB_PROVIDER_NUM_THREADS": "1", "EMB_PROVIDER_CACHE": "off"},
            version=__version__,
        ),
        # Same server, the model in bfloat16 (EMB_PROVIDER_DTYPE; per model: `dtype:` in the
        # models file): 2x on CPUs with AMX/AVX512-BF16, cosine >= 0.9999 (benchmarks/backends.py).
        "ours-bf16": Target(
            "ours-bf16",
            "emb-model-provider, bfloat16",
            ours_argv,
            env={"EMB_PROVIDER_DTYPE": "bfloat16", "EMB_PROVIDER_CACHE": "off"},
            version=__version__,
        ),
        # Same server, `precision: fast` (EMB_PROVIDER_PRECISION): the fastest path this CPU
        # runs that passes the accuracy gate at load (encoders/fast.py); the first start
        # converts and calibrates (cached beside the hub cache), hence the longer start bound.
        "ours-fast": Target(
            "ours-fast",
            "emb-model-provider, precision fast",
            ours_argv,
            env={"EMB_PROVIDER_PRECISION": "fast", "EMB_PROVIDER_CACHE": "off"},
            start_timeout_s=900.0,
            version=__version__,
        ),
        # Same server, OpenMP threads that sleep instead of spinning when they wait.
        "ours-passive": Target(
            "ours-passive",
            "emb-model-provider, OMP_WAIT_POLICY=PASSIVE",
            ours_argv,
            env={"OMP_WAIT_POLICY": "PASSIVE", "EMB_PROVIDER_CACHE": "off"},
            version=__version__,
        ),
        # Same server, every request traced (OpenTelemetry, sampled always) and exported over
        # OTLP/HTTP to a local sink (scripts/otlp_sink.py): what tracing costs.
        "ours-traced": Target(
            "ours-traced",
            "emb-model-provider, traced (OTLP)",
            ours_argv,
            env={"EMB_PROVIDER_CACHE": "off", "OTEL_TRACES_SAMPLER": "always_on"},
            version=__version__,
        ),
        # Same, with the sampling docs/operations.md recommends for production: one trace in ten
        # (parent-based, so a caller's sampled trace is still followed).
        "ours-traced-10": Target(
            "ours-traced-10",
            "emb-model-provider, traced (OTLP), 1 in 10 sampled",
            ours_argv,
            env={
                "EMB_PROVIDER_CACHE": "off",
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.1",
            },
            version=__version__,
        ),
        # Same server, the load asks for quantised vectors (encoding_format): what the
        # quantisation costs over base64 floats, in the same run.
        "ours-int8": Target(
            "ours-int8",
            "emb-model-provider, encoding_format int8",
            ours_argv,
            env={"EMB_PROVIDER_CACHE": "off"},
            version=__version__,
            encoding_format="int8",
        ),
        "ours-ubinary": Target(
            "ours-ubinary",
            "emb-model-provider, encoding_format ubinary",
            ours_argv,
            env={"EMB_PROVIDER_CACHE": "off"},
            version=__version__,
            encoding_format="ubinary",
        ),
        "naive": Target("naive", "naive FastAPI + encode()", _naive_argv, ready_paths=("/health",)),
        "infinity": Target(
            "infinity",
            "infinity-emb (torch)",
            _infinity_argv,
            ready_paths=("/v1/health", "/health"),
            start_timeout_s=300,
        ),
    }
    targets = []
    for name in names:
        target = known[name]
        if name.startswith("ours-traced"):
            target.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = _trace_sink().endpoint
        if name == "infinity":
            target.version, target.error = ensure_infinity(install_timeout_s)
            if target.version:
                target.label = f"infinity-emb {target.version} (torch)"
        targets.append(target)
    return targets
