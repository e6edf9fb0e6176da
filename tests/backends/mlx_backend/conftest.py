import pytest

mx = pytest.importorskip("mlx.core")


@pytest.fixture(autouse=True)
def _cpu_default_device():
    """Tests that compare with numpy run on the CPU path unless marked metal."""
    yield
