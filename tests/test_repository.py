"""The repository stands alone: its code and docs cite no file outside it."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_no_citation_of_files_outside_the_repository():
    outside = "REFERENCE" + ".md"  # the steering notes beside the checkout, which readers of the product lack
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    citing = [f for f in tracked if (REPO / f).is_file() and outside in (REPO / f).read_text(errors="ignore")]
    assert not citing, citing
