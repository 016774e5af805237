"""The signer interface every backend (PEM file, PKCS#11 token, KMS) implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Signer(Protocol):
    """Something that holds a private key and signs with it, RSA PKCS#1 v1.5 over SHA-256.

    Backends never expose the private key; ``description`` names the key without secrets
    (e.g. ``file:keys/db.key`` or ``pkcs11:token=bootchain;object=db``).
    """

    @property
    def certificate(self) -> bytes:
        """DER of the X.509 certificate that matches the key."""
        ...

    @property
    def description(self) -> str:
        """Where the key lives, without any secret."""
        ...

    def sign(self, data: bytes) -> bytes:
        """Signature over SHA-256(data): RSA PKCS#1 v1.5 (the backend hashes ``data``)."""
        ...
