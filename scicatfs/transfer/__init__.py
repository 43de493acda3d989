"""SFTP transfers: the only layer that knows asyncio and asyncssh exist."""
