"""The deploy recipes, checked as far as this machine allows (no container engine runs here):
the Dockerfile by hadolint, the compose file against the Compose Specification's schema,
the Kubernetes manifests against Kubernetes' own schemas (strict), and what each must
hold for the bridge to work (host networking, the port range, drain before stop)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def _run(*cmd) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True)


def test_the_dockerfile_passes_hadolint_and_copies_every_package_the_server_imports():
    result = _run(BIN / "hadolint", DEPLOY / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr
    text = (DEPLOY / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\w+)/ ", text, re.M))
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench", "harness"}
    assert packages <= copied, f"not in the image: {sorted(packages - copied)}"
    assert "client" in copied and "requirements.txt" in text


def test_the_compose_file_is_valid_compose_with_two_nodes_redis_and_coturn(tmp_path):
    path = DEPLOY / "docker-compose.yml"
    result = _run(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", path)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(path.read_text().replace("network_mode: host", "network_mod: host"))
    assert _run(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", broken).returncode != 0
    doc = yaml.safe_load(path.read_text())
    services = doc["services"]
    nodes = [s for s in services.values() if "REDIS_URL" in (s.get("environment") or {})]
    assert len(nodes) == 2 and {"redis", "coturn"} <= set(services)
    for s in services.values():
        assert s["network_mode"] == "host"  # media needs the host's addresses and ports
    ports = [n["environment"]["PORT"] for n in nodes]
    ranges = [n["environment"]["RTC_PORT_RANGE"] for n in nodes]
    assert len(set(ports)) == 2 and len(set(ranges)) == 2  # one host: nothing shared
    assert all(n["environment"]["NODE_URL"].endswith(":" + n["environment"]["PORT"]) for n in nodes)


MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_kubernetes_manifest_validates_strictly(path):
    result = _run(BIN / "kubernetes-validate", "--strict", "--quiet", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_manifest_is_caught(tmp_path):
    broken = tmp_path / "bridge.yaml"
    broken.write_text((DEPLOY / "k8s" / "bridge.yaml").read_text().replace("hostNetwork:", "hostNetwrk:"))
    assert _run(BIN / "kubernetes-validate", "--strict", "--quiet", broken).returncode != 0


def test_the_bridge_statefulset_has_host_networking_readiness_drain_and_the_port_range():
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "bridge.yaml").read_text()))
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert "kill -TERM 1" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert pod["terminationGracePeriodSeconds"] > float(config["DRAIN_SECONDS"])
    assert re.fullmatch(r"\d+-\d+", config["RTC_PORT_RANGE"]) and config["REDIS_URL"].startswith("redis://")
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_URL"]["value"] == "http://$(POD_IP):8080"
    # every setting the manifests use exists
    import settings

    known = {e for o in settings.OPTIONS for e in o.env}
    assert set(config) <= known and {"NODE_ID", "NODE_URL"} <= known
