"""Runs ``rdn-client`` as a subprocess, as a user would (the declared console script)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CLI_TIMEOUT = 60  # seconds per subprocess
RDN_CLIENT = Path(sys.executable).with_name("rdn-client")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [str(RDN_CLIENT)] if RDN_CLIENT.exists() else [sys.executable, "-m", "server.client"]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False
    )
