"""Configuration: the shipped files load; every mistake names its key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from guardproxy.config import ConfigError, Settings, load_settings, load_settings_file, with_overrides
from guardproxy.policy import Action, Policy

CONFIG = Path(__file__).resolve().parent.parent / "config"


def test_default_file_is_the_defaults() -> None:
    s = load_settings_file(CONFIG / "guardproxy.yaml")
    assert s == Settings()  # the file documents the defaults; they must not drift apart


@pytest.mark.parametrize("name", ["strict", "loose", "pii-redact", "audit-only"])
def test_examples_load(name: str) -> None:
    s = load_settings_file(CONFIG / "examples" / f"{name}.yaml")
    assert isinstance(s.policy, Policy)


def test_example_semantics() -> None:
    strict = load_settings_file(CONFIG / "examples" / "strict.yaml").policy
    assert strict.mode == "strict" and strict.debounce and strict.prompt_check == "before"
    pii = load_settings_file(CONFIG / "examples" / "pii-redact.yaml").policy
    assert pii.unsafe.categories["PII"] == Action.REDACT and pii.unsafe.action == Action.CUT
    audit = load_settings_file(CONFIG / "examples" / "audit-only.yaml").policy
    assert {audit.unsafe.action, audit.controversial.action, audit.prompt_unsafe.action} == {Action.FLAG}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("servr: {}", r"servr: unknown key"),
        ("server: {prot: 1}", r"server\.prot: unknown key"),
        ("server: {port: eighty}", r"server\.port: expected int"),
        ("server: {port: true}", r"server\.port: expected an integer"),
        ("upstream: []", r"upstream: expected a mapping"),
        ("guard: {engine: {max_streams: 0}}", r"guard\.engine: engine\.max_streams must be >= 1"),
        ("guard: {engine: {max_stream: 3}}", r"guard\.engine\.max_stream: unknown key"),
        ("guard: {dtype: float8}", r"guard\.dtype: expected float32"),
        (
            "policy: {response: {unsafe: {action: block}}}",
            r"policy\.response\.unsafe\.action: unknown action",
        ),
        ("policy: {prompt: {unsafe: {action: redact}}}", r"policy\.prompt\.unsafe\.action: a prompt takes"),
        (
            "policy: {response: {unsafe: {categories: {PII: nuke}}}}",
            r"policy\.response\.unsafe\.categories\.PII: unknown action",
        ),
        ("policy: {debounce: 1}", r"policy\.debounce: expected bool"),
        ("policy: {thresholds: {unsafe: 2}}", r"policy: policy\.unsafe_threshold must be in"),
        ("policy: {thresholds: {unsafe_p: 0.5}}", r"policy\.thresholds\.unsafe_p: unknown key"),
        ("policy: {mode: paranoid}", r"policy: policy\.mode must be strict or loose"),
        ("policies: {a: {holdback: 1}}", r"policies\.a\.holdback: unknown key"),
        ("policy_routes: [{policy: nope}]", r"policy_routes\[0\]\.policy: no policy named 'nope'"),
        (
            "policy_routes: [{policy: a, modle: x}]\npolicies: {a: {}}",
            r"policy_routes\[0\]\.modle: unknown key",
        ),
        (  # a route pattern no route matches would never apply its policy
            "policy_routes: [{policy: a, route: /chat/completions}]\npolicies: {a: {}}",
            r"policy_routes\[0\]: matches none of the routes a policy applies to: /v1/chat/completions, ",
        ),
    ],
)
def test_mistakes_name_the_key_path(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(yaml.safe_load(text))


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: [unclosed")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_settings_file(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings_file(tmp_path / "missing.yaml")
    bad.write_text("policy: {mode: strictly}")
    with pytest.raises(ConfigError, match=r"bad\.yaml: policy: policy\.mode"):
        load_settings_file(bad)


def test_policies_per_route_and_model() -> None:
    s = load_settings(
        yaml.safe_load(
            """
policy: {holdback_tokens: 3}
policies:
  strict: {mode: strict}
  legacy: {response: {unsafe: {action: redact}}}
policy_routes:
  - {route: /v1/completions, policy: legacy}
  - {model: "gpt-4o*", policy: strict}
"""
        )
    )
    assert s.policy_for("/v1/chat/completions", "llama") is s.policy
    assert s.policy_for("/v1/chat/completions", "gpt-4o-mini").mode == "strict"
    assert s.policy_for("/v1/completions", "gpt-4o-mini").unsafe.action == Action.REDACT
    # Named policies start from the default policy's values.
    assert s.policies["strict"].holdback_tokens == 3 and s.policies["strict"].name == "strict"


def test_flags_override_the_file() -> None:
    s = with_overrides(
        Settings(), upstream_base_url="http://u:1/v1", guard_model="/m", server_port=9, server_host=None
    )
    assert (s.upstream.base_url, s.guard.model, s.server.port, s.server.host) == (
        "http://u:1/v1",
        "/m",
        9,
        "127.0.0.1",
    )


def test_readme_reference_is_generated_from_the_documented_file() -> None:
    from guardproxy.config_reference import markdown

    readme = (CONFIG.parent / "README.md").read_text()
    block = readme.split("<!-- config-reference:start -->\n", 1)[1].split(
        "\n<!-- config-reference:end -->", 1
    )[0]
    assert block == markdown((CONFIG / "guardproxy.yaml").read_text())


def test_documented_file_names_every_accepted_key() -> None:
    from dataclasses import fields

    from guardproxy.config import (
        _POLICY_SCALARS,
        AuditSettings,
        AuthSettings,
        GuardSettings,
        LoggingSettings,
        ServerSettings,
        UpstreamSettings,
    )
    from guardproxy.config_reference import rows
    from guardproxy.guard.limits import EngineLimits

    documented = {path for path, _, _ in rows((CONFIG / "guardproxy.yaml").read_text())}
    accepted = set()
    for prefix, cls in (
        ("server", ServerSettings),
        ("upstream", UpstreamSettings),
        ("guard", GuardSettings),
        ("guard.engine", EngineLimits),
        ("logging", LoggingSettings),
        ("audit", AuditSettings),
        ("auth", AuthSettings),
    ):
        accepted |= {f"{prefix}.{f.name}" for f in fields(cls) if f.name != "engine"}
    accepted |= {f"policy.{k}" for k in _POLICY_SCALARS}
    accepted |= {f"policy.thresholds.{t}" for t in ("unsafe", "controversial")}
    accepted |= {
        f"policy.{side}.{tier}.{k}"
        for side in ("response", "prompt")
        for tier in ("unsafe", "controversial")
        for k in ("action", "categories")
    }
    accepted |= {"policies", "policy_routes"}
    assert accepted - documented == set()
