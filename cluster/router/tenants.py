"""Tenants: who a request runs as, and what that lets it do.

An auth file (`cluster serve --auth-file FILE`, or `auth_file:` in the config) names them:

    tenants:
      team-a:
        key_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
        max_priority: 0          # the most urgent priority it may ask for (lower runs first)
        rate_limit_rps: 5        # token bucket: 429 + Retry-After beyond it
        rate_limit_burst: 10     # the bucket's size (default: max(1, rate_limit_rps))
        max_in_flight: 32        # its requests admitted or queued at once (429 beyond)
        share_cache_with: [team-b]
        admin: false             # may read GetClusterStatus and instance ids

Keys are stored only as SHA-256 hex (`printf %s "$KEY" | sha256sum`). `--api-key KEY` is the
one-tenant shortcut (tenant "default", admin, no limits).

Isolation: every tenant's prefix-cache salt is derived here, on the server, as a keyed hash
(HMAC-SHA256) of its cache group's names, keyed by the group's key hashes (secrets only the
server holds), and prefixed to any `cache_salt` the client sends. A tenant's blocks therefore
hash apart from every other tenant's, whatever either sends, unless both list each other in
`share_cache_with`. Sharing must be a group (if a shares with b and b with c, a and c must
share too): one salt per group is what makes it exact, so a file that is not is refused.

Without an auth file or key there are no tenants: everyone is one anonymous tenant, and the
client's `cache_salt` is the only isolation (vLLM's behaviour).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.router.types import Overloaded, RouterError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_FIELDS = {
    "key_sha256",
    "max_priority",
    "rate_limit_rps",
    "rate_limit_burst",
    "max_in_flight",
    "share_cache_with",
    "admin",
}
DEFAULT_TENANT = "default"


class Forbidden(RouterError):
    """The caller's tenant may not do this."""

    grpc_code = "PERMISSION_DENIED"
    http_status = 403
    error_type = "PermissionDeniedError"


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    key_sha256: bytes = field(repr=False)
    max_priority: int | None = None
    rate_limit_rps: float | None = None
    rate_limit_burst: float | None = None
    max_in_flight: int | None = None
    share_cache_with: tuple[str, ...] = ()
    admin: bool = False
    cache_salt: str | None = field(default=None, repr=False)  # derived: see the module doc

    def salt(self, client_salt: str | None) -> str | None:
        """The salt this tenant's request hashes its blocks under."""
        if self.cache_salt is None:
            return client_salt
        return self.cache_salt if client_salt is None else f"{self.cache_salt}:{client_salt}"

    def priority(self, asked: int) -> int:
        """`asked`, raised to max_priority: no tenant runs ahead of its cap."""
        return asked if self.max_priority is None else max(asked, self.max_priority)


def key_sha256(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class Auth:
    """The tenants and how to find one from a bearer token."""

    def __init__(self, tenants: list[Tenant]):
        if not tenants:
            raise ValueError("an auth config needs at least one tenant")
        self.tenants = {t.name: t for t in tenants}
        seen: dict[bytes, str] = {}
        for t in tenants:
            if t.key_sha256 in seen:
                raise ValueError(f"tenants {seen[t.key_sha256]!r} and {t.name!r} have the same key")
            seen[t.key_sha256] = t.name

    @classmethod
    def single_key(cls, api_key: str) -> Auth:
        """--api-key: one tenant, every right, its client's salt as the only salt."""
        return cls([Tenant(DEFAULT_TENANT, key_sha256(api_key), admin=True)])

    @classmethod
    def from_file(cls, path: str | Path) -> Auth:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read the auth file {path}: {e}") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"auth file {path}: {e}") from None

    @classmethod
    def from_dict(cls, data: Any) -> Auth:
        if not isinstance(data, dict) or set(data) != {"tenants"}:
            raise ValueError("the auth config is a mapping with one key, `tenants`")
        entries = data["tenants"]
        if not isinstance(entries, dict) or not entries:
            raise ValueError("`tenants` maps tenant names to their settings")
        tenants = [_parse_tenant(name, spec) for name, spec in entries.items()]
        return cls(_with_salts(tenants))

    def authenticate(self, authorization: str | bytes | None) -> Tenant | None:
        """The tenant whose key an `Authorization: Bearer <key>` value carries, else None."""
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        if not authorization or not authorization.startswith("Bearer "):
            return None
        digest = key_sha256(authorization[len("Bearer ") :])
        found = None
        for tenant in self.tenants.values():  # every entry compared, in constant time each
            if hmac.compare_digest(digest, tenant.key_sha256):
                found = tenant
        return found


def _parse_tenant(name: Any, spec: Any) -> Tenant:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"tenant name {name!r}: use 1-64 letters, digits, '_', '.', '-' (first a letter "
            "or digit)"
        )
    if not isinstance(spec, dict):
        raise ValueError(f"tenant {name!r}: its settings must be a mapping")
    unknown = sorted(set(spec) - _FIELDS)
    if unknown:
        raise ValueError(f"tenant {name!r}: unknown keys {unknown}; known: {sorted(_FIELDS)}")
    digest = spec.get("key_sha256")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        raise ValueError(
            f"tenant {name!r}: key_sha256 must be the 64 hex digits of the key's SHA-256 "
            '(printf %s "$KEY" | sha256sum); keys themselves are never stored'
        )

    def number(key: str, kind, low: float, integer: bool = False):
        value = spec.get(key)
        if value is None:
            return None
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or (integer and not isinstance(value, int)) or not math.isfinite(value):
            raise ValueError(f"tenant {name!r}: {key} must be a number, got {value!r}")
        if value < low:
            raise ValueError(f"tenant {name!r}: {key} must be >= {low}, got {value}")
        return kind(value)

    share = spec.get("share_cache_with", [])
    if not isinstance(share, list) or not all(isinstance(s, str) for s in share):
        raise ValueError(f"tenant {name!r}: share_cache_with is a list of tenant names")
    admin = spec.get("admin", False)
    if not isinstance(admin, bool):
        raise ValueError(f"tenant {name!r}: admin is true or false")
    return Tenant(
        name=name,
        key_sha256=bytes.fromhex(digest),
        max_priority=number("max_priority", int, -(2**31), integer=True),
        rate_limit_rps=number("rate_limit_rps", float, 1e-6),
        rate_limit_burst=number("rate_limit_burst", float, 1),
        max_in_flight=number("max_in_flight", int, 1, integer=True),
        share_cache_with=tuple(sorted(set(share) - {name})),
        admin=admin,
    )


