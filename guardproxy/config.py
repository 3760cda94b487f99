"""YAML -> typed, validated settings. Every error names the key path (``policy.response.unsafe.action``).

Unknown keys are errors, not ignored: a typo in a guardrail's configuration must not silently leave
the default in force. The file's layout is documented key by key in ``config/guardproxy.yaml``.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import yaml

from guardproxy.apis.registry import POLICY_ROUTES
from guardproxy.guard.checkpoint import DEFAULT_GUARD_MODEL
from guardproxy.guard.limits import EngineLimits
from guardproxy.policy import Action, Policy, TierRule


class ConfigError(ValueError):
    """A configuration that cannot be used; the message starts with the key path."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 8 * 1024 * 1024
    max_choices: int = 8  # the largest `n` accepted: each choice is a guard stream
    shutdown_grace_s: float = 30.0
    reload_interval_s: float = 2.0  # how often the config file is checked for changes; 0: SIGHUP only
    response_store_entries: int = 10000  # Responses API answers kept for previous_response_id
    response_store_age_s: float = 3600.0  # and for how long
    workers: int = 1  # proxy processes sharing one guard engine process; 1: everything in one process

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= 64:
            raise ValueError(f"workers must be between 1 and 64, got {self.workers}")


@dataclass(frozen=True)
class UpstreamSettings:
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key: str | None = None  # when set, sent upstream instead of the client's Authorization
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 300.0  # between two reads: a stalled stream fails, a long one does not
    retries: int = 2  # before the first byte reaches the client only
    max_connections: int = 256


@dataclass(frozen=True)
class GuardSettings:
    model: str = DEFAULT_GUARD_MODEL
    revision: str | None = None
    device: str | None = None
    dtype: str | None = None  # float32 | bfloat16 | float16; default: bf16 on CUDA, fp32 on CPU
    threads: int | None = None
    process: bool = True  # the model runs in its own process (off the proxy's GIL)
    attention: str = "auto"  # auto | batched | reference (guard/attention.py)
    quantize: str = "none"  # none | int8: the backbone's Linear layers in int8, CPU only (guard/quantize.py)
    kv_memory_fraction: float | None = None  # on a GPU: the KV pool's share of free memory (guard/sizing.py)
    overlap: str = "auto"  # auto | on | off: the next step scheduled while one runs (auto: on a GPU)
    engine: EngineLimits = field(default_factory=EngineLimits)

    def __post_init__(self) -> None:
        # As guard/attention.py and guard/quantize.py name them (a test pins it), spelled out here so
        # reading a configuration needs no torch.
        if self.attention not in ("auto", "batched", "reference"):
            raise ValueError(f"attention must be auto, batched or reference, got {self.attention!r}")
        if self.quantize not in ("none", "int8"):
            raise ValueError(f"quantize must be none or int8, got {self.quantize!r}")
        if self.overlap not in ("auto", "on", "off"):
            raise ValueError(f"overlap must be auto, on or off, got {self.overlap!r}")
        if self.kv_memory_fraction is not None and not 0 < self.kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")


@dataclass(frozen=True)
class LoggingSettings:
    format: str = "text"  # text | json
    level: str = "info"

    def __post_init__(self) -> None:
        if self.format not in ("text", "json"):
            raise ValueError(f"format must be text or json, got {self.format!r}")
        if self.level.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError(f"level must be debug, info, warning or error, got {self.level!r}")


@dataclass(frozen=True)
class UiSettings:
    enabled: bool = True  # the playground and live view at /ui (behind guardproxy's own keys, if any)
    live_records: int = 200  # recent decisions the live view keeps (in memory)

    def __post_init__(self) -> None:
        if self.live_records < 1:
            raise ValueError("live_records must be >= 1")


@dataclass(frozen=True)
class AuditSettings:
    path: str | None = None  # a JSONL file; None: no audit log
    max_bytes: int = 100 * 1024 * 1024  # rotate beyond this size
    backups: int = 5  # rotated files kept
    max_text_chars: int = 4000  # cap on each text field, when a policy asks for text

    def __post_init__(self) -> None:
        if self.max_bytes < 1024 or self.backups < 0 or self.max_text_chars < 0:
            raise ValueError("max_bytes must be >= 1024, backups and max_text_chars >= 0")


