"""The container and cluster files: Dockerfile, docker-compose.yml, deploy/ (Kubernetes, systemd).

Offline and without a docker daemon (CI has none): manifests against the Kubernetes schemas,
their settings against ``Settings``, their probes and metric names against a live server, the
Dockerfile and compose file parsed and checked for what the image must do. The image itself is
built and run by deploy/docker/build-local.sh (docs/deployment.md says what was measured).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from emb_model_provider.core.config import ENV_PREFIX, Settings, env_name
from emb_model_provider.registry import load_models_file
from tests.live import free_port, live_server, test_settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
SYSTEMD_UNIT = ROOT / "deploy" / "systemd" / "emb-model-provider.service"
#: Oldest Kubernetes the manifests claim (autoscaling/v2 and policy/v1 are GA well before it) and
#: the newest schemas kubernetes-validate 1.37 ships.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
#: Not Kubernetes API objects: kustomize's own file has no schema in the API.
KUSTOMIZATION = "kustomization.yaml"
#: Part of the Prometheus adapter's install, not of the kustomizations (prometheus-adapter.yaml).
ADAPTER_RULES = K8S / "prometheus-adapter.yaml"
#: An example the operator fills and applies once: `apply -k` must never overwrite the real one.
SECRET_EXAMPLE = K8S / "secret.yaml"
SETTING_NAMES = {env_name(name) for name in Settings.model_fields}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _manifests() -> list[Path]:
    return sorted(path for path in K8S.rglob("*.yaml") if path.name != KUSTOMIZATION)


def _objects(kind: str) -> list[dict[str, Any]]:
    return [doc for path in _manifests() for doc in _documents(path) if doc["kind"] == kind]


def _by_name(kind: str, name: str) -> dict[str, Any]:
    return next(doc for doc in _objects(kind) if doc["metadata"]["name"] == name)


def _containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    return containers


# -- Kubernetes schemas ------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", _manifests(), ids=lambda path: str(path.relative_to(K8S)))
def test_manifest_validates_against_the_kubernetes_schema(path: Path, version: str) -> None:
    documents = _documents(path)
    assert documents, f"{path} holds no object"
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)


def test_the_schema_check_refuses_misspelt_and_mistyped_fields() -> None:
    """What makes the test above worth having: strict mode fails on what kubectl would reject."""
    deployment = _by_name("Deployment", "emb-model-provider")
    misspelt = copy.deepcopy(deployment)
    container = _containers(misspelt)[0]
    container["livenesProbes"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSIONS[-1], strict=True)
    mistyped = copy.deepcopy(deployment)
    mistyped["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(mistyped, KUBERNETES_VERSIONS[-1], strict=True)


def test_each_kustomization_lists_every_manifest_of_its_folder() -> None:
    kustomizations = sorted(K8S.rglob(KUSTOMIZATION))
    assert {path.parent for path in kustomizations} == {K8S, K8S / "gpu"}
    for path in kustomizations:
        listed = set(_documents(path)[0]["resources"])
        present = {
            other.name
            for other in path.parent.glob("*.yaml")
            if other.name != KUSTOMIZATION and other not in (ADAPTER_RULES, SECRET_EXAMPLE)
        }
        assert listed == present, path
        images = {image["name"] for image in _documents(path)[0]["images"]}
        for manifest in present:
            for doc in _documents(path.parent / manifest):
                if doc["kind"] == "Deployment":
                    names = {c["image"].split(":")[0] for c in _containers(doc)}
                    assert names <= images, f"{manifest}: kustomize would not retag {names}"


def test_selectors_match_the_pods_they_mean() -> None:
    deployments = _objects("Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {
        "emb-model-provider",
        "emb-model-provider-gpu",
    }
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        service = _by_name("Service", name)
        assert service["spec"]["selector"].items() <= labels.items()
        port_names = {port["name"] for c in _containers(deployment) for port in c["ports"]}
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names
        pdb = _by_name("PodDisruptionBudget", name)
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        hpa = _by_name("HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        # Every other pool's selector must miss these pods: one model pool per Service.
        for other in deployments:
            if other is not deployment:
                other_selector = other["spec"]["selector"]["matchLabels"]
                assert not other_selector.items() <= labels.items()


def test_gpu_pool_asks_for_a_gpu_on_gpu_nodes_and_the_cpu_pool_does_not() -> None:
    gpu = _by_name("Deployment", "emb-model-provider-gpu")
    pod = gpu["spec"]["template"]["spec"]
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    (container,) = _containers(gpu)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {e["name"]: e["value"] for e in container["env"]}["EMB_PROVIDER_DEVICE"] == "cuda"
    cpu = _by_name("Deployment", "emb-model-provider")
    assert "nvidia.com/gpu" not in json.dumps(cpu)


# -- settings, ports and probes against the code -----------------------------------------------


def _env_names_in_manifests() -> dict[str, str]:
    """Every EMB_PROVIDER_* name a manifest sets, with where."""
    names: dict[str, str] = {}
    for path in _manifests():
        for doc in _documents(path):
            where = f"{path.relative_to(ROOT)} {doc['kind']}/{doc['metadata']['name']}"
            for key in {**doc.get("data", {}), **doc.get("stringData", {})}:
                if key.startswith(ENV_PREFIX):
                    names[key] = where
            if doc["kind"] == "Deployment":
                for container in _containers(doc):
                    for variable in container.get("env", []):
                        names[variable["name"]] = where
    return names


def test_every_setting_the_files_set_is_a_setting_of_the_server() -> None:
    used = _env_names_in_manifests()
    used.update(dict.fromkeys(_compose_environment_names(), "docker-compose.yml"))
    used.update(dict.fromkeys(_dockerfile().final.env, "Dockerfile"))
    used.update(dict.fromkeys(_systemd_environment(), str(SYSTEMD_UNIT.relative_to(ROOT))))
    ours = {name: where for name, where in used.items() if name.startswith(ENV_PREFIX)}
    assert len(ours) >= 10
    unknown = {name: where for name, where in ours.items() if name not in SETTING_NAMES}
    assert not unknown, f"not fields of Settings (core/config.py): {unknown}"


def test_the_configmap_secret_and_models_file_make_settings_the_server_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pod's environment, as Kubernetes would build it, through pydantic-settings."""
    models = _by_name("ConfigMap", "emb-model-provider-models")["data"]["models.yaml"]
    models_file = tmp_path / "models.yaml"
    models_file.write_text(models, encoding="utf-8")
    specs = load_models_file(models_file)
    assert specs, "the models file adds no model"

    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    deployment = _by_name("Deployment", "emb-model-provider")
    env = {
        **_by_name("ConfigMap", "emb-model-provider")["data"],
        **_by_name("Secret", "emb-model-provider-secrets")["stringData"],
        **{e["name"]: e["value"] for e in _containers(deployment)[0]["env"]},
    }
    mounts = {m["name"]: m["mountPath"] for m in _containers(deployment)[0]["volumeMounts"]}
    assert env["EMB_PROVIDER_MODELS_FILE"] == f"{mounts['config']}/models.yaml"
    assert env["EMB_PROVIDER_CACHE_DIR"].startswith(mounts["cache"] + "/")
    assert env["EMB_PROVIDER_DATA_DIR"] == mounts["data"]
    env["EMB_PROVIDER_MODELS_FILE"] = str(models_file)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)
    assert settings.host == "0.0.0.0"
    assert settings.models_file == models_file
    assert settings.hf_token_value() in (None, "")


