"""Shared fixtures: each family lives in tests/support/ and is re-exported here."""

from tests.support.catalog import *  # noqa: F401,F403  catalog server fixtures
from tests.support.sshd import *  # noqa: F401,F403  OpenSSH sshd fixtures
from tests.support.mounts import *  # noqa: F401,F403  FUSE mount fixtures
from tests.support.short_sftp import *  # noqa: F401,F403  short-answering SFTP server
from tests.support.nginx import *  # noqa: F401,F403  nginx fixtures (HTTP sources)
from tests.support.checklogs import log_checker  # noqa: F401  fails tests on undeclared warnings
