"""The public API is what ``autoseg.__all__`` lists, and every name in it exists and is documented."""

import autoseg


def test_all_names_exist_and_have_docstrings():
    for name in autoseg.__all__:
        obj = getattr(autoseg, name)
        if callable(obj):
            assert obj.__doc__, f"autoseg.{name} has no docstring"


def test_stage_functions_are_not_shadowed_by_subpackages():
    import autoseg.fingerprint.extract  # noqa: F401  importing a submodule must not replace the function
    import autoseg.fingerprint.model  # noqa: F401

    assert callable(autoseg.fingerprint) and callable(autoseg.plan) and callable(autoseg.check)


def test_fingerprint_submodules_import_in_every_style():
    import autoseg.fingerprint.model as m
    from autoseg.fingerprint import model

    assert m is model and callable(autoseg.fingerprint)
