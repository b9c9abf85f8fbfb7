"""The shared comparison helper fails where it should."""
import pytest
import torch

from tests.utils import assert_all_close


def test_assert_all_close_reports_mismatch_nonfinite_and_shape():
    a = torch.tensor([1.0, 2.0])
    assert_all_close({"same": (a, a.clone())}, rtol=0.0)
    with pytest.raises(AssertionError, match=r"mismatch in \['b'\]"):
        assert_all_close({"a": (a, a), "b": (a + 1e-3, a)}, rtol=1e-5)
    with pytest.raises(AssertionError, match="NON-FINITE"):
        assert_all_close({"nan": (torch.tensor([float("nan"), 2.0]), a)}, rtol=1.0)
    with pytest.raises(AssertionError, match="shape"):
        assert_all_close({"shape": (a[:1], a)}, rtol=1.0)
    assert_all_close({"atol": (a + 1e-7, a)}, rtol=0.0, atol=1e-6)
