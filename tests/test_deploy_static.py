"""Static checks of the deployment files: Dockerfile, compose stack, Kubernetes manifests.

No container engine or cluster is needed: the files are checked with the tools their ecosystems use
offline (hadolint, the compose-spec schema, docker-compose v1, kubectl kustomize + kubernetes-validate)
and against the service's own settings. `docker/ci-tools.sh` installs the tools in CI; a missing tool
skips its test with a message naming it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import skip_or_fail

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
OVERLAYS = ("cpu", "gpu")


def tool(name: str) -> str:
    """A CLI from the project venv or PATH, or skip naming what installs it."""
    venv_bin = Path(sys.executable).parent / name
    found = str(venv_bin) if venv_bin.exists() else shutil.which(name)
    if not found:
        skip_or_fail(f"{name} not installed (docker/ci-tools.sh installs it)")
    return found


def run(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def kustomize(overlay: str) -> list[dict]:
    if not shutil.which("kubectl"):
        skip_or_fail("kubectl not installed (needed for `kubectl kustomize`)")
    out = run("kubectl", "kustomize", str(K8S / "overlays" / overlay))
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


# ---------------------------------------------------------------- Dockerfile


def test_hadolint_clean() -> None:
    out = run(tool("hadolint"), "--no-color", "Dockerfile")
    assert out.returncode == 0, out.stdout + out.stderr


def dockerfile_stages() -> list[list[str]]:
    """Instructions (continuations joined, comments dropped) grouped by stage."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[str]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages[1:]


