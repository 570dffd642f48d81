"""DSSE envelopes (Dead Simple Signing Envelope, as in-toto attestations use them), signed with a
local key: ed25519 or ECDSA P-256, a PEM private key (PKCS#8 or the traditional EC form).

The key id is the one securesystemslib derives for the same public key (sha256 of the canonical JSON
of keytype, scheme and public value), so its verifier, which matches signatures to keys by id,
accepts the envelope with the key loaded from the public PEM. ed25519 signatures are deterministic;
ECDSA's are not (a fresh nonce each time): an envelope signed with P-256 differs from run to run, its
payload does not.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from nsbuild.errors import UsageError
from nsbuild.sbom.provenance import MEDIA_DSSE, MEDIA_IN_TOTO

__all__ = ["MEDIA_DSSE", "SigningKey", "load_signing_key", "load_signing_key_file", "pae", "sign_envelope"]
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class SigningKey:
    private: PrivateKey
    keytype: str  # "ed25519" | "ecdsa"
    scheme: str  # "ed25519" | "ecdsa-sha2-nistp256"
    public: str  # raw public bytes in hex (ed25519) or a SubjectPublicKeyInfo PEM (ecdsa)

    @property
    def keyid(self) -> str:
        return hashlib.sha256(olpc_canonical(self.public_dict()).encode()).hexdigest()

    def public_dict(self) -> dict[str, Any]:
        return {"keytype": self.keytype, "scheme": self.scheme, "keyval": {"public": self.public}}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def envelope(self, payload: bytes, payload_type: str = MEDIA_IN_TOTO) -> dict[str, Any]:
        return sign_envelope(payload, self, payload_type)

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.private, ed25519.Ed25519PrivateKey):
            return self.private.sign(data)
        return self.private.sign(data, ec.ECDSA(hashes.SHA256()))


def olpc_canonical(value: Any) -> str:
    """The canonical JSON securesystemslib hashes for key ids: sorted keys, no whitespace, strings
    escaped only where a quote or backslash would end them (newlines stay as they are)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{olpc_canonical(k)}:{olpc_canonical(value[k])}" for k in sorted(value)) + "}"
    if isinstance(value, list):
        return "[" + ",".join(olpc_canonical(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, int):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__} canonically")


def load_signing_key(pem: bytes, password: bytes | None = None, what: str = "--sign-key") -> SigningKey:
    try:
        key = serialization.load_pem_private_key(pem, password=password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"{what}: not a PEM private key nsbuild can use ({exc})") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return SigningKey(key, "ed25519", "ed25519", raw.hex())
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        pem_public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return SigningKey(key, "ecdsa", "ecdsa-sha2-nistp256", pem_public.decode())
    raise UsageError(f"{what}: an ed25519 or ECDSA P-256 key is needed, not {type(key).__name__}")


def load_signing_key_file(path: Path, password: bytes | None = None) -> SigningKey:
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--sign-key: cannot read {path}: {exc.strerror}") from None
    return load_signing_key(pem, password, f"--sign-key {path}")


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is signed."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def sign_envelope(payload: bytes, key: SigningKey, payload_type: str = MEDIA_IN_TOTO) -> dict[str, Any]:
    """The DSSE envelope (a JSON-ready dict) of `payload`, signed by `key`."""
    signature = key.sign(pae(payload_type, payload))
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": key.keyid, "sig": base64.b64encode(signature).decode()}],
    }
