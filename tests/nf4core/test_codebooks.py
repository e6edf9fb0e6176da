import numpy as np
import pytest

import nf4core
from nf4core.codebooks import NF4_BOUNDS


def test_nf4_table_is_derived_from_normal_quantiles():
    derived = nf4core.nf4_code_from_normal_quantiles()
    np.testing.assert_allclose(derived, nf4core.NF4_CODE, rtol=0, atol=1e-6)


def test_dynamic_map_matches_its_definition_to_one_float32_ulp():
    derived = nf4core.dynamic_map_from_definition()
    exact = nf4core.DYNAMIC_MAP_SIGNED.astype(np.float64)
    assert derived.shape == (256,)
    ulp = np.spacing(np.abs(nf4core.DYNAMIC_MAP_SIGNED)).astype(np.float64)
    assert np.all(np.abs(derived - exact) <= 1.5 * ulp)


def test_tables_equal_bitsandbytes_bit_for_bit():
    from tests.nf4core.bnb_oracle import F

    bnb_nf4 = F.get_4bit_type("nf4", device="cpu").numpy()
    bnb_dynamic = F.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8).numpy()
    assert nf4core.NF4_CODE.tobytes() == bnb_nf4.astype(np.float32).tobytes()
    assert nf4core.DYNAMIC_MAP_SIGNED.tobytes() == bnb_dynamic.astype(np.float32).tobytes()


def test_tables_are_sorted_and_read_only():
    for table in (nf4core.NF4_CODE, nf4core.DYNAMIC_MAP_SIGNED, NF4_BOUNDS):
        assert np.all(np.diff(table) > 0)
        with pytest.raises(ValueError):
            table[0] = 0.0
    assert nf4core.NF4_CODE[7] == 0.0
