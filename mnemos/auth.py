"""NATS credentials for every MNEMOS role: decentralised JWT accounts, as NATS recommends.

One operator signs two accounts: ``SYS`` (the server's system account) and ``MNEMOS``
(every role, JetStream enabled). Each role is a user of ``MNEMOS`` whose JWT carries its
permissions (:mod:`mnemos.permissions` says which); the server enforces them, so a worker
running user code cannot submit, cancel, push models or read another tenant's results
whatever it sends.

:class:`AuthDir` keeps the keys under one directory (``mnemos up``: ``<data dir>/auth``),
generated once and reused; ``server.conf`` there is included by the nats-server config
(operator JWT, system account, a memory resolver preloaded with both accounts), and
``creds/<user>.creds`` are the standard credentials files (``nats --creds``,
``MNEMOS_NATS_CREDS``). New users (a tenant's service credentials) are signed by the
account's key without touching the server.

The JWT encoding follows nats-io/jwt v2 (``header.claims.signature``, base64url without
padding, ``ed25519-nkey`` signatures over ``header.claims``, ``jti`` the base32 SHA-256 of
the claims); nkeys.py makes and signs the keys.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnemos.names import TENANT_RE

if TYPE_CHECKING:  # nkeys (and PyNaCl) load where keys are made, not in every process that connects
    import nkeys

__all__ = [
    "AuthDir",
    "Permissions",
    "Identity",
    "creds_identity",
    "encode_jwt",
    "decode_jwt_claims",
    "format_creds",
    "inbox_prefix",
    "MAX_CONTROL_LINE",
]

#: Users are named ``<role>`` or ``<role>.<tenant>`` (a tenant as :data:`TENANT_RE` has it).
_USER_RE = re.compile(rf"^[a-z][a-z0-9-]{{0,31}}(\.{TENANT_RE.pattern.removeprefix('^').removesuffix('$')})?$")


#: ``max_control_line`` of a server that takes MNEMOS users (a worker's JWT is ~5 KiB).
MAX_CONTROL_LINE = 32768


def inbox_prefix(user: str) -> str:
    """The reply-subject prefix of a user's connection (``_INBOX.worker``): each user may
    subscribe only under its own, so no one reads another's replies."""
    return f"_INBOX.{user}"


@dataclass(frozen=True)
class Permissions:
    """Subjects a user may publish and subscribe to; nothing else (nats-server semantics:
    an allow list admits only what it names)."""

    pub_allow: tuple[str, ...] = ()
    sub_allow: tuple[str, ...] = ()

    def claims(self) -> dict[str, Any]:
        return {"pub": {"allow": list(self.pub_allow)}, "sub": {"allow": list(self.sub_allow)}}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_jwt(claims: dict[str, Any], issuer: nkeys.KeyPair) -> str:
    """A signed NATS JWT of ``claims`` (``jti``, ``iat`` and ``iss`` are filled in)."""
    body = dict(claims, iat=int(time.time()), iss=issuer.public_key.decode(), jti="")
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}, separators=(",", ":")).encode())
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    signature = issuer.sign(f"{head}.{payload}".encode())
    return f"{head}.{payload}.{_b64(signature)}"


def decode_jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified (the server verifies; this reads names and tags)."""
    try:
        claims = json.loads(_unb64(token.split(".")[1]))
    except (IndexError, ValueError) as e:
        raise ValueError(f"not a NATS JWT: {e}") from e
    if not isinstance(claims, dict):
        raise ValueError("not a NATS JWT: its claims are not an object")
    return claims


_CREDS_TEMPLATE = """-----BEGIN NATS USER JWT-----
{jwt}
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------

