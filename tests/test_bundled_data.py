"""The bundled data names resolve inside a clone, and say clearly when the package is not in one."""

import os

import pytest

from pi_jax import data


@pytest.mark.parametrize("name", sorted(data.BUNDLED))
def test_bundled_names_resolve_in_the_repository(name):
  path = data.resolve_spec(name)
  assert os.path.isdir(path) and path == data.BUNDLED[name]
  assert data.resolve_spec("some/dir") == "some/dir"  # anything else passes through


def test_bundled_name_outside_a_clone_says_it_needs_the_repository(monkeypatch, tmp_path):
  # what an installed wheel sees: no data/ beside the package
  monkeypatch.setitem(data.BUNDLED, "pg19_standin", str(tmp_path / "data" / "pg19_standin"))
  with pytest.raises(FileNotFoundError, match="bundled data set.*repository's data/ folder"):
    next(data.iter_documents("pg19_standin"))
