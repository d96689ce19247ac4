"""
Tests for L{mailsys.cli}: the C{mailsys} command as an administrator uses
it, through L{main} with stdin, stdout and stderr replaced.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

import mailsys
from mailsys import cli
from mailsys.accounts import UserStore
from mailsys.config import Config

from .test_accounts import CountingHasher

ALICE = "alice@example.test"

CONFIG = """\
[server]
state_dir = "var"

[domains]
names = ["example.test", "other.test"]
"""


class TerminalInput(io.StringIO):
    """Standard input that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


class CommandTestCase(SynchronousTestCase):
    """Runs L{cli.main} against a configuration in a temporary directory."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir()
        self.config = self.base / "mailsys.toml"
        self.config.write_text(CONFIG)
        self.state = self.base / "var"
        # Cheap hashing: these tests are about the command, not argon2.
        self.hasher = CountingHasher()
        self.patch(
            cli,
            "_user_store",
            lambda cfg: UserStore(cfg.users_file, cfg.domains, hasher=self.hasher),
        )
        self.prompts: list[str] = []
        self.answers: list[str] = []
        self.patch(cli.getpass, "getpass", self.getpass)

    def getpass(self, prompt: str = "Password: ") -> str:
        self.prompts.append(prompt)
        return self.answers.pop(0)

    def command(
        self, *argv: str, stdin: str | io.StringIO = "", config: bool = True
    ) -> tuple[int, str, str]:
        """Run C{mailsys [--config FILE] ARGV...}; return status, stdout, stderr."""
        stdout, stderr = io.StringIO(), io.StringIO()
        if isinstance(stdin, str):
            stdin = io.StringIO(stdin)
        self.patch(sys, "stdin", stdin)
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        args = (["--config", str(self.config)] if config else []) + list(argv)
        status = cli.main(args)
        return status, stdout.getvalue(), stderr.getvalue()

    def store(self) -> UserStore:
        return UserStore(self.state / "users.json", hasher=self.hasher)

    def assertUserError(self, result: tuple[int, str, str], message: str) -> None:
        """Exit status 2 and exactly one line on stderr: C{mailsys: MESSAGE}."""
        status, out, err = result
        self.assertEqual((status, err), (2, f"mailsys: {message}\n"))


class UserCommandTests(CommandTestCase):
    """C{mailsys user add|passwd|del|list}."""

    def test_add(self) -> None:
        """C{user add} stores the user with the password from stdin and
        creates their maildir, private to the server, at once."""
        status, out, err = self.command(
            "user", "add", "Alice@Example.test", stdin="s3cret\n"
        )
        maildir = self.state / "mail" / "example.test" / "alice"
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out, f"added alice@example.test (mailbox {maildir})\n")
        self.assertIsNotNone(self.store().verify("alice@example.test", "s3cret"))
        for directory in [self.state / "mail", maildir.parent, maildir] + [
            maildir / sub for sub in ("cur", "new", "tmp")
        ]:
            self.assertEqual(stat.S_IMODE(directory.stat().st_mode), 0o700, directory)

    def test_add_existing_maildir(self) -> None:
        """Adding a user whose mail is still on disk (deleted earlier) keeps
        that mail."""
        maildir = self.state / "mail" / "example.test" / "alice"
        (maildir / "cur").mkdir(parents=True)
        (maildir / "cur" / "1.msg:2,S").write_text("Subject: old\n\n")
        status, _, err = self.command("user", "add", "alice@example.test", stdin="pw\n")
        self.assertEqual((status, err), (0, ""))
        self.assertTrue((maildir / "cur" / "1.msg:2,S").exists())
        self.assertTrue((maildir / "new").is_dir())

    def test_password_from_stdin(self) -> None:
        """Only the line ending is removed from a piped password: spaces are
        kept, and only the first line is used."""
        for text, password in [
            (" pass word \n", " pass word "),
            ("pw\r\n", "pw"),
            ("no newline", "no newline"),
            ("first\nsecond\n", "first"),
            ("pässwörd\n", "pässwörd"),
        ]:
            with self.subTest(text=text):
                self.command("user", "del", "alice@example.test")
                status, _, _ = self.command("user", "add", ALICE, stdin=text)
                self.assertEqual(status, 0)
                self.assertIsNotNone(self.store().verify(ALICE, password))
        self.assertEqual(self.prompts, [])

    def test_no_password_on_stdin(self) -> None:
        """An empty stdin or an empty line is refused; no user is added."""
        self.assertUserError(
            self.command("user", "add", "alice@example.test", stdin=""),
            "no password on standard input",
        )
        self.assertUserError(
            self.command("user", "add", ALICE, stdin="\n"), "empty password"
        )
        self.assertFalse((self.state / "users.json").exists())

    def test_password_prompted(self) -> None:
        """On a terminal the password is asked for twice, without echo."""
        self.answers = ["s3cret", "s3cret"]
        status, _, _ = self.command(
            "user", "add", "alice@example.test", stdin=TerminalInput()
        )
        self.assertEqual(status, 0)
        self.assertEqual(self.prompts, ["Password: ", "Repeat password: "])
        self.assertIsNotNone(self.store().verify("alice@example.test", "s3cret"))

    def test_password_mismatch(self) -> None:
        """Two different answers at the prompt add nobody."""
        self.answers = ["s3cret", "s3cert"]
        self.assertUserError(
            self.command("user", "add", "alice@example.test", stdin=TerminalInput()),
            "passwords do not match",
        )
        self.assertEqual(self.store().addresses(), [])
        self.assertFalse((self.state / "mail").exists())

    def test_prompt_abandoned(self) -> None:
        """Ctrl-D at the prompt is one line and status 2, Ctrl-C is status
        130; neither adds the user nor prints a traceback."""
        for exception, status, message in [
            (EOFError, 2, "mailsys: no password given\n"),
            (KeyboardInterrupt, 130, "\n"),
        ]:
            with self.subTest(exception=exception):

                def interrupted(prompt: str = "") -> str:
                    raise exception()

                self.patch(cli.getpass, "getpass", interrupted)
                result = self.command("user", "add", ALICE, stdin=TerminalInput())
                self.assertEqual(result, (status, "", message))
        self.assertFalse(self.state.exists())

    def test_duplicate(self) -> None:
        """Adding an existing user is one line and status 2, before any
        password prompt; the old password still works."""
        self.command("user", "add", "alice@example.test", stdin="first\n")
        self.assertUserError(
            self.command("user", "add", "ALICE@example.test", stdin=TerminalInput()),
            "user alice@example.test already exists",
        )
        self.assertEqual(self.prompts, [])
        self.assertIsNotNone(self.store().verify("alice@example.test", "first"))

    def test_bad_address(self) -> None:
        """Addresses that could escape the mail store are refused with one
        line and status 2; nothing is written."""
        for address, message in [
            ("../x@example.test", "'../x@example.test': invalid local part"),
            ("a\x00b@example.test", "'a\\x00b@example.test': control character"),
            ("a\nb@example.test", "'a\\nb@example.test': control character"),
            ('"bob@evil"@example.test', "invalid user name 'bob@evil': use only"),
            ("user%other@example.test", "invalid user name 'user%other': use only"),
            ("alice", "invalid address 'alice': missing '@'"),
            ("alice@[192.0.2.1]", "[192.0.2.1] is an address literal, not a domain"),
        ]:
            with self.subTest(address=address):
                status, out, err = self.command("user", "add", address, stdin="pw\n")
                self.assertEqual((status, out, err.count("\n")), (2, "", 1))
                self.assertTrue(err.startswith("mailsys: "), err)
                self.assertIn(message, err)
        self.assertFalse(self.state.exists())

    def test_foreign_domain(self) -> None:
        """Users can only be added in the configured domains."""
        self.assertUserError(
            self.command("user", "add", "bob@example.org", stdin="pw\n"),
            "example.org is not one of our domains (example.test, other.test)",
        )
        self.assertFalse(self.state.exists())

    def test_list(self) -> None:
        """C{user list} prints every user, sorted, one a line."""
        self.assertEqual(self.command("user", "list"), (0, "", ""))
        for address in ["carol@example.test", "bob@other.test", "alice@example.test"]:
            self.command("user", "add", address, stdin="pw\n")
        self.assertEqual(
            self.command("user", "list"),
            (0, "alice@example.test\nbob@other.test\ncarol@example.test\n", ""),
        )

    def test_passwd(self) -> None:
        """C{user passwd} replaces the password: the old one stops working."""
        self.command("user", "add", "alice@example.test", stdin="old\n")
        result = self.command("user", "passwd", "Alice@example.test", stdin="new\n")
        self.assertEqual(result, (0, f"password changed for {ALICE}\n", ""))
        self.assertIsNone(self.store().verify("alice@example.test", "old"))
        self.assertIsNotNone(self.store().verify("alice@example.test", "new"))

    def test_passwd_unknown(self) -> None:
        """Changing the password of nobody fails before asking for one."""
        self.assertUserError(
            self.command("user", "passwd", "bob@example.test", stdin=TerminalInput()),
            "no such user: bob@example.test",
        )
        self.assertEqual(self.prompts, [])

    def test_del(self) -> None:
        """C{user del} removes the user but leaves their mail, and says where."""
        self.command("user", "add", "alice@example.test", stdin="pw\n")
        maildir = self.state / "mail" / "example.test" / "alice"
        status, out, err = self.command("user", "del", "alice@example.test")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out, f"removed {ALICE}; their mail is left in {maildir}\n")
        self.assertEqual(self.store().addresses(), [])
        self.assertTrue((maildir / "new").is_dir())

    def test_del_unknown(self) -> None:
        """Removing nobody is an error."""
        self.assertUserError(
            self.command("user", "del", "bob@example.test"),
            "no such user: bob@example.test",
        )

    def test_corrupt_users_file(self) -> None:
        """A broken users file is named in one line, not a traceback."""
        self.state.mkdir()
        (self.state / "users.json").write_text("{")
        self.assertUserError(
            self.command("user", "list"), f"{self.state / 'users.json'}: not valid JSON"
        )

    def test_system_error(self) -> None:
        """When the system refuses (here: state_dir is a file), the reason
        is one line and the status is 1."""
        self.config.write_text('[server]\nstate_dir = "afile"\n')
        (self.base / "afile").write_text("")
        status, out, err = self.command("user", "add", ALICE, stdin="pw\n")
        self.assertEqual(status, 1)
        self.assertTrue(err.startswith("mailsys: "), err)
        self.assertEqual(err.count("\n"), 1)
        self.assertIn(str(self.base / "afile"), err)


class CheckConfigTests(CommandTestCase):
    """C{mailsys check-config}."""

    def test_ok(self) -> None:
        """A good file prints every effective setting, then OK and the file."""
        status, out, err = self.command("check-config")
        self.assertEqual((status, err), (0, ""))
        self.assertIn('names = ["example.test", "other.test"]', out)
        self.assertIn(f'state_dir = "{self.state}"', out)
        self.assertTrue(out.endswith(f"\nOK: {self.config}\n"), out)

    def test_bad_file(self) -> None:
        """A mistake in the file is one line naming the key, status 2."""
        for content, key in [
            ('[listen]\nsmtp = "tcp:abc"\n', "listen.smtp"),
            ("[server]\nhostnme = 'x'\n", "server.hostnme"),
            ('[domains]\nnames = "example.test"\n', "domains.names"),
        ]:
            with self.subTest(key=key):
                self.config.write_text(content)
                status, out, err = self.command("check-config")
                self.assertEqual((status, out), (2, ""))
                self.assertTrue(err.startswith(f"mailsys: {self.config}: {key}: "), err)
                self.assertEqual(err.count("\n"), 1)

    def test_bad_file_for_user_command(self) -> None:
        """Every command refuses to work from a broken file, the same way."""
        self.config.write_text("[server\n")
        status, out, err = self.command("user", "add", ALICE, stdin="pw\n")
        self.assertEqual(status, 2)
        self.assertTrue(err.startswith(f"mailsys: {self.config}: not valid TOML"), err)
        self.assertFalse(self.state.exists())

    def test_missing_file(self) -> None:
        """A configuration file that does not exist is named."""
        missing = self.base / "nope.toml"
        self.config = missing
        self.assertUserError(
            self.command("check-config"),
            f"{missing}: cannot read: No such file or directory",
        )

    def test_development(self) -> None:
        """Without --config the development instance in the current
        directory is used, as by C{twistd -n mailsys}."""
        cwd = os.getcwd()
        os.chdir(self.base)
        self.addCleanup(os.chdir, cwd)
        status, out, _ = self.command("check-config", config=False)
        self.assertEqual(status, 0)
        self.assertTrue(out.endswith("\nOK: development instance\n"), out)
        self.command("user", "add", "dev@example.test", stdin="pw\n", config=False)
        users = json.loads((self.base / "var" / "users.json").read_text())["users"]
        self.assertEqual(list(users), ["dev@example.test"])
        maildir = self.base / "var" / "mail" / "example.test" / "dev"
        self.assertTrue((maildir / "new").is_dir())


class UsageTests(CommandTestCase):
    """Mistakes in the command line itself."""

    def test_usage_errors(self) -> None:
        """A missing or unknown command prints usage and returns 2 instead
        of exiting the caller."""
        for argv in [(), ("user",), ("frobnicate",), ("user", "add")]:
            with self.subTest(argv=argv):
                status, out, err = self.command(*argv)
                self.assertEqual((status, out), (2, ""))
                self.assertIn("usage: mailsys", err)
                self.assertNotIn("Traceback", err)

    def test_help(self) -> None:
        """C{--help} lists the commands and returns 0."""
        status, out, _ = self.command("--help", config=False)
        self.assertEqual(status, 0)
        self.assertIn("user", out)
        self.assertIn("check-config", out)

    def test_parser_extensible(self) -> None:
        """A further command is one function appended to COMMANDS."""
        calls: list[Config] = []

        def add_hello(commands: Any) -> None:
            commands.add_parser("hello").set_defaults(
                run=lambda cfg, args: calls.append(cfg) or 0
            )

        self.patch(cli, "COMMANDS", cli.COMMANDS + [add_hello])
        self.assertEqual(self.command("hello"), (0, "", ""))
        self.assertEqual(calls[0].path, self.config)


class ProcessTests(SynchronousTestCase):
    """C{python -m mailsys.cli} as a real process, the way scripts call it."""

    def mailsys(self, *argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        # The package under test, not whatever copy is installed.
        source = str(Path(mailsys.__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=source)
        return subprocess.run(
            [sys.executable, "-b", "-m", "mailsys.cli", *argv],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    def test_process(self) -> None:
        """A piped password adds a user; a bad config exits 2 with one line
        and no traceback."""
        base = Path(self.mktemp())
        base.mkdir()
        config = base / "mailsys.toml"
        config.write_text(CONFIG)
        added = self.mailsys("-c", str(config), "user", "add", ALICE, stdin="pw\n")
        self.assertEqual((added.returncode, added.stderr), (0, ""))
        listed = self.mailsys("--config", str(config), "user", "list")
        self.assertEqual(listed.stdout, "alice@example.test\n")
        self.assertIsNotNone(
            UserStore(base / "var" / "users.json").verify("alice@example.test", "pw")
        )
        config.write_text('[listen]\nsmtp = "tcp:abc"\n')
        broken = self.mailsys("--config", str(config), "check-config")
        self.assertEqual(broken.returncode, 2)
        self.assertEqual(broken.stderr.count("\n"), 1)
        self.assertIn("listen.smtp", broken.stderr)
        self.assertNotIn("Traceback", broken.stderr)
