"""What setup.py promises pip: the Python versions it accepts must be ones its dependencies install on."""

import re
from importlib.metadata import PackageNotFoundError, metadata, requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def test_python_requires_is_no_looser_than_any_dependency():
    """Every Python 3.x that setup.py's python_requires accepts must be accepted by each dependency installed here
    (the pinned diffusers 0.42.1 needs 3.11): a looser promise lets pip start on an interpreter where it then cannot
    find diffusers, with a message that does not say why."""
    ours = SpecifierSet(re.search(r'python_requires="([^"]+)"', (ROOT / "setup.py").read_text()).group(1))
    checked = {}
    for line in requires("pipeline-ddpm-custom") or []:  # core and every extra
        name = Requirement(line).name
        try:
            checked[name] = SpecifierSet(metadata(name).get("Requires-Python") or "")
        except PackageNotFoundError:
            continue
    assert "diffusers" in checked and "torch" in checked, sorted(checked)
    for minor in range(8, 16):
        version = Version(f"3.{minor}.0")
        if version in ours:
            refusing = sorted(name for name, theirs in checked.items() if version not in theirs)
            assert not refusing, f"setup.py accepts Python {version}, which {refusing} do not install on"
