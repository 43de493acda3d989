"""An embedded SciCat-compatible catalog and SFTP server for the demo and the tests."""
