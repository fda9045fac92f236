"""``python -m server.client``: the ``rdn-client`` command line."""

import sys

from server.client.cli import main

sys.exit(main())
