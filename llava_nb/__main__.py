"""`python -m llava_nb`: the same as the `llava-nb` command."""

from llava_nb.cli import main

raise SystemExit(main())
