"""
Tests for L{mailsys.tls}: the generated development certificate, clear
errors for unusable certificate files, the TLS 1.2 floor, implicit TLS and
STARTTLS handshakes with a real client, and reloading a renewed certificate
while connections stay open.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import stat
import warnings
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.logger import Logger, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailsys.tls import ServerTLS, TLSError, ensure_certificate

HOST = "mail.example.test"


def newPair(case: SynchronousTestCase) -> tuple[Path, Path]:
    """A generated certificate and key in a fresh directory of the test."""
    directory = Path(case.mktemp())
    cert, key = directory / "tls" / "cert.pem", directory / "tls" / "key.pem"
    ensure_certificate(cert, key, HOST)
    return cert, key


def loadedTLS(case: SynchronousTestCase) -> ServerTLS:
    """A L{ServerTLS} with a freshly generated certificate, loaded."""
    tls = ServerTLS(*newPair(case))
    tls.load()
    return tls


def serial(der: bytes) -> int:
    """The serial number of a DER certificate, as a client sees it."""
    return x509.load_der_x509_certificate(der).serial_number


class Echo(Protocol):
    """Sends back what it receives: proves the TLS session carries data."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class StartTLSEcho(Echo):
    """Greets in clear text, then switches to TLS, like SMTP STARTTLS."""

    def connectionMade(self) -> None:
        self.transport.write(b"220 go ahead\r\n")
        self.transport.startTLS(self.factory.contextFactory)


