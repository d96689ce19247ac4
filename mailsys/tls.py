"""
Certificates and the TLS policy shared by every listener.

One L{ServerTLS} holds the certificate and key for SMTP STARTTLS,
submissions, IMAPS, POP3S and the rest, so that a certificate renewed by
certbot reaches all of them with one C{reload()} (on SIGHUP), without a
restart and without dropping a connection.  The policy is Twisted's
L{CertificateOptions} with TLS 1.2 as the floor: every client people still
use speaks it, and older versions are broken.

A development instance has no certificate: L{ensure_certificate} makes a
self-signed one for the host name, C{localhost} and the loopback addresses,
so that TLS works from the first start.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

# A generated certificate is valid this long, from a day in the past (a
# client whose clock is a little behind must not see "not yet valid").
CERTIFICATE_LIFETIME = datetime.timedelta(days=365)
CLOCK_SKEW = datetime.timedelta(days=1)


class TLSError(Exception):
    """
    A certificate or key that cannot be used.  C{str(error)} is one line
    naming the file, ready for an administrator.
    """


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """
    Replace C{path} with C{data}: written to a new file with permissions
    C{mode} from the start (a private key is never readable by others, not
    even for an instant), synced, then renamed into place.
    """
    temporary = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.rename(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _self_signed(hostname: str) -> tuple[bytes, bytes]:
    """
    A new RSA-2048 key and a self-signed certificate for C{hostname},
    C{localhost}, 127.0.0.1 and ::1, as PEM C{(certificate, key)}.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names = dict.fromkeys([hostname.lower(), "localhost"])
    alternatives: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alternatives += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname.lower())])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CERTIFICATE_LIFETIME)
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return (
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def ensure_certificate(cert: Path, key: Path, hostname: str) -> bool:
    """
    Give a fresh installation a certificate: when neither C{cert} nor C{key}
    exists, write a self-signed pair for C{hostname} (valid a year; the key
    mode 0600) and return C{True}.  When both exist, touch nothing and return
    C{False}.

    @raise TLSError: when only one of them exists (generating the other
        would never match it), or the files cannot be written.
    """
    cert, key = Path(cert), Path(key)
    have_cert, have_key = os.path.lexists(cert), os.path.lexists(key)
    if have_cert and have_key:
        return False
    if have_cert or have_key:
        present, missing = (cert, key) if have_cert else (key, cert)
        raise TLSError(
            f"{missing}: missing, but {present} exists; provide it, or remove "
            f"{present} to have a self-signed pair generated"
        )
    certificate_pem, key_pem = _self_signed(hostname)
    try:
        for path in (cert, key):
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_atomically(key, key_pem, 0o600)
        _write_atomically(cert, certificate_pem, 0o644)
    except OSError as e:
        name = e.filename or cert
        raise TLSError(f"{name}: cannot write: {e.strerror or e}") from None
    return True


def _read(path: Path) -> bytes:
    """The bytes of C{path}, or a L{TLSError} naming it."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise TLSError(f"{path}: cannot read: {e.strerror or e}") from None


def _load_pair(cert: Path, key: Path) -> tuple[list[x509.Certificate], PrivateKeyTypes]:
    """
    The certificate chain in C{cert} (the server's own first, then any
    intermediates, as in certbot's C{fullchain.pem}) and the private key in
    C{key}, checked to belong together.

    @raise TLSError: naming the file at fault.
    """
    cert_pem = _read(cert)
    key_pem = _read(key)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TLSError(f"{cert}: not a PEM certificate") from None
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TLSError(f"{key}: the private key is encrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSError(f"{key}: not a PEM private key") from None

    def spki(public_key) -> bytes:
        return public_key.public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )

    if spki(private_key.public_key()) != spki(chain[0].public_key()):
        raise TLSError(f"{key}: private key does not match the certificate in {cert}")
    return chain, private_key


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class _CurrentContext:
    """
    What every listener is given instead of a fixed context: each new TLS
    connection asks it, and gets the certificate loaded last.
    """

    def __init__(self, tls: ServerTLS) -> None:
        self._tls = tls

    def getContext(self) -> SSL.Context:
        return self._tls._current().getContext()

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return self._tls._current().serverConnectionForTLS(tlsProtocol)


class ServerTLS:
    """
    The TLS configuration of every listener: one certificate and key, a
    TLS 1.2 minimum, and L{reload} to pick up renewed files while running.

    @ivar certificate: the server certificate now in use, or C{None} before
        L{load}.
    """

    _log = Logger()

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = Path(cert)
        self.key = Path(key)
        self.certificate: x509.Certificate | None = None
        self._options: CertificateOptions | None = None
        self._creator = _CurrentContext(self)

    def load(self) -> None:
        """
        Read and check the certificate and key now, and use them for every
        handshake from now on.

        @raise TLSError: for a file that is missing, unreadable, not PEM,
            encrypted, or a key that does not match the certificate.
        """
        chain, private_key = _load_pair(self.cert, self.key)
        options = CertificateOptions(
            privateKey=private_key,
            certificate=chain[0],
            extraCertChain=chain[1:],
            # RFC 8996 retires TLS 1.0 and 1.1; RFC 8314 4.1 asks mail
            # servers to follow current practice.
            raiseMinimumTo=TLSVersion.TLSv1_2,
        )
        try:
            # Build the OpenSSL context now, so that a problem OpenSSL finds
            # surfaces here and not in the middle of a client's handshake.
            options.getContext()
        except SSL.Error as e:
            raise TLSError(f"{self.cert}: unusable with {self.key}: {e}") from None
        now = datetime.datetime.now(datetime.timezone.utc)
        if chain[0].not_valid_after_utc < now:
            self._log.warn(
                "TLS certificate {cert} expired on {expiry}; clients will refuse it",
                cert=str(self.cert),
                expiry=chain[0].not_valid_after_utc.isoformat(),
            )
        self._options = options
        self.certificate = chain[0]

    def reload(self) -> bool:
        """
        Read the files again (after a renewal).  Connections already open
        keep their session; new handshakes use the new certificate.  If the
        new files are unusable, keep serving the old certificate and log why.

        @return: whether the new files are now in use.
        """
        try:
            self.load()
        except TLSError as e:
            self._log.error(
                "TLS reload failed, keeping the current certificate: {reason}",
                reason=str(e),
            )
            return False
        assert self.certificate is not None
        self._log.info(
            "TLS certificate reloaded from {cert}: serial {serial}, valid until "
            "{expiry}",
            cert=str(self.cert),
            serial=f"{self.certificate.serial_number:x}",
            expiry=self.certificate.not_valid_after_utc.isoformat(),
        )
        return True

    def _current(self) -> CertificateOptions:
        if self._options is None:
            raise TLSError(f"{self.cert}: certificate not loaded yet")
        return self._options

    def contextFactory(self) -> _CurrentContext:
        """
        The object to give C{transport.startTLS} (STARTTLS) or
        L{TLSMemoryBIOFactory}.  It is always the same object, and it always
        hands out the current certificate, so L{reload} reaches every
        listener.
        """
        return self._creator

    def wrap(self, factory) -> TLSMemoryBIOFactory:
        """
        C{factory} behind implicit TLS, for the listeners where the
        handshake comes first (submissions, IMAPS, POP3S).
        """
        return TLSMemoryBIOFactory(self._creator, False, factory)
