"""The data section of the form: its choices, fields and one-string form all come from the source registry."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.cli import build_parser, overrides_from
from cluster.recipes import get_recipe
from flows.params import PRESETS, DataParams, build_params
from tasks.sources import SOURCES


def test_the_kind_choices_are_the_registry():
    schema = DataParams.model_json_schema()["properties"]
    assert schema["kind"]["enum"] == list(SOURCES)
    for record in SOURCES.values():
        assert f"{record.name}: {record.description}" in schema["kind"]["description"]
        for key, kind in record.options.items():  # every option is a form field of its own
            field = DataParams.model_fields[f"{record.name}_{key}"]
            assert field.title and field.description.startswith(f"Only for '{record.name}'")
            assert kind is bool if field.annotation is bool else kind is str


@pytest.mark.parametrize("text, fields", [
    ("digits", {"kind": "digits", "path": ""}),
    ("folder:/data/cats", {"kind": "folder", "path": "/data/cats"}),
    ("tfds:mnist", {"kind": "tfds", "path": "mnist", "tfds_data_dir": None, "tfds_download": False}),
    ("tfds:my_set/cfg:1.0.0?data_dir=/d&download=true",
     {"kind": "tfds", "path": "my_set/cfg:1.0.0", "tfds_data_dir": "/d", "tfds_download": True}),
])
def test_the_one_string_form_and_the_fields_agree(text: str, fields: dict):
    params = DataParams(dataset=text)
    assert params.model_dump(include=set(fields)) == fields
    assert params.dataset == text
    assert DataParams(**fields).dataset == text


def test_labels():
    assert DataParams(dataset="folder:/data/cats/").label == "folder:cats"
    assert DataParams(dataset="tfds:cifar10:3.0.2?data_dir=/d").label == "tfds:cifar10:3.0.2"
    assert DataParams().label == "digits"


@pytest.mark.parametrize("fields, words", [
    ({"kind": "tfds"}, ["data.path is empty", "'tfds'", "TFDS dataset name"]),
    ({"kind": "folder"}, ["data.path is empty", "'folder'"]),
    ({"kind": "digits", "path": "x"}, ["data.path is set", "'folder' or 'tfds'"]),
    ({"kind": "digits", "tfds_download": True}, ["data.tfds_download is set", "choose 'tfds'"]),
    ({"kind": "folder", "path": "/x", "tfds_data_dir": "/d"}, ["data.tfds_data_dir is set", "'folder'"]),
    ({"kind": "tfds", "path": "Not A Name"}, ["'Not A Name' is not a TFDS dataset name"]),
    ({"kind": "imagenet"}, ["kind", "'digits'", "'tfds'"]),
])
def test_fields_that_do_not_go_together_are_refused(fields: dict, words: list[str]):
    with pytest.raises(ValidationError) as info:
        DataParams(**fields)
    for word in words:
        assert word in str(info.value)


def test_cli_options_reach_the_form():
    args = build_parser().parse_args(["run", "--dataset", "tfds:mnist", "--tfds-data-dir", "/data/tfds",
                                 "--tfds-download"])
    params = build_params("smoke", overrides_from(args))
    assert params.data.dataset == "tfds:mnist?data_dir=/data/tfds&download=true"
    assert "tfds:<name>[/<config>][:<version>]" in build_parser()._subparsers._group_actions[0].choices["run"].format_help()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_and_its_recipe_takes_its_framework_and_images(preset):
    params = build_params(preset)
    get_recipe(params.train.recipe).check(params.train.framework, params.data.image_size)
