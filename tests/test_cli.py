import subprocess
import sys

from mp_eplb import __version__


def test_version_flag_prints_version() -> None:
    out = subprocess.run([sys.executable, "-m", "mp_eplb", "--version"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == f"mp-eplb {__version__}"
