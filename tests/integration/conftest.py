import itertools
from typing import Iterator

import pytest

from tests.integration.changing_trees import EXAMPLES, Bases
from tests.integration.helpers import Workspace


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Bases:
    """Base trees, aged, for a module's property over changing trees: one per example."""
    return Bases(tmp_path_factory.mktemp("bases"), EXAMPLES + 5)


@pytest.fixture
def examples() -> Iterator[int]:
    """Numbers for the examples of a property, each its own directory."""
    return itertools.count()