def test_container_ports_are_the_servers() -> None:
    port = Settings.model_fields["port"].default
    config = _by_name("ConfigMap", "emb-model-provider")["data"]
    assert int(config["EMB_PROVIDER_PORT"]) == port
    for deployment in _objects("Deployment"):
        (container,) = _containers(deployment)
        (declared,) = container["ports"]
        assert declared == {"name": "http", "containerPort": port, "protocol": "TCP"}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["port"] in ("http", port), probe
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == port
    assert str(port) in _dockerfile().final.instructions_named("EXPOSE")[0].split()


@dataclass
class Served:
    url: str
    series: set[str]


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """A live server after one embeddings request, and the sample names its /metrics serves."""
    with live_server(test_settings()) as url, httpx.Client(base_url=url, timeout=60) as http:
        embedded = http.post(
            "/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": ["one", "two"]}
        )
        assert embedded.status_code == 200, embedded.text
        text = http.get("/metrics").text
        series = {
            sample.name
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        yield Served(url, series)


def test_probes_point_at_paths_the_server_answers(served: Served) -> None:
    paths: dict[str, set[str]] = {
        "startupProbe": set(),
        "livenessProbe": set(),
        "readinessProbe": set(),
    }
    scraped: set[str] = set()
    for deployment in _objects("Deployment"):
        (container,) = _containers(deployment)
        for probe, seen in paths.items():
            seen.add(container[probe]["httpGet"]["path"])
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        scraped.add(annotations["prometheus.io/path"])
    # Liveness must not depend on the model (a restart would not help a slow load); readiness
    # must (traffic only once the model is warm).
    assert paths["livenessProbe"] == {"/health"}
    assert paths["readinessProbe"] == {"/ready"}
    with httpx.Client(base_url=served.url, timeout=10) as http:
        for path in scraped.union(*paths.values()):
            assert http.get(path).status_code == 200, path
        assert http.get("/no-such-probe").status_code == 404


def _adapter_rules() -> list[dict[str, Any]]:
    (config,) = _documents(ADAPTER_RULES)
    rules: list[dict[str, Any]] = yaml.safe_load(config["data"]["config.yaml"])["rules"]
    return rules


def test_hpa_metrics_come_from_series_the_server_serves(served: Served) -> None:
    exposed: dict[str, str] = {}  # custom metric name -> the Prometheus series it is made of
    for rule in _adapter_rules():
        series = re.match(r"^(\w+)\{", rule["seriesQuery"])
        assert series is not None, rule["seriesQuery"]
        name = series.group(1)
        assert name in served.series, f"/metrics serves no {name}: {sorted(served.series)}"
        assert re.search(rule["name"]["matches"], name), rule
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        exposed[rule["name"]["as"]] = name
    hpas = _objects("HorizontalPodAutoscaler")
    assert len(hpas) == 2
    for hpa in hpas:
        pods = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert pods, f"{hpa['metadata']['name']} scales on no per-pod metric"
        for name in pods:
            assert name in exposed, f"no adapter rule serves {name}"
    # The queue-depth gauge is the signal: one series per loaded model, summed per pod.
    assert exposed["emb_provider_queue_inputs"] == "emb_provider_queue_inputs"


# -- Dockerfile --------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def instructions_named(self, keyword: str) -> list[str]:
        return [args for name, args in self.instructions if name == keyword]


@dataclass
class Dockerfile:
    args: dict[str, str]  # ARGs before the first FROM
    stages: list[Stage]
    directives: dict[str, str]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(stage for stage in self.stages if stage.name == name)


def _dockerfile() -> Dockerfile:
    """Instructions by stage: comments dropped, continuation lines joined, as the builder reads
    them (parser directives only in the leading comment block)."""
    directives: dict[str, str] = {}
    logical: list[str] = []
    pending = ""
    leading = True
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        directive = re.match(r"^#\s*(\w+)\s*=\s*(.*)$", line)
        if leading and directive:
            directives[directive.group(1).lower()] = directive.group(2)
            continue
        if line.startswith("#") or not line:
            leading = leading and (not line or line.startswith("#"))
            continue
        leading = False
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            named = len(words) == 3 and words[1].upper() == "AS"
            stages.append(Stage(base=words[0], name=words[2] if named else None))
        elif not stages:
            assert keyword == "ARG", line
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append((keyword, rest.strip()))
            if keyword == "ENV":
                for token in shlex.split(rest):
                    name, _, value = token.partition("=")
                    stages[-1].env[name] = value
    return Dockerfile(args, stages, directives)


def test_dockerfile_is_a_multi_stage_build_from_the_lock() -> None:
    dockerfile = _dockerfile()
    # A `# syntax=` directive makes BuildKit pull its frontend from a registry first.
    assert "syntax" not in dockerfile.directives
    assert dockerfile.args["BASE_IMAGE"].startswith("python:3.11-slim")
    assert dockerfile.args["UV_IMAGE"].startswith("ghcr.io/astral-sh/uv:")
    builder = dockerfile.stage("builder")
    assert dockerfile.final.base == builder.base == "${BASE_IMAGE}"
    installs = " ".join(builder.instructions_named("RUN"))
    assert "uv export --frozen --no-dev" in installs
    assert "uv pip install --no-deps -r" in installs
    # The final stage takes the environment, not the tools or the source.
    copies = dockerfile.final.instructions_named("COPY")
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    assert dockerfile.final.env["PATH"].startswith("/opt/venv/bin:")
    assert "TORCH_VARIANT=cpu" in builder.instructions_named("ARG")
    # The CPU image takes the `fast` extra (OpenVINO, `precision: fast`); EXTRAS overrides.
    assert "EXTRAS=auto" in builder.instructions_named("ARG")
    assert 'auto) if [ "$TORCH_VARIANT" = cpu ]; then extras=fast;' in installs
    assert 'for extra in $extras; do set -- "$@" --extra "$extra"; done' in installs


def test_the_fast_extra_adds_openvino_to_the_images_export() -> None:
    plain, with_fast = _exported(), _exported(extras=("fast",))
    assert with_fast - plain == {"openvino", "openvino-telemetry"}


@pytest.mark.parametrize(
    ("variant", "extras", "expected"),
    [
        ("cpu", "auto", ["fast"]),
        ("cuda", "auto", []),
        ("cpu", "none", []),
        ("cuda", "fast", ["fast"]),
    ],
)
def test_the_dependency_step_exports_what_the_build_arguments_ask(
    tmp_path: Path, variant: str, extras: str, expected: list[str]
) -> None:
    """The builder's dependency RUN, executed by sh with `uv` replaced by a recorder (and the
    real lock_packages.py): which extras and which packages the export is asked for."""
    (step,) = [
        run
        for run in _dockerfile().stage("builder").instructions_named("RUN")
        if "uv export" in run
    ]
    script = re.sub(r"^(--mount=\S+\s+)+", "", step)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "uv.calls"
    (bin_dir / "uv").write_text(f'#!/bin/sh\necho "$*" >> {record}\n', encoding="utf-8")
    (bin_dir / "python3.11").write_text(
        f'#!/bin/sh\nexec {sys.executable} "$@"\n', encoding="utf-8"
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "TORCH_VARIANT": variant,
        "TORCH_INDEX": "https://download.pytorch.org/whl/cpu",
        "EXTRAS": extras,
    }
    subprocess.run(["sh", "-c", script], cwd=ROOT, env=env, check=True, timeout=60)
    calls = record.read_text(encoding="utf-8").splitlines()
    (export,) = [call.split() for call in calls if call.startswith("export ")]
    assert [export[i + 1] for i, word in enumerate(export) if word == "--extra"] == expected
    skipped = {export[i + 1] for i, word in enumerate(export) if word == "--no-emit-package"}
    assert ("torch" in skipped) == (variant == "cpu")


def test_dockerfile_serves_as_a_non_root_user_on_all_interfaces() -> None:
    final = _dockerfile().final
    (user,) = final.instructions_named("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, "numeric, so that runAsNonRoot can check it"
    for deployment in _objects("Deployment"):
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)
    assert final.env["EMB_PROVIDER_HOST"] == "0.0.0.0"
    (volume,) = final.instructions_named("VOLUME")
    volumes = json.loads(volume)
    assert volumes == ["/var/cache/emb-model-provider", "/var/lib/emb-model-provider"]
    assert final.env["EMB_PROVIDER_CACHE_DIR"].startswith(volumes[0] + "/")
    assert final.env["EMB_PROVIDER_DATA_DIR"] == volumes[1]
    # With a read-only root file system in Kubernetes, every folder the server writes is a
    # volume: the image's volumes and /tmp.
    for deployment in _objects("Deployment"):
        (container,) = _containers(deployment)
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        mounted = {mount["mountPath"] for mount in container["volumeMounts"]}
        assert {*volumes, "/tmp"} <= mounted, deployment["metadata"]["name"]
    (entrypoint,) = final.instructions_named("ENTRYPOINT")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert json.loads(entrypoint) == ["emb-model-provider"]
    assert "emb-model-provider" in scripts["scripts"]
    assert json.loads(final.instructions_named("CMD")[0]) == ["serve"]


def _healthcheck_command() -> list[str]:
    (healthcheck,) = _dockerfile().final.instructions_named("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert "--start-period=" in options
    argv: list[str] = json.loads(command)  # exec form: no shell needed in the image
    return argv


def test_dockerfile_healthcheck_passes_on_a_live_server_and_fails_without_one(
    served: Served,
) -> None:
    """The HEALTHCHECK command itself, run against the live server (python: the image's)."""
    argv = _healthcheck_command()
    assert argv[0] == "python"
    argv[0] = sys.executable
    port = served.url.rsplit(":", 1)[1]
    env = {**os.environ, "EMB_PROVIDER_PORT": port}
    assert subprocess.run(argv, env=env, timeout=30, check=False).returncode == 0
    env["EMB_PROVIDER_PORT"] = str(free_port())
    failed = subprocess.run(argv, env=env, timeout=30, check=False, capture_output=True)
    assert failed.returncode != 0


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    """.dockerignore keeps out everything but an allow-list: each COPY source must be on it."""
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    ]
    for stage in _dockerfile().stages:
        for copy_args in stage.instructions_named("COPY"):
            if copy_args.startswith("--from="):
                continue
            *sources, _ = copy_args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
    assert ".venv" not in allowed


def _lock_packages() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "lock_packages", ROOT / "deploy" / "docker" / "lock_packages.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exported(*skip: str, extras: tuple[str, ...] = ()) -> set[str]:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    command = [uv, "export", "--frozen", "--no-dev", "--no-emit-project", "--no-hashes"]
    for name in skip:
        command += ["--no-emit-package", name]
    for extra in extras:
        command += ["--extra", extra]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return {
        line.split("==")[0].lower()
        for line in result.stdout.splitlines()
        if "==" in line and not line.startswith((" ", "#"))
    }


def test_cpu_image_drops_exactly_torchs_cuda_packages_from_the_lock() -> None:
    """What the CPU build skips of uv.lock: torch, torchvision and only what torch's CUDA needs."""
    module = _lock_packages()
    lock = module.load(ROOT / "uv.lock")
    cuda_only: set[str] = module.cuda_only(lock)
    every = _exported()
    cpu = _exported("torch", "torchvision", *sorted(cuda_only))
    assert every - cpu == cuda_only | {"torch", "torchvision"}
    assert all(re.match(r"^(nvidia-|cuda-|triton$)", name) for name in cuda_only), cuda_only
    assert not any(name.startswith(("nvidia-", "cuda-")) or name == "triton" for name in cpu)
    # What CPU torch itself needs stays (its metadata lists no CUDA package).
    assert {"filelock", "fsspec", "jinja2", "networkx", "sympy", "typing-extensions"} <= cpu
    import torch

    assert (
        module.load(ROOT / "uv.lock")["torch"]["package"]["version"]
        == (torch.__version__.split("+")[0])
    )


# -- docker compose ----------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return compose


def _compose_environment_names() -> set[str]:
    return {name for service in _compose()["services"].values() for name in service["environment"]}


def test_compose_has_a_cpu_service_and_a_gpu_profile_with_a_device_reservation() -> None:
    services = _compose()["services"]
    assert set(services) == {"cpu", "gpu"}
    cpu, gpu = services["cpu"], services["gpu"]
    assert "profiles" not in cpu, "`docker compose up` must start the CPU service"
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in cpu
    assert cpu["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert gpu["build"]["args"]["TORCH_VARIANT"] == "cuda"
    assert gpu["environment"]["EMB_PROVIDER_DEVICE"] == "cuda"


def test_compose_wires_env_file_cache_volume_and_port() -> None:
    compose = _compose()
    final = _dockerfile().final
    volumes = json.loads(final.instructions_named("VOLUME")[0])
    exposed = final.instructions_named("EXPOSE")[0]
    for name, service in compose["services"].items():
        assert service["env_file"] == [{"path": ".env", "required": False}], name
        # .env.example binds 127.0.0.1, which inside a container nobody can reach.
        assert service["environment"]["EMB_PROVIDER_HOST"] == "0.0.0.0"
        assert service["environment"]["EMB_PROVIDER_PORT"] == exposed
        mounts = dict(reversed(mount.split(":")) for mount in service["volumes"])
        assert set(mounts) == set(volumes), name
        assert set(mounts.values()) <= set(compose["volumes"]), name
        (port,) = service["ports"]
        assert port.rsplit(":", 1)[1] == exposed
        assert port.startswith("${"), "the published address must be configurable"


# -- systemd and docs --------------------------------------------------------------------------


def _systemd_environment() -> set[str]:
    names = set()
    for line in SYSTEMD_UNIT.read_text(encoding="utf-8").splitlines():
        if line.startswith("Environment="):
            names.add(line.removeprefix("Environment=").split("=")[0])
    return names


def _shutdown_grace() -> int:
    """Seconds uvicorn gives in-flight requests after SIGTERM, as ``serve`` runs it."""
    from emb_model_provider.cli import uvicorn_options

    grace: int = uvicorn_options(Settings())["timeout_graceful_shutdown"]
    assert grace == Settings.model_fields["shutdown_timeout_s"].default
    assert uvicorn_options(Settings(shutdown_timeout_s=7))["timeout_graceful_shutdown"] == 7
    return grace


def test_every_orchestrator_waits_longer_than_the_graceful_shutdown() -> None:
    """Kubernetes, compose and systemd must not kill the server while it finishes the requests
    in flight: each one's grace period outlasts the server's default shutdown timeout."""
    grace = _shutdown_grace()
    for deployment in _objects("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > grace, deployment["metadata"]["name"]
    period = _compose()["x-server"]["stop_grace_period"]
    assert period.endswith("s") and int(period.removesuffix("s")) > grace


def test_systemd_unit_runs_the_console_script_and_outlasts_graceful_shutdown() -> None:
    text = SYSTEMD_UNIT.read_text(encoding="utf-8")
    sections = set(re.findall(r"^\[(\w+)\]$", text, flags=re.M))
    assert sections == {"Unit", "Service", "Install"}
    values = dict(re.findall(r"^(\w+)=(.*)$", text, flags=re.M))
    assert values["ExecStart"].endswith("/bin/emb-model-provider serve")
    assert values["EnvironmentFile"].startswith("-")
    # uvicorn gives in-flight requests EMB_PROVIDER_SHUTDOWN_TIMEOUT_S after SIGTERM.
    assert int(values["TimeoutStopSec"]) > _shutdown_grace()
    # A bad setting exits 2 (cli._fail): restarting would loop on it.
    assert values["RestartPreventExitStatus"] == "2"


def test_deployment_docs_name_files_that_exist() -> None:
    for doc in (ROOT / "docs" / "deployment.md", ROOT / "docs" / "scaling.md"):
        text = doc.read_text(encoding="utf-8")
        named = set(re.findall(r"\b(deploy/[\w./-]+\w|docker-compose\.yml|Dockerfile)\b", text))
        assert named, doc
        for path in named:
            assert (ROOT / path).exists(), f"{doc.name} names {path}, which does not exist"