def key_hash(api_key: str) -> str:
    """How API keys appear in the configuration: the hex SHA-256 of the key, never the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()


_HEX64 = frozenset("0123456789abcdef")


def _check_hash(value: str) -> None:
    if len(value) != 64 or not set(value) <= _HEX64:
        raise ValueError("must be the 64-hex-digit SHA-256 of a key (guardproxy hash-key KEY)")


@dataclass(frozen=True)
class PolicyRoute:
    policy: str
    route: str | None = None  # a path pattern, e.g. /v1/completions
    model: str | None = None  # a model-name pattern, e.g. gpt-4o*
    api_key_sha256: str | None = None  # the client's API key, hashed

    def __post_init__(self) -> None:
        if self.api_key_sha256 is not None:
            _check_hash(self.api_key_sha256)
        if self.route is not None and not any(fnmatch.fnmatchcase(r, self.route) for r in POLICY_ROUTES):
            # A pattern no route matches would silently never apply its policy (a typo, a missing /v1).
            raise ValueError(f"matches none of the routes a policy applies to: {', '.join(POLICY_ROUTES)}")

    def matches(self, route: str, model: str | None, key: str | None = None) -> bool:
        if self.api_key_sha256 is not None and key != self.api_key_sha256:
            return False
        if self.route is not None and not fnmatch.fnmatchcase(route, self.route):
            return False
        return self.model is None or (model is not None and fnmatch.fnmatchcase(model, self.model))


@dataclass(frozen=True)
class AuthSettings:
    """guardproxy's own API keys. When set, clients must present one of them; the upstream then only
    ever sees ``upstream.api_key`` (or no key), never the client's."""

    api_keys_sha256: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for k in self.api_keys_sha256:
            _check_hash(k)


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    guard: GuardSettings = field(default_factory=GuardSettings)
    policy: Policy = field(default_factory=Policy)
    policies: Mapping[str, Policy] = field(default_factory=dict)
    routes: tuple[PolicyRoute, ...] = ()
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    ui: UiSettings = field(default_factory=UiSettings)

    def policy_for(self, route: str, model: str | None, key: str | None = None) -> Policy:
        """The first matching ``policy_routes`` entry's policy, else the default ``policy``.
        ``key`` is the hashed client key (``key_hash``)."""
        for r in self.routes:
            if r.matches(route, model, key):
                return self.policies[r.policy]
        return self.policy


# -- loading -----------------------------------------------------------------------------------------

T = TypeVar("T")


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
    return value


