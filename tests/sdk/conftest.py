import pytest

from tests.sdk.scripted import serve_double


@pytest.fixture
def double():
    yield from serve_double()
