"""OVMF varstores with the customer's keys enrolled, byte-reproducible.

Uses virt-firmware as a library for the edk2 variable store layout, but sets every variable
and timestamp itself (``virt-fw-vars`` may stamp the wall clock). Also reads back what the
firmware will measure into PCR 7: SecureBoot, PK, KEK, db, dbx, and the db entry that
validates a signing certificate (EV_EFI_VARIABLE_AUTHORITY).
"""

from __future__ import annotations

import datetime
import hashlib
import uuid
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from virt.firmware.efi import efivar, ucs16
from virt.firmware.varstore.edk2 import Edk2VarStore

from builder.errors import InputFileError, VerificationError
from builder.secureboot import esl
from builder.secureboot.keys import KeySet

EFI_SECURE_BOOT_ENABLE_DISABLE = uuid.UUID("f0a30bc7-af08-4556-99c4-001009c93a44")
EFI_CUSTOM_MODE_ENABLE = uuid.UUID("c076ec0c-7028-4399-a072-71ee5c448b9f")
# Owner of the placeholder dbx entry virt-fw-vars --secure-boot writes (OVMF EnrollDefaultKeys).
OVMF_ENROLL_DEFAULT_KEYS = uuid.UUID("a0baa8a3-041d-48a8-bc87-c36d121b5e3d")
NV_BS = efivar.EFI_VARIABLE_NON_VOLATILE | efivar.EFI_VARIABLE_BOOTSERVICE_ACCESS

SECURE_BOOT_VARIABLES: tuple[str, ...] = ("SecureBoot", "PK", "KEK", "db", "dbx")


class _BytesVarStore(Edk2VarStore):  # type: ignore[misc]
    """Edk2VarStore over bytes in memory instead of a file."""

    def __init__(self, data: bytes, where: str) -> None:
        self.filename = where
        self.filedata = data
        self.start: int | None = None
        self.end: int | None = None
        if self.find_nvdata(data) is None:
            raise InputFileError(f"{where}: no edk2 NvData firmware volume found")
        try:
            self.parse_volume()
        except SystemExit:  # virt-firmware exits on a malformed store
            raise InputFileError(f"{where}: not an edk2 authenticated variable store") from None


def _variable(name: str, guid: uuid.UUID, attr: int, data: bytes, when: Any) -> Any:
    var = efivar.EfiVar(ucs16.from_string(name), guid=str(guid), attr=attr, data=data)
    var.time = when if attr & esl.EFI_VARIABLE_TIME_BASED_AUTHENTICATED_WRITE_ACCESS else None
    return var


