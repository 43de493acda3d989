"""``python -m scicatfs.commands``: the commands of this package without the full front end."""

import sys

from scicatfs.commands import main

sys.exit(main())
