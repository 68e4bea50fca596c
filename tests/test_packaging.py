"""The installed package's metadata agrees with the package (one version source, issue 11)."""

import importlib.metadata

import rslora


def test_one_version():
    assert importlib.metadata.version("rslora") == rslora.__version__
    assert rslora.show_config(print_=False)["version"] == rslora.__version__