def _with_salts(tenants: list[Tenant]) -> list[Tenant]:
    """Each tenant with its cache group's salt. A group is the tenant plus those it shares
    with both ways; it must be the same group seen from every member."""
    by_name = {t.name: t for t in tenants}
    for t in tenants:
        unknown = [s for s in t.share_cache_with if s not in by_name]
        if unknown:
            raise ValueError(f"tenant {t.name!r}: share_cache_with names unknown {unknown}")

    def group(t: Tenant) -> frozenset[str]:
        mutual = {s for s in t.share_cache_with if t.name in by_name[s].share_cache_with}
        return frozenset({t.name, *mutual})

    groups = {t.name: group(t) for t in tenants}
    for name, members in groups.items():
        for other in members:
            if groups[other] != members:
                missing = sorted(members ^ groups[other])
                raise ValueError(
                    f"cache sharing must form groups: {name!r} shares with {other!r}, but "
                    f"their groups differ by {missing}; make every member of a group list "
                    "every other"
                )
    out = []
    for t in tenants:
        members = sorted(groups[t.name])
        secret = b"".join(by_name[m].key_sha256 for m in members)
        digest = hmac.new(secret, "\n".join(members).encode(), hashlib.sha256).hexdigest()
        out.append(dataclasses.replace(t, cache_salt=f"t-{digest[:32]}"))
    return out


# -- limits ------------------------------------------------------------------------------------


class TenantLimits:
    """Per-tenant admission: a token bucket (rate_limit_rps) and an in-flight cap. Lives in
    the router; `clock` is injectable so tests need no sleeps."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)
        self._in_flight: dict[str, int] = {}

    def in_flight(self, name: str) -> int:
        return self._in_flight.get(name, 0)

    @contextmanager
    def admit(self, tenant: Tenant | None) -> Iterator[None]:
        """Hold one of the tenant's in-flight seats, after taking a token from its bucket;
        Overloaded (429, with retry_after_s) when either is empty."""
        if tenant is None:
            yield
            return
        cap = tenant.max_in_flight
        if cap is not None and self.in_flight(tenant.name) >= cap:
            raise TenantOverloaded(
                f"tenant {tenant.name!r} has {cap} requests in flight, its limit: wait for one "
                "to finish",
                reason="in_flight",
            )
        self._take_token(tenant)
        self._in_flight[tenant.name] = self.in_flight(tenant.name) + 1
        try:
            yield
        finally:
            self._in_flight[tenant.name] -= 1

    def _take_token(self, tenant: Tenant) -> None:
        rate = tenant.rate_limit_rps
        if rate is None:
            return
        size = tenant.rate_limit_burst or max(1.0, rate)
        now = self._clock()
        tokens, at = self._buckets.get(tenant.name, (size, now))
        tokens = min(size, tokens + (now - at) * rate)
        if tokens < 1.0:
            self._buckets[tenant.name] = (tokens, now)
            wait = (1.0 - tokens) / rate
            raise TenantOverloaded(
                f"tenant {tenant.name!r} is over its rate limit of {rate:g} requests/s: retry "
                f"in {wait:.2f} s",
                reason="rate",
                retry_after_s=max(1, math.ceil(wait)),
            )
        self._buckets[tenant.name] = (tokens - 1.0, now)


class TenantOverloaded(Overloaded):
    """Overloaded because of the tenant's own limits (reason: rate or in_flight)."""

    def __init__(self, message: str, reason: str, retry_after_s: int = 1):
        super().__init__(message, retry_after_s)
        self.reason = reason