def test_dockerfile_runtime_stage() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 3, "multi-stage: variant bases, builder, runtime"
    final = stages[-1]
    assert final[0].endswith("AS runtime")
    user = [i.split()[1] for i in final if i.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("0", "root"), "the runtime stage must not run as root"
    (health,) = [i for i in final if i.startswith("HEALTHCHECK ")]
    assert "/healthz" in health
    for instr in ("CMD", "ENTRYPOINT"):
        (line,) = [i for i in final if i.startswith(instr + " ")]
        assert isinstance(json.loads(line[len(instr) :]), list), f"{instr} must be exec form"
    copies = [i for i in final if i.startswith("COPY ")]
    assert copies == ["COPY --from=builder /opt/venv /opt/venv"], "runtime gets the venv only"
    # both variants exist and the pick is a build argument
    froms = [s[0] for s in stages]
    assert any(f.endswith("AS base-cpu") for f in froms) and any(f.endswith("AS base-cuda") for f in froms)
    assert "FROM base-${VARIANT} AS base" in froms


def test_image_runs_passes_as_make_serve_with_graphs_on_the_cache_volume(monkeypatch) -> None:
    """The image's default backend is ``make serve``'s, and its compiled-graph cache lies on the /cache volume."""
    from service.settings import Settings

    final = dockerfile_stages()[-1]
    env = dict(pair.split("=", 1) for i in final if i.startswith("ENV ") for pair in shlex.split(i[len("ENV "):]))
    serve = re.search(r"^BACKEND_ARGS \?= --backend (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert serve and env["EVIT_BACKEND"] == serve.group(1) == "auto"
    (volume,) = json.loads(next(i for i in final if i.startswith("VOLUME "))[len("VOLUME "):])
    for name in [v for v in os.environ if v.startswith("EVIT_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith(("EVIT_", "XDG_")):
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.backend == "auto" and settings.graph_cache_dir.is_relative_to(volume)


def test_dockerignore_sends_only_build_inputs() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert patterns[0] == "*", "ignore everything, then re-include the build inputs"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for stage in dockerfile_stages():
        for instr in stage:
            if instr.startswith("COPY ") and "--from=" not in instr:
                copied.update(instr.split()[1:-1])
    assert copied, "the Dockerfile copies nothing from the context?"
    assert copied <= included, f"COPY sources excluded by .dockerignore: {copied - included}"
    for weights in ("*.safetensors", "*.pth"):
        assert f"**/{weights}" in patterns, f"weights ({weights}) must never reach the build context"


# ---------------------------------------------------------------- compose


def test_compose_matches_compose_spec_schema() -> None:
    out = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "compose.yaml", cwd=DOCKER)
    assert out.returncode == 0, out.stdout + out.stderr


def compose_config(*args: str) -> dict:
    out = run(tool("docker-compose"), "-f", "compose.yaml", *args, "config", cwd=DOCKER)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_compose_config_renders() -> None:
    out = run(tool("docker-compose"), "-f", "compose.yaml", "config", "-q", cwd=DOCKER)
    assert out.returncode == 0, out.stderr
    services = compose_config("--profile", "gpu")["services"]
    assert set(services) == {"evit", "evit-gpu", "prometheus", "grafana"}
    profiles = {name: svc.get("profiles", []) for name, svc in services.items()}
    assert profiles == {"evit": [], "evit-gpu": ["gpu"], "prometheus": [], "grafana": []}
    (gpu,) = services["evit-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["evit-gpu"]["environment"]["EVIT_DEVICE"].startswith("cuda")
    assert services["evit-gpu"]["build"]["args"]["VARIANT"] == "cuda"
    for name, svc in services.items():
        for p in svc.get("ports", []):
            host_ip = p["host_ip"] if isinstance(p, dict) else p.split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes beyond loopback: {p}"
    # every bind mount of the stack points at a file or folder of this repo (or the weights dir)
    for name in ("prometheus", "grafana"):
        for vol in services[name]["volumes"]:
            src = vol["source"] if isinstance(vol, dict) else vol.split(":")[0]
            if src.startswith("/"):
                assert Path(src).exists(), f"{name} mounts missing {src}"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DOCKER / "grafana" / "dashboards" / Path(home).name).is_file()


def test_deploy_settings_are_service_settings() -> None:
    """Every EVIT_* variable the deployment files set is a setting the service reads."""
    from service import settings

    fields = set(settings.Settings.model_fields)
    files = [DOCKER / "compose.yaml", ROOT / "Dockerfile", *K8S.rglob("*.yaml")]
    used = {m for f in files for m in re.findall(r"\b(EVIT_[A-Z0-9_]+)\b", f.read_text())}
    unknown = {v for v in used if v[len("EVIT_") :].lower() not in fields}  # (host-side names have no EVIT_)
    assert used and not unknown, f"not service settings: {sorted(unknown)}"


def test_probe_paths_are_service_routes() -> None:
    """Every HTTP path a probe or healthcheck of the deployment files calls is a route of the service."""
    from service import app, settings

    # the routes of the app as it is built (no model is loaded); /metrics is prometheus_client's ASGI app
    served = app.create_app(settings.Settings())
    routes = set(served.openapi()["paths"]) | {getattr(r, "path", "") for r in served.routes}
    texts = [f.read_text() for f in K8S.rglob("*.yaml")]

    def http_gets(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            if "httpGet" in node:
                yield node["httpGet"]["path"]
            for v in node.values():
                yield from http_gets(v)
        elif isinstance(node, list):
            for v in node:
                yield from http_gets(v)

    paths = {p for t in texts for doc in yaml.safe_load_all(t) for p in http_gets(doc)}
    paths |= {p for t in texts for p in re.findall(r"prometheus\.io/path: (/[\w/]*)", t)}
    paths |= set(re.findall(r"http://127\.0\.0\.1:\S*?(/\w+)'", (ROOT / "Dockerfile").read_text()))
    assert {"/healthz", "/readyz", "/metrics"} <= paths
    assert paths <= routes, f"probed but not served: {sorted(paths - routes)}"


# ---------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_overlay_validates_strict(overlay: str, tmp_path: Path) -> None:
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(yaml.safe_dump_all(kustomize(overlay)))
    out = run(tool("kubernetes-validate"), "--strict", "--quiet", str(rendered))
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_overlay_wiring(overlay: str) -> None:
    docs = kustomize(overlay)
    dep, svc, hpa, pdb, cm = (by_kind(docs, k) for k in
                              ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"))
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    for selector in (dep["spec"]["selector"]["matchLabels"], svc["spec"]["selector"],
                     pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items(), selector
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["envFrom"][0]["configMapRef"]["name"] == cm["metadata"]["name"], "hashed ConfigMap name wired"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port = int(cm["data"]["EVIT_PORT"])
    assert c["ports"][0]["containerPort"] == port and c["ports"][0]["name"] == "http"
    # drain fits in the grace period: preStop sleep + drain timeout < terminationGracePeriodSeconds
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(cm["data"]["EVIT_DRAIN_TIMEOUT_S"])
    assert sleep + drain < pod["terminationGracePeriodSeconds"]
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    kinds = {m["type"] for m in hpa["spec"]["metrics"]}
    assert kinds == {"Pods", "Resource"}, "queue depth per pod with the CPU fallback"
    gpus = c["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpus == 1) == (overlay == "gpu")
    assert c["image"] == f"evit-serve:{'cuda' if overlay == 'gpu' else 'cpu'}"
    assert cm["data"]["EVIT_DEVICE"] == ("cuda:0" if overlay == "gpu" else "cpu")


def adapter_rules() -> list[dict]:
    (cm,) = list(yaml.safe_load_all((K8S / "prometheus-adapter" / "adapter-config.yaml").read_text()))
    return yaml.safe_load(cm["data"]["config.yaml"])["rules"]


def test_hpa_metric_is_served_by_the_adapter_rule() -> None:
    hpa = yaml.safe_load((K8S / "base" / "hpa.yaml").read_text())
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    served = {r["name"]["as"]: r for r in adapter_rules()}
    rule = served[pods["metric"]["name"]]
    assert re.fullmatch(rule["name"]["matches"], "evit_queue_depth")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    for token in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert token in rule["metricsQuery"]


def test_adapter_configmap_and_kserve_podspec_validate(tmp_path: Path) -> None:
    validate = tool("kubernetes-validate")
    out = run(validate, "--strict", "--quiet", str(K8S / "prometheus-adapter" / "adapter-config.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr
    # KServe's PredictorSpec inlines a PodSpec: validate that part strictly as a Pod.
    isvc = yaml.safe_load((K8S / "kserve" / "inferenceservice.yaml").read_text())
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    kserve_only = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "containerConcurrency",
                   "timeout", "canaryTrafficPercent", "logger", "batcher"}
    spec = {k: v for k, v in isvc["spec"]["predictor"].items() if k not in kserve_only}
    pod = tmp_path / "pod.yaml"
    pod.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": spec}))
    out = run(validate, "--strict", "--quiet", str(pod))
    assert out.returncode == 0, out.stdout + out.stderr
    (c,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert int(env["EVIT_PORT"]) == c["ports"][0]["containerPort"] == c["readinessProbe"]["httpGet"]["port"]


def test_kserve_serves_the_model_under_the_inferenceservice_name() -> None:
    """Kubernetes' $(VAR) expansion of the container env, with the label KServe sets on predictor pods, gives
    EVIT_MODEL a NAME that is the InferenceService's name; a startup probe covers model loading."""
    isvc = yaml.safe_load((K8S / "kserve" / "inferenceservice.yaml").read_text())
    (c,) = isvc["spec"]["predictor"]["containers"]
    labels = {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    env: dict[str, str] = {}
    for e in c["env"]:  # in order: a $(VAR) refers to a variable defined above it
        if "valueFrom" in e:
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            env[e["name"]] = labels[re.fullmatch(r"metadata\.labels\['(.+)'\]", path).group(1)]
        else:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], e["value"])
    served = Settings(model=env["EVIT_MODEL"], random_weights=True).model_specs()
    assert [s.name for s in served] == [isvc["metadata"]["name"]] and served[0].arch == "vit_tiny_patch16_224"
    startup, liveness = c["startupProbe"], c["livenessProbe"]
    assert startup["httpGet"] == liveness["httpGet"] and startup["periodSeconds"] * startup["failureThreshold"] >= 60