class EnsureCertificateTests(SynchronousTestCase):
    """The self-signed pair a development instance starts with."""

    def test_generated(self) -> None:
        """
        With neither file present, a key readable only by its owner and a
        certificate for the host name, localhost and the loopback addresses
        are written, valid for about a year from a little in the past.
        """
        directory = Path(self.mktemp())
        cert, key = directory / "tls" / "cert.pem", directory / "tls" / "key.pem"
        self.assertTrue(ensure_certificate(cert, key, HOST))
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        certificate = x509.load_pem_x509_certificate(cert.read_bytes())
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        self.assertEqual(names.get_values_for_type(x509.DNSName), [HOST, "localhost"])
        self.assertEqual(
            names.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        now = datetime.datetime.now(datetime.timezone.utc)
        self.assertLess(certificate.not_valid_before_utc, now)
        lifetime = certificate.not_valid_after_utc - now
        self.assertTrue(
            datetime.timedelta(days=360) < lifetime < datetime.timedelta(days=370)
        )
        private = serialization.load_pem_private_key(key.read_bytes(), None)
        self.assertEqual(
            private.public_key().public_numbers(),
            certificate.public_key().public_numbers(),
        )
        # No temporary file is left behind.
        self.assertEqual(
            sorted(p.name for p in cert.parent.iterdir()), ["cert.pem", "key.pem"]
        )

    def test_existingPairKept(self) -> None:
        """A certificate the operator installed is never overwritten."""
        cert, key = newPair(self)
        before = cert.read_bytes(), key.read_bytes()
        self.assertFalse(ensure_certificate(cert, key, HOST))
        self.assertEqual((cert.read_bytes(), key.read_bytes()), before)

    def test_onlyCertificate(self) -> None:
        """
        A certificate without its key is an error naming the missing key,
        not a new pair silently replacing the certificate.
        """
        cert, key = newPair(self)
        key.unlink()
        error = self.assertRaises(TLSError, ensure_certificate, cert, key, HOST)
        self.assertIn(str(key), str(error))
        self.assertFalse(key.exists())

    def test_onlyKey(self) -> None:
        """A key without its certificate is an error naming the certificate."""
        cert, key = newPair(self)
        cert.unlink()
        error = self.assertRaises(TLSError, ensure_certificate, cert, key, HOST)
        self.assertIn(str(cert), str(error))
        self.assertFalse(cert.exists())

    def test_cannotWrite(self) -> None:
        """A directory that cannot be made gives a one-line TLSError."""
        blocker = Path(self.mktemp())
        blocker.write_bytes(b"a file, not a directory")
        error = self.assertRaises(
            TLSError,
            ensure_certificate,
            blocker / "cert.pem",
            blocker / "key.pem",
            HOST,
        )
        self.assertIn(str(blocker), str(error))
        self.assertNotIn("\n", str(error))


class LoadTests(SynchronousTestCase):
    """Unusable certificate files are refused with the file named."""

    def assertRefused(self, tls: ServerTLS, path: Path, words: str) -> None:
        error = self.assertRaises(TLSError, tls.load)
        self.assertIn(str(path), str(error))
        self.assertIn(words, str(error))
        self.assertNotIn("\n", str(error))

    def test_loads(self) -> None:
        """A generated pair loads; its certificate is the one in use."""
        cert, key = newPair(self)
        tls = ServerTLS(cert, key)
        tls.load()
        assert tls.certificate is not None
        self.assertEqual(
            tls.certificate, x509.load_pem_x509_certificate(cert.read_bytes())
        )

    def test_missing(self) -> None:
        """A missing certificate file is named."""
        cert, key = newPair(self)
        cert.unlink()
        self.assertRefused(ServerTLS(cert, key), cert, "cannot read")

    def test_garbageCertificate(self) -> None:
        """A certificate file that is not PEM is named."""
        cert, key = newPair(self)
        cert.write_bytes(b"hello\n")
        self.assertRefused(ServerTLS(cert, key), cert, "not a PEM certificate")

    def test_garbageKey(self) -> None:
        """A key file that is not PEM is named."""
        cert, key = newPair(self)
        key.write_bytes(cert.read_bytes())
        self.assertRefused(ServerTLS(cert, key), key, "not a PEM private key")

    def test_encryptedKey(self) -> None:
        """A key protected by a passphrase is refused: no one is there to type it."""
        cert, key = newPair(self)
        private = serialization.load_pem_private_key(key.read_bytes(), None)
        key.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
        self.assertRefused(ServerTLS(cert, key), key, "encrypted")

    def test_mismatchedKey(self) -> None:
        """
        The key of another certificate (a half-finished renewal) is
        refused, naming both files.
        """
        cert, key = newPair(self)
        _, otherKey = newPair(self)
        key.write_bytes(otherKey.read_bytes())
        tls = ServerTLS(cert, key)
        self.assertRefused(tls, key, "does not match")
        self.assertRefused(tls, cert, "does not match")

    def test_otherKeyType(self) -> None:
        """An elliptic-curve key mismatched with an RSA certificate is refused."""
        cert, key = newPair(self)
        key.write_bytes(
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.assertRefused(ServerTLS(cert, key), key, "does not match")

    def test_notLoaded(self) -> None:
        """A handshake before L{ServerTLS.load} fails clearly."""
        cert, key = newPair(self)
        tls = ServerTLS(cert, key)
        self.assertRaises(TLSError, tls.contextFactory().getContext)

    def test_oldVersionsDisabled(self) -> None:
        """
        The server context refuses SSLv3, TLS 1.0 and TLS 1.1 (RFC 8996),
        whatever the system OpenSSL would otherwise allow.
        """
        context = loadedTLS(self).contextFactory().getContext()
        options = context.set_options(0)  # adds nothing; returns the options set
        for flag in (SSL.OP_NO_SSLv3, SSL.OP_NO_TLSv1, SSL.OP_NO_TLSv1_1):
            self.assertTrue(options & flag, flag)
        self.assertFalse(options & SSL.OP_NO_TLSv1_2)
        self.assertFalse(options & SSL.OP_NO_TLSv1_3)

    def test_contextFactoryStable(self) -> None:
        """
        Every listener gets the same object, one Twisted accepts for
        C{startTLS} and L{TLSMemoryBIOFactory}.
        """
        tls = loadedTLS(self)
        self.assertIs(tls.contextFactory(), tls.contextFactory())
        self.assertTrue(
            verifyObject(IOpenSSLServerConnectionCreator, tls.contextFactory())
        )
        self.assertIsInstance(tls.wrap(Factory.forProtocol(Echo)), TLSMemoryBIOFactory)


class HandshakeTests(TestCase):
    """Real handshakes over loopback with Python's C{ssl} client."""

    def listen(self, factory) -> int:
        """Listen on a free loopback port until the test ends."""
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def clientContext(self, cert: Path) -> ssl.SSLContext:
        """A client that trusts exactly our certificate, as a pinned client would."""
        return ssl.create_default_context(cafile=str(cert))

    @staticmethod
    def exchange(
        port: int, context: ssl.SSLContext, starttls: bool = False
    ) -> tuple[str, int, bytes]:
        """
        In a thread: connect, handshake (after the greeting if C{starttls}),
        send a line; return the TLS version, the server's certificate serial
        and the echo.
        """
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            if starttls:
                greeting = b""
                while not greeting.endswith(b"\r\n"):
                    greeting += sock.recv(1)
                assert greeting == b"220 go ahead\r\n", greeting
            with context.wrap_socket(sock, server_hostname="localhost") as tlsSocket:
                tlsSocket.sendall(b"ping\r\n")
                echo = tlsSocket.recv(100)
                der = tlsSocket.getpeercert(binary_form=True)
                return tlsSocket.version() or "", serial(der), echo

    def test_implicitTLS(self) -> None:
        """
        A listener made with C{wrap()} completes a handshake with a client
        that checks the certificate against C{localhost}, over TLS 1.3, and
        carries data.
        """
        tls = loadedTLS(self)
        port = self.listen(tls.wrap(Factory.forProtocol(Echo)))
        d = deferToThread(self.exchange, port, self.clientContext(tls.cert))

        def check(result: tuple[str, int, bytes]) -> None:
            assert tls.certificate is not None
            self.assertEqual(
                result, ("TLSv1.3", tls.certificate.serial_number, b"ping\r\n")
            )

        return d.addCallback(check)

    def test_startTLS(self) -> None:
        """
        C{transport.startTLS(contextFactory())} after a clear-text greeting
        gives a working TLS session, as SMTP, IMAP and POP3 STARTTLS need.
        """
        tls = loadedTLS(self)
        factory = Factory.forProtocol(StartTLSEcho)
        factory.contextFactory = tls.contextFactory()
        port = self.listen(factory)
        d = deferToThread(self.exchange, port, self.clientContext(tls.cert), True)
        return d.addCallback(lambda result: self.assertEqual(result[2], b"ping\r\n"))

    def test_tls12Accepted(self) -> None:
        """A client limited to TLS 1.2 (older phones, Java) still connects."""
        tls = loadedTLS(self)
        port = self.listen(tls.wrap(Factory.forProtocol(Echo)))
        context = self.clientContext(tls.cert)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        d = deferToThread(self.exchange, port, context)
        return d.addCallback(lambda result: self.assertEqual(result[0], "TLSv1.2"))

    def test_tls11Refused(self) -> None:
        """A client offering only TLS 1.1 gets no session."""
        tls = loadedTLS(self)
        port = self.listen(tls.wrap(Factory.forProtocol(Echo)))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1_1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        # Let the client itself offer TLS 1.1, whatever its defaults.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        d = deferToThread(self.exchange, port, context)
        return self.assertFailure(d, ssl.SSLError)

    def test_reload(self) -> None:
        """
        After the files are renewed and C{reload()} runs, new connections
        get the new certificate on the same listener, and a connection
        opened before keeps working.
        """
        tls = loadedTLS(self)
        newCert, newKey = newPair(self)
        port = self.listen(tls.wrap(Factory.forProtocol(Echo)))
        # Clients that trust only the old, or only the new certificate.
        oldContext = self.clientContext(tls.cert)
        newContext = self.clientContext(newCert)
        reloaded: list[bool] = []

        def renew() -> None:
            tls.cert.write_bytes(newCert.read_bytes())
            tls.key.write_bytes(newKey.read_bytes())
            reloaded.append(tls.reload())

        def scenario() -> tuple[int, int, bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                with oldContext.wrap_socket(sock, server_hostname="localhost") as old:
                    before = serial(old.getpeercert(binary_form=True))
                    blockingCallFromThread(reactor, renew)
                    after = self.exchange(port, newContext)[1]
                    old.sendall(b"still here\r\n")
                    return before, after, old.recv(100)

        def check(result: tuple[int, int, bytes]) -> None:
            before, after, echo = result
            self.assertEqual(reloaded, [True])
            self.assertNotEqual(before, after)
            renewed = x509.load_pem_x509_certificate(newCert.read_bytes())
            self.assertEqual(after, renewed.serial_number)
            assert tls.certificate is not None
            self.assertEqual(tls.certificate.serial_number, after)
            self.assertEqual(echo, b"still here\r\n")

        return deferToThread(scenario).addCallback(check)

    def test_failedReloadKeepsCertificate(self) -> None:
        """
        When the renewed files are broken, C{reload()} says so, logs the
        reason naming the file, and clients keep getting the old
        certificate: the mail service stays up.
        """
        events: list[dict] = []
        self.patch(ServerTLS, "_log", Logger(observer=events.append))
        tls = loadedTLS(self)
        assert tls.certificate is not None
        old = tls.certificate.serial_number
        port = self.listen(tls.wrap(Factory.forProtocol(Echo)))
        tls.cert.write_bytes(b"-----BEGIN CERTIFICATE-----\ntruncated")
        self.assertFalse(tls.reload())
        self.assertEqual(tls.certificate.serial_number, old)
        [event] = events
        self.assertEqual(event["log_level"].name, "error")
        self.assertIn(str(tls.cert), formatEvent(event))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        d = deferToThread(self.exchange, port, context)
        return d.addCallback(lambda result: self.assertEqual(result[1], old))
