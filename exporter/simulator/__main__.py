"""Entry point for `python -m exporter.simulator`."""

from exporter.simulator import main

raise SystemExit(main())
