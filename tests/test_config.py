"""params.yaml: typed, seed-compatible keys, and errors that say which key is wrong and what to do."""

from __future__ import annotations

import pytest

from flux2lora.config import ParamsError, load_params, parse_params, parse_resolutions


def test_repo_params_file_is_valid():
    from helpers import REPO

    params = load_params(REPO / "params.yaml")
    assert params.model.flavour.name == "tiny-klein-4b"
    assert params.validate_.resolutions == [(64, 64)]


def test_defaults_are_klein_9b_on_its_base_repo():
    params = parse_params({})
    assert params.model.model_flavour == "klein-9b"
    assert params.model.model_path == "black-forest-labs/FLUX.2-klein-base-9B"


def test_unknown_key_names_the_key_and_suggests_the_closest():
    with pytest.raises(ParamsError) as err:
        parse_params({"train": {"learning_rat": 1e-4}}, source="params.yaml")
    message = str(err.value)
    assert "params.yaml" in message and "train.learning_rat" in message and "'train.learning_rate'" in message


def test_unknown_section_is_an_error():
    with pytest.raises(ParamsError, match="unknown key 'trian'.*'train'"):
        parse_params({"trian": {}})


def test_bad_value_names_the_key():
    with pytest.raises(ParamsError, match="encode_latents.resolution"):
        parse_params({"encode_latents": {"resolution": 100}})
    with pytest.raises(ParamsError, match="model.model_flavour.*klein-4b"):
        parse_params({"model": {"model_flavour": "klein-5b"}})


def test_validation_resolutions_parse_lists():
    assert parse_resolutions("1024x1024, 768x1344") == [(1024, 1024), (768, 1344)]
    assert parse_resolutions("512") == [(512, 512)]
    with pytest.raises(ValueError, match="multiples of 16"):
        parse_resolutions("1000x1000")


def test_flat_params_cover_every_section():
    flat = parse_params({}).flat()
    assert flat["train.learning_rate"] == 1e-4
    assert "validate.validation_resolution" in flat and "model.model_flavour" in flat


def test_a_refused_uri_with_credentials_is_echoed_without_them():
    """A refused value is echoed in the message (which reaches logs and Prefect's task log): a URL's
    user:password part never is."""
    from flux2lora.config import ParamsError, parse_params

    with pytest.raises(ParamsError) as caught:
        parse_params({"runtime": {"storage": "s3://AKIAEXAMPLEKEY:wJalrEXAMPLESECRET@bucket/prefix"}})
    message = str(caught.value)
    assert "runtime.storage" in message and "credentials do not belong in the URI" in message
    assert "AKIAEXAMPLEKEY" not in message and "wJalrEXAMPLESECRET" not in message
    assert "s3://***@bucket/prefix" in message
