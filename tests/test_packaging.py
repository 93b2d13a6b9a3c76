"""The wheel ships the templates and cards as package data, and the console script."""

import subprocess
import sys
import zipfile

import pytest


@pytest.mark.slow
def test_wheel_contains_templates_cards_and_entry_point(tmp_path):
    pytest.importorskip("build")
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(root)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("hf_instruct_tune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for template in ("alpaca", "alpaca-zh", "alpaca-no-input", "llama-3", "chatml"):
        assert f"hf_instruct_tune/templates/{template}.jinja" in names
    assert "hf_instruct_tune/cards/adapter.md.jinja" in names
    assert "hf_instruct_tune/py.typed" in names
    assert not any(name.startswith(("templates/", "cards/", "tests/")) for name in names)
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "hf-instruct-tune = hf_instruct_tune.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_templates_are_importable_resources():
    from importlib.resources import files

    assert files("hf_instruct_tune.templates").joinpath("alpaca-zh.jinja").is_file()
    assert files("hf_instruct_tune.cards").joinpath("adapter.md.jinja").is_file()
