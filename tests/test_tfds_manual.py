"""ImageNet through TFDS, prepared from --manual_dir: what goes wrong there is
one line naming the folder, never a TFDS traceback."""

import pytest

import pipelines

pytest.importorskip("tensorflow_datasets")


def _describe(manual_dir, data_dir):
    return pipelines.describe_source("imagenet2012", "val", manual_dir=str(manual_dir),
                                     data_dir=str(data_dir))


def test_an_empty_or_missing_manual_dir_is_one_line_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    for manual_dir in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ValueError) as raised:
            _describe(manual_dir, tmp_path / "tfds")
        message = str(raised.value)
        assert "\n" not in message
        assert f"manual_dir {manual_dir} does not exist or is empty" in message
        assert "ILSVRC2012_img_train.tar" in message


def test_a_manual_dir_without_the_tars_is_one_line_from_tfds(tmp_path):
    # TFDS' preparation imports importlib_resources, which tensorflow-datasets
    # doesn't install on Python >= 3.9: it failed with ModuleNotFoundError.
    manual_dir = tmp_path / "downloads"
    manual_dir.mkdir()
    (manual_dir / "notes.txt").write_text("not a tar")
    with pytest.raises(ValueError) as raised:
        _describe(manual_dir, tmp_path / "tfds")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("TFDS could not prepare imagenet2012 in ")
    assert f"from manual_dir {manual_dir}" in message
