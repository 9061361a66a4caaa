"""``python -m vhdfs`` runs the mount command."""

from vhdfs.cli.mount_cmd import main

raise SystemExit(main())
