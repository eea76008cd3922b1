"""The repository explains itself: nothing cites a document that lives outside it.

The facts the code relies on are written in ``docs/reference/``; a citation of the research notes or
the design card the project started from (which a reader who clones the repository does not have)
would send that reader nowhere.
"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(
    r"\b(lo_spec|celo_spec|celo2_spec|mup_lightning|offline_data|pylo_anchor)\b|DESIGN contract|DESIGN\.md|\.\./shared"
)
TEXT = (".py", ".md", ".yaml", ".yml", ".toml", ".json", ".c", ".sh", ".txt")


def test_no_file_cites_a_document_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in files:
        if not name.endswith(TEXT) or name == "tests/test_self_contained.py":
            continue
        for number, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not hits, "cite docs/reference/ instead:\n" + "\n".join(hits)


def test_the_check_finds_a_citation():
    assert OUTSIDE.search("the features of lo_spec §1.5")
    assert OUTSIDE.search("see DESIGN contract 2")
    assert not OUTSIDE.search("see docs/reference/small_fc.md#features")