*************************************************************
"""

_CREDS_JWT_RE = re.compile(r"-{3,}BEGIN NATS USER JWT-{3,}\s*\n\s*(\S+)\s*\n")


def format_creds(jwt: str, seed: bytes) -> str:
    """A standard ``.creds`` file (what ``nsc generate creds`` writes)."""
    return _CREDS_TEMPLATE.format(jwt=jwt, seed=seed.decode())


@dataclass(frozen=True)
class Identity:
    """Who a credentials file speaks for: its user name (``worker``, ``service.acme``)."""

    user: str

    @property
    def role(self) -> str:
        return self.user.partition(".")[0]

    @property
    def tenant(self) -> str | None:
        return self.user.partition(".")[2] or None

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix(self.user)


def creds_identity(path: str | Path) -> Identity | None:
    """The identity of a MNEMOS credentials file (None for a file MNEMOS did not mint: its
    connection then keeps nats-py's default inbox prefix)."""
    match = _CREDS_JWT_RE.search(Path(path).read_text())
    if match is None:
        raise ValueError(f"{path} is not a NATS credentials file (no user JWT)")
    claims = decode_jwt_claims(match.group(1))
    name, tags = str(claims.get("name", "")), claims.get("nats", {}).get("tags") or []
    return Identity(name) if "mnemos" in tags and _USER_RE.match(name) else None


def _seed(kind: str) -> bytes:
    import nkeys

    return bytes(nkeys.encode_seed(os.urandom(32), getattr(nkeys, f"PREFIX_BYTE_{kind}")))


def _keypair(seed: bytes) -> nkeys.KeyPair:
    import nkeys

    return nkeys.from_seed(bytearray(seed))


def _write_secret(path: Path, text: str) -> None:
    """Write a key or credentials file readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class AuthDir:
    """The operator's, accounts' and users' keys in one directory.

    Layout: ``keys/operator.nk``, ``keys/sys.nk``, ``keys/account.nk`` (seeds, 0600),
    ``server.conf`` (what nats-server includes) and ``creds/<user>.creds``.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def server_conf(self) -> Path:
        return self.root / "server.conf"

    def creds_path(self, user: str) -> Path:
        return self.root / "creds" / f"{user}.creds"

    def _key(self, name: str, kind: str) -> nkeys.KeyPair:
        path = self.root / "keys" / f"{name}.nk"
        if not path.exists():
            _write_secret(path, _seed(kind).decode() + "\n")
        return _keypair(path.read_text().strip().encode())

    @property
    def exists(self) -> bool:
        return self.server_conf.is_file()

    def ensure(self) -> "AuthDir":
        """Create the keys and ``server.conf`` unless they exist (idempotent: a second
        ``mnemos up`` keeps every credentials file it handed out valid)."""
        operator = self._key("operator", "OPERATOR")
        system = self._key("sys", "ACCOUNT")
        account = self._key("account", "ACCOUNT")
        if self.exists:
            return self
        op_pub, sys_pub, acc_pub = (k.public_key.decode() for k in (operator, system, account))
        operator_jwt = encode_jwt({"sub": op_pub, "name": "mnemos-operator",
                                   "nats": {"type": "operator", "version": 2, "system_account": sys_pub}}, operator)
        unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
                     "conn": -1, "leaf": -1}
        system_jwt = encode_jwt({"sub": sys_pub, "name": "SYS", "nats": {
            "type": "account", "version": 2, "limits": unlimited,
            "exports": [{"name": "account-monitoring-services", "subject": "$SYS.REQ.ACCOUNT.*.*",
                         "type": "service", "response_type": "Stream", "account_token_position": 4},
                        {"name": "account-monitoring-streams", "subject": "$SYS.ACCOUNT.*.>",
                         "type": "stream", "account_token_position": 3}],
        }}, operator)
        account_jwt = encode_jwt({"sub": acc_pub, "name": "MNEMOS", "nats": {
            "type": "account", "version": 2,
            "limits": {**unlimited, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
                       "max_ack_pending": -1, "mem_max_stream_bytes": -1, "disk_max_stream_bytes": -1},
        }}, operator)
        conf = "\n".join([
            "# Generated by MNEMOS (mnemos.auth): operator mode, accounts preloaded, no anonymous access.",
            "# A CONNECT carries the user's JWT with its permissions: more than the default 4 KiB line.",
            f"max_control_line: {MAX_CONTROL_LINE}",
            f"operator: {operator_jwt}",
            f"system_account: {sys_pub}",
            "resolver: MEMORY",
            "resolver_preload: {",
            f"  {sys_pub}: {system_jwt}",
            f"  {acc_pub}: {account_jwt}",
            "}",
            "",
        ])
        _write_secret(self.server_conf, conf)
        return self

    def mint(self, user: str, permissions: Permissions, *, expires_s: int | None = None) -> Path:
        """Write (or rewrite) ``creds/<user>.creds``: a new user key, signed by the account,
        with ``permissions``. The same ``user`` minted again gets a new key; the old file
        stays valid (revoke by rotating the account, ``docs/operations.md``)."""
        if not _USER_RE.match(user):
            raise ValueError(f"user {user!r}: a role (a-z, 0-9, -) and optionally '.<tenant>'")
        account = self._key("account", "ACCOUNT")
        seed = _seed("USER")
        key = _keypair(seed)
        claims: dict[str, Any] = {"sub": key.public_key.decode(), "name": user, "nats": {
            "type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1,
            "tags": ["mnemos", f"role:{user.partition('.')[0]}"], **permissions.claims(),
        }}
        if expires_s is not None:
            claims["exp"] = int(time.time()) + expires_s
        path = self.creds_path(user)
        _write_secret(path, format_creds(encode_jwt(claims, account), seed))
        return path
