"""`python -m knetlab` is the `knetlab` command line."""

from knetlab.platform.cli import main

raise SystemExit(main())
