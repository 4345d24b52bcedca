"""The package's code runs on every Python that pyproject.toml's requires-python admits."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_code_needs_no_python_newer_than_requires_python():
    """Python 3.11's hashlib.file_digest failed every prior sweep's check on 3.10, which the package admits."""
    oldest = re.search(r'requires-python\s*=\s*">=\s*([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    found = subprocess.run([sys.executable, "-c", "from vermin.main import main; raise SystemExit(main())", f"-t={oldest}-", "--violations", "--no-tips",
                            "jobs", "stages", "cluster", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert found.returncode == 0, found.stdout + found.stderr