def make_varstore(
    template: bytes,
    keyset: KeySet,
    *,
    extra_db: Sequence[bytes] = (),
    dbx_sha256: Sequence[bytes] = (),
    source_date_epoch: int,
) -> bytes:
    """``template`` (OVMF_VARS_4M.fd) with PK, KEK, db (+ ``extra_db``), dbx and Secure Boot on.

    Every signature list is owned by the key set's owner GUID. Without ``dbx_sha256`` dbx
    holds the placeholder virt-fw-vars writes (SHA-256 of nothing, OVMF's owner GUID), so
    the PCR 7 data match a varstore made by ``virt-fw-vars --secure-boot``. Authenticated
    variables carry SOURCE_DATE_EPOCH as their timestamp; the output depends on nothing else.
    """
    store = _BytesVarStore(template, "varstore template")
    varlist = store.get_varlist()
    clash = sorted(set(varlist) & {"PK", "KEK", "db", "dbx", "SecureBootEnable", "CustomMode"})
    if clash:
        raise InputFileError(
            f"varstore template already holds {', '.join(clash)}",
            hint="start from the empty OVMF_VARS_4M.fd, not a .ms.fd or .snakeoil.fd template",
        )
    for i, digest in enumerate(dbx_sha256):
        if len(digest) != 32:
            raise InputFileError(f"dbx entry {i} is {len(digest)} bytes, not a SHA-256 digest")
    owner = keyset.owner_guid
    db_certs: list[bytes] = []
    for cert in (keyset.db, *extra_db):
        try:
            x509.load_der_x509_certificate(cert)
        except ValueError as exc:
            raise InputFileError(f"db certificate {len(db_certs)}: not X.509 DER ({exc})") from None
        if cert not in db_certs:
            db_certs.append(cert)
    if dbx_sha256:
        dbx = esl.SignatureDatabase((esl.sha256_list(owner, list(dict.fromkeys(dbx_sha256))),))
    else:
        placeholder = esl.sha256_list(OVMF_ENROLL_DEFAULT_KEYS, [hashlib.sha256(b"").digest()])
        dbx = esl.SignatureDatabase((placeholder,))
    values = {
        "PK": esl.SignatureDatabase((esl.x509_list(owner, keyset.pk),)),
        "KEK": esl.SignatureDatabase((esl.x509_list(owner, keyset.kek),)),
        "db": esl.SignatureDatabase(tuple(esl.x509_list(owner, c) for c in db_certs)),
        "dbx": dbx,
    }
    when = datetime.datetime.fromtimestamp(source_date_epoch, tz=datetime.UTC)
    for name, value in values.items():
        varlist[name] = _variable(
            name, esl.VENDOR_GUIDS[name], esl.SECURE_VARIABLE_ATTRIBUTES, bytes(value), when
        )
    varlist["SecureBootEnable"] = _variable(
        "SecureBootEnable", EFI_SECURE_BOOT_ENABLE_DISABLE, NV_BS, b"\x01", when
    )
    varlist["CustomMode"] = _variable("CustomMode", EFI_CUSTOM_MODE_ENABLE, NV_BS, b"\x00", when)
    start, end = store.start, store.end
    assert start is not None and end is not None  # set by parse_volume
    try:
        variables = bytes(store.bytes_varlist(varlist))
    except SystemExit:
        raise InputFileError("varstore template too small for these keys") from None
    return template[:start] + variables + b"\xff" * (end - start - len(variables)) + template[end:]


def read_secureboot_variables(varstore: bytes) -> dict[str, tuple[bytes, bytes]]:
    """What OVMF measures into PCR 7: name -> (vendor GUID, 16 bytes little-endian, data).

    PK, KEK, db and dbx come from the store (empty data when absent, as edk2 measures them).
    SecureBoot is volatile and set by the firmware at boot: 01 when PK is enrolled and
    SecureBootEnable is not 00, else 00 (edk2 AuthVariableLib).
    """
    varlist = _BytesVarStore(varstore, "varstore").get_varlist()
    out: dict[str, tuple[bytes, bytes]] = {}
    for name in ("PK", "KEK", "db", "dbx"):
        var = varlist.get(name)
        data = bytes(var.data) if var is not None else b""
        if data:
            esl.SignatureDatabase.parse(data)  # reject garbage early
        out[name] = (esl.VENDOR_GUIDS[name].bytes_le, data)
    enable = varlist.get("SecureBootEnable")
    enabled = enable is None or bytes(enable.data) != b"\x00"
    on = bool(out["PK"][1]) and enabled
    out = {"SecureBoot": (esl.EFI_GLOBAL_VARIABLE.bytes_le, b"\x01" if on else b"\x00"), **out}
    return out


def db_entry_for(varstore: bytes, cert_der: bytes) -> tuple[bytes, bytes]:
    """The db EFI_SIGNATURE_DATA that validates ``cert_der``: (owner GUID LE, cert DER).

    That is the entry holding the certificate itself, or else the first one holding its
    issuer (signature checked). Raises VerificationError when db validates neither.
    """
    try:
        leaf = x509.load_der_x509_certificate(cert_der)
    except ValueError as exc:
        raise InputFileError(f"signing certificate is not X.509 DER ({exc})") from None
    db = esl.SignatureDatabase.parse(read_secureboot_variables(varstore)["db"][1])
    entries = db.certificates()
    for entry in entries:
        if entry.data == cert_der:
            return entry.owner.bytes_le, entry.data
    for entry in entries:
        try:
            issuer = x509.load_der_x509_certificate(entry.data)
            leaf.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return entry.owner.bytes_le, entry.data
    raise VerificationError(
        f"no db entry validates certificate {leaf.subject.rfc4514_string()!r}",
        hint="enroll its certificate or issuer in db",
    )
