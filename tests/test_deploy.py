"""Deployment files: every Kubernetes document validates against the Kubernetes schemas (no cluster
runs here), the Helm chart renders to valid documents, and the configuration inside each ConfigMap is
one guardproxy accepts.

The chart is rendered by the small renderer below, not by helm (no helm binary installs from the
registries this project reaches): it implements exactly the template subset the chart uses
(value lookups, ``quote``, ``toYaml | nindent N``, ``.Files.Get``, ``if``/``end``, trim markers) and fails on
anything else. The ServiceMonitor is a Prometheus Operator resource, outside the Kubernetes schemas: it is
checked against the Service it scrapes instead.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from guardproxy.config import load_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
CHART = DEPLOY / "helm" / "guardproxy"
K8S_VERSION = "1.33"
_ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)


def _lookup(path: str, ctx: dict[str, Any]) -> Any:
    value: Any = ctx
    for part in path.lstrip(".").split("."):
        value = value[part]
    return value


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _evaluate(expr: str, ctx: dict[str, Any]) -> str:
    stages = [s.strip() for s in expr.split("|")]
    head = stages[0]
    if head.startswith(".Files.Get "):
        out = (CHART / json.loads(head.split(maxsplit=1)[1])).read_text().rstrip("\n")
    elif head.startswith("toYaml "):
        out = yaml.safe_dump(_lookup(head.split()[1], ctx), default_flow_style=False, sort_keys=False).rstrip(
            "\n"
        )
    elif head.startswith("."):
        out = _scalar(_lookup(head, ctx))
    else:
        raise AssertionError(f"template action not supported by the test renderer: {expr!r}")
    for stage in stages[1:]:
        name, *args = stage.split()
        if name == "quote":
            out = '"' + out.replace("\\", "\\\\").replace('"', '\\"') + '"'
        elif name == "nindent":
            pad = " " * int(args[0])
            out = "\n" + "\n".join(pad + line for line in out.split("\n"))
        else:
            raise AssertionError(f"template function not supported by the test renderer: {name}")
    return out


def render(template: str, values: dict[str, Any], release: str = "guard") -> str:
    ctx = {"Values": values, "Release": {"Name": release}}
    pieces: list[str | tuple[str, bool, bool]] = []
    pos = 0
    for m in _ACTION.finditer(template):
        pieces.append(template[pos : m.start()])
        pieces.append((m.group(2), m.group(1) == "-", m.group(3) == "-"))
        pos = m.end()
    pieces.append(template[pos:])
    # Trim markers eat the whitespace (newlines included) on their side.
    for i, p in enumerate(pieces):
        if isinstance(p, tuple):
            if p[1] and isinstance(pieces[i - 1], str):
                pieces[i - 1] = str(pieces[i - 1]).rstrip()
            if p[2] and isinstance(pieces[i + 1], str):
                pieces[i + 1] = str(pieces[i + 1]).lstrip()
    out: list[str] = []
    active: list[bool] = []
    for p in pieces:
        if isinstance(p, str):
            if all(active):
                out.append(p)
            continue
        expr = p[0]
        if expr.startswith("if "):
            active.append(bool(_lookup(expr[3:].strip(), ctx)) and all(active))
        elif expr == "end":
            active.pop()
        elif all(active):
            out.append(_evaluate(expr, ctx))
    assert not active, "unbalanced if/end"
    return "".join(out)


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def validate(doc: dict[str, Any]) -> None:
    if doc["kind"] == "ServiceMonitor":
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        return  # no schema here; test_service_monitor_scrapes_the_service checks what it selects
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def check_config_map(doc: dict[str, Any]) -> None:
    settings = load_settings(yaml.safe_load(doc["data"]["guardproxy.yaml"]))
    assert settings.server.host == "0.0.0.0" and settings.server.port == 8080


def test_plain_manifests_validate() -> None:
    kinds = []
    for file in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in documents(file.read_text()):
            validate(doc)
            kinds.append(doc["kind"])
            if doc["kind"] == "ConfigMap":
                check_config_map(doc)
    assert sorted(kinds) == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Service"]


def chart(values: dict[str, Any]) -> list[dict[str, Any]]:
    docs = []
    for file in sorted((CHART / "templates").glob("*.yaml")):
        docs += documents(render(file.read_text(), values))
    return docs


DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())


@pytest.mark.parametrize("variant", ["defaults", "autoscaled-proxy-only", "four-workers"])
def test_helm_chart_renders_valid_documents(variant: str) -> None:
    values = copy.deepcopy(DEFAULTS)
    if variant == "four-workers":
        values["workers"] = 4
        values["resources"]["requests"]["cpu"] = "5"
    elif variant != "defaults":
        values["autoscaling"]["enabled"] = True
        values["llm"]["enabled"] = False
        values["upstream"]["baseUrl"] = "http://llm.internal:8000/v1"
        values["policy"] = {
            "mode": "strict",
            "response": {"unsafe": {"action": "cut", "categories": {"PII": "redact"}}},
        }
    docs = chart(values)
    for doc in docs:
        validate(doc)
    kinds = sorted(d["kind"] for d in docs)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    containers = [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]]
    config = next(d for d in docs if d["kind"] == "ConfigMap" and "guardproxy.yaml" in d["data"])
    check_config_map(config)
    settings = load_settings(yaml.safe_load(config["data"]["guardproxy.yaml"]))
    assert settings.server.workers == values["workers"]
    proxy = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "guardproxy")
    assert proxy["resources"]["requests"]["cpu"] == values["resources"]["requests"]["cpu"]
    if variant != "autoscaled-proxy-only":
        assert kinds == ["ConfigMap", "Deployment", "Service"] and containers == ["llm", "guardproxy"]
    else:
        assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Service"]
        assert containers == ["guardproxy"]
        assert (
            settings.upstream.base_url == "http://llm.internal:8000/v1" and settings.policy.mode == "strict"
        )


def test_an_invalid_document_is_caught() -> None:
    # The validator is strict: a typo in a field is an error, not ignored.
    bad = documents((DEPLOY / "kubernetes" / "service.yaml").read_text())[0]
    bad["spec"]["prots"] = bad["spec"].pop("ports")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)


def test_grafana_dashboard_ships_in_the_chart_for_grafanas_sidecar() -> None:
    canonical = DEPLOY / "grafana" / "guardproxy.json"
    # Helm reads files inside the chart only: its copy must be the same file.
    assert (CHART / "dashboards" / "guardproxy.json").read_bytes() == canonical.read_bytes()
    assert all(d["metadata"]["name"] != "guard-dashboard" for d in chart(copy.deepcopy(DEFAULTS)))  # off
    values = copy.deepcopy(DEFAULTS)
    values["grafanaDashboard"]["enabled"] = True
    docs = chart(values)
    dashboard = next(d for d in docs if d["metadata"]["name"] == "guard-dashboard")
    validate(dashboard)
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["guardproxy.json"]) == json.loads(canonical.read_text())


def test_service_monitor_scrapes_the_service() -> None:
    assert not any(d["kind"] == "ServiceMonitor" for d in chart(copy.deepcopy(DEFAULTS)))  # needs the CRDs
    values = copy.deepcopy(DEFAULTS)
    values["serviceMonitor"]["enabled"] = True
    docs = chart(values)
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    service = next(d for d in docs if d["kind"] == "Service")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"  # kube-prometheus-stack's selector
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["interval"] == "30s"
    # The endpoint names a port of the Service, which targets the guardproxy container's named port.
    port = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
    proxy = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "guardproxy")
    assert port["targetPort"] in {p["name"] for p in proxy["ports"]}


def test_grafana_dashboard_is_well_formed() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "guardproxy.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for t in p.get("targets", []):
            # Every query reads the chosen data source and the chosen instances.
            assert t["datasource"]["uid"] == "${datasource}" and 'instance=~"$instance"' in t["expr"]
    # Panels do not overlap.
    cells = set()
    for p in panels:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))
