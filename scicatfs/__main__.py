"""Allow ``python -m scicatfs``."""

from scicatfs.cli import main

raise SystemExit(main())
