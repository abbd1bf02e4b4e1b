"""Every moved import path still imports, warns, and gives the new module's objects (CHANGELOG.md lists them)."""

import importlib
import sys
import warnings

import pytest

from gradprobe.deprecated import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_import_path_forwards_with_a_warning(old):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) and MOVED[old] in str(w.message) for w in caught)
    new = importlib.import_module(MOVED[old])
    public = [n for n in vars(new) if not n.startswith("_") and callable(getattr(new, n))]
    assert public, MOVED[old]
    for name in public:
        assert getattr(module, name) is getattr(new, name)
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


def test_the_changelog_names_every_moved_path():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()
    for old, new in MOVED.items():
        assert f"`{old}`" in text and f"`{new}`" in text, old