def _check_keys(data: Mapping[str, Any], allowed: set[str], path: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _typed(value: Any, kind: type, path: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise ConfigError(f"{path}: expected an integer, got a boolean")
    if not isinstance(value, kind):
        raise ConfigError(f"{path}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _dataclass(cls: type[T], data: Any, path: str, kinds: Mapping[str, type], **nested: Any) -> T:
    """A flat dataclass from a mapping: keys checked, types checked, values validated by the class."""
    data = _mapping(data, path)
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    _check_keys(data, names, path)
    values: dict[str, Any] = dict(nested)
    for key, value in data.items():
        if key in nested:
            continue
        if value is None:
            values[key] = None
            continue
        values[key] = _typed(value, kinds[key], f"{path}.{key}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


_SERVER = {
    "host": str,
    "port": int,
    "max_body_bytes": int,
    "max_choices": int,
    "shutdown_grace_s": float,
    "reload_interval_s": float,
    "response_store_entries": int,
    "response_store_age_s": float,
    "workers": int,
}
_UPSTREAM = {
    "base_url": str,
    "api_key": str,
    "connect_timeout_s": float,
    "read_timeout_s": float,
    "retries": int,
    "max_connections": int,
}
_ENGINE = {f.name: type(f.default) for f in fields(EngineLimits)}  # int, float or bool, by its default
_GUARD = {
    "model": str,
    "revision": str,
    "device": str,
    "dtype": str,
    "threads": int,
    "process": bool,
    "attention": str,
    "quantize": str,
    "kv_memory_fraction": float,
    "overlap": str,
}


def _tier(data: Any, path: str, default: TierRule, *, prompt: bool) -> TierRule:
    data = _mapping(data, path)
    _check_keys(data, {"action", "categories"}, path)

    def action(value: Any, where: str) -> Action:
        text = _typed(value, str, where)
        if prompt and text == "block":
            return Action.CUT  # for a prompt, cutting means blocking
        try:
            act = Action.parse(text)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if prompt and act in (Action.CUT, Action.REDACT):
            raise ConfigError(f"{where}: a prompt takes allow, flag or block")
        return act

    act = action(data["action"], f"{path}.action") if "action" in data else default.action
    cats = {
        str(k): action(v, f"{path}.categories.{k}")
        for k, v in _mapping(data.get("categories"), f"{path}.categories").items()
    }
    return TierRule(act, MappingProxyType(cats))


_POLICY_SCALARS: dict[str, type] = {
    "mode": str,
    "holdback_tokens": int,
    "debounce": bool,
    "early_release": bool,
    "think_in_content": bool,
    "prompt_check": str,
    "blocked_prompt": str,
    "refusal": str,
    "mask": str,
    "notice": str,
    "details": bool,
    "audit_text": bool,
    "on_guard_error": str,
    "unknown_previous_response": str,
    "unknown_events": str,
    "prompt_overflow": str,
}


def load_policy(data: Any, path: str = "policy", base: Policy | None = None) -> Policy:
    """A policy section; keys left out keep ``base``'s values (the default policy for named ones)."""
    base = base or Policy()
    data = _mapping(data, path)
    _check_keys(data, set(_POLICY_SCALARS) | {"thresholds", "response", "prompt", "name"}, path)
    values: dict[str, Any] = {}
    for key, kind in _POLICY_SCALARS.items():
        if key in data:
            values[key] = _typed(data[key], kind, f"{path}.{key}")
    thresholds = _mapping(data.get("thresholds"), f"{path}.thresholds")
    _check_keys(thresholds, {"unsafe", "controversial"}, f"{path}.thresholds")
    for key in ("unsafe", "controversial"):
        if key in thresholds:
            value = thresholds[key]
            values[f"{key}_threshold"] = (
                None if value is None else _typed(value, float, f"{path}.thresholds.{key}")
            )
    for side, prompt in (("response", False), ("prompt", True)):
        section = _mapping(data.get(side), f"{path}.{side}")
        _check_keys(section, {"unsafe", "controversial"}, f"{path}.{side}")
        for tier in ("unsafe", "controversial"):
            attr = f"prompt_{tier}" if prompt else tier
            if tier in section:
                values[attr] = _tier(
                    section[tier], f"{path}.{side}.{tier}", getattr(base, attr), prompt=prompt
                )
    if "name" in data:
        values["name"] = _typed(data["name"], str, f"{path}.name")
    try:
        return replace(base, **values)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_settings(data: Any) -> Settings:
    data = _mapping(data, "")
    _check_keys(
        data,
        {
            "server",
            "upstream",
            "guard",
            "policy",
            "policies",
            "policy_routes",
            "logging",
            "audit",
            "auth",
            "ui",
        },
        "",
    )
    guard_data = _mapping(data.get("guard"), "guard")
    engine = _dataclass(EngineLimits, guard_data.get("engine"), "guard.engine", _ENGINE)
    guard = _dataclass(GuardSettings, {k: v for k, v in guard_data.items() if k != "engine"}, "guard", _GUARD)
    guard = replace(guard, engine=engine)
    if guard.dtype not in (None, "float32", "bfloat16", "float16"):
        raise ConfigError(f"guard.dtype: expected float32, bfloat16 or float16, got {guard.dtype!r}")
    policy = load_policy(data.get("policy"))
    named = {
        str(name): load_policy(section, f"policies.{name}", base=replace(policy, name=str(name)))
        for name, section in _mapping(data.get("policies"), "policies").items()
    }
    routes_data = data.get("policy_routes") or []
    if not isinstance(routes_data, list):
        raise ConfigError("policy_routes: expected a list")
    routes = []
    for i, entry in enumerate(routes_data):
        kinds = {"policy": str, "route": str, "model": str, "api_key_sha256": str}
        r = _dataclass(PolicyRoute, entry, f"policy_routes[{i}]", kinds)
        if r.policy not in named:
            raise ConfigError(f"policy_routes[{i}].policy: no policy named {r.policy!r} under policies")
        routes.append(r)
    return Settings(
        server=_dataclass(ServerSettings, data.get("server"), "server", _SERVER),
        upstream=_dataclass(UpstreamSettings, data.get("upstream"), "upstream", _UPSTREAM),
        guard=guard,
        policy=policy,
        policies=named,
        routes=tuple(routes),
        logging=_dataclass(LoggingSettings, data.get("logging"), "logging", {"format": str, "level": str}),
        auth=_auth(data.get("auth")),
        ui=_dataclass(UiSettings, data.get("ui"), "ui", {"enabled": bool, "live_records": int}),
        audit=_dataclass(
            AuditSettings,
            data.get("audit"),
            "audit",
            {"path": str, "max_bytes": int, "backups": int, "max_text_chars": int},
        ),
    )


def _auth(data: Any) -> AuthSettings:
    data = _mapping(data, "auth")
    _check_keys(data, {"api_keys_sha256"}, "auth")
    keys = data.get("api_keys_sha256") or []
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ConfigError("auth.api_keys_sha256: expected a list of strings")
    try:
        return AuthSettings(tuple(k.lower() for k in keys))
    except ValueError as exc:
        raise ConfigError(f"auth.api_keys_sha256: {exc}") from None


def load_settings_file(path: str | Path) -> Settings:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return load_settings(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def with_overrides(settings: Settings, **overrides: Any) -> Settings:
    """Command-line flags over the file: ``upstream_base_url=...``, ``guard_model=...``, ``server_port=``."""
    out = settings
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, name = key.partition("_")
        out = replace(out, **{section: replace(getattr(out, section), **{name: value})})
    return out
