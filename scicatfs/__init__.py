"""scicatfs: a SciCat catalog as a read-only filesystem.

Datasets appear as directories named by their PID; each holds ``metadata.json``
(the catalog record) and the dataset's files, which are fetched lazily over
SFTP into a persistent local cache.
"""

__version__ = "0.1.0"
