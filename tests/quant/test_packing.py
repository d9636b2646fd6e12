import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.quant.packing import pack_codes, packed_length, unpack_codes
from tests.quant import reference


def test_hand_computed_layouts():
    # int4: first code in the low nibble
    assert np.asarray(pack_codes(jnp.array([1, 2, 3]), 4)).tolist() == [0x21, 0x03]
    # int2: four codes per byte, first in bits 1:0
    assert np.asarray(pack_codes(jnp.array([1, 2, 3, 0, 3]), 2)).tolist() == [0b00111001, 0b11]
    # int3: 8 codes -> 24-bit little-endian word 1|2<<3|...|7<<18 = 0x1F58D1
    assert np.asarray(pack_codes(jnp.array([1, 2, 3, 4, 5, 6, 7, 0]), 3)).tolist() == [0xD1, 0x58, 0x1F]
    assert np.asarray(pack_codes(jnp.array([255, 0, 7]), 8)).tolist() == [255, 0, 7]


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_pack_unpack_exact_for_all_values(bits):
    values = np.arange(2**bits)
    codes = np.stack([np.roll(values, i) for i in range(3)], axis=1)  # every value in every run slot
    codes = np.tile(codes, (5, 1))
    packed = pack_codes(jnp.asarray(codes), bits, axis=0)
    assert packed.dtype == jnp.uint8
    assert packed.shape == (packed_length(codes.shape[0], bits), 3)
    np.testing.assert_array_equal(np.asarray(unpack_codes(packed, bits, codes.shape[0], axis=0)), codes)
    np.testing.assert_array_equal(reference.unpack(np.asarray(packed), bits, codes.shape[0], axis=0), codes)


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([8, 4, 3, 2]), k=st.integers(1, 40), n=st.integers(1, 4), axis=st.sampled_from([0, 1]),
       seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_random(bits, k, n, axis, seed):
    shape = (k, n) if axis == 0 else (n, k)
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=shape)
    packed = pack_codes(jnp.asarray(codes), bits, axis=axis)
    assert packed.shape[axis] == packed_length(k, bits)
    np.testing.assert_array_equal(np.asarray(unpack_codes(packed, bits, k, axis=axis)), codes)
    np.testing.assert_array_equal(reference.unpack(np.asarray(packed), bits, k, axis=axis), codes)


@pytest.mark.parametrize("bits,k,expected", [(8, 5, 5), (4, 5, 3), (3, 5, 3), (3, 9, 6), (2, 5, 2), (2, 8, 2)])
def test_packed_length(bits, k, expected):
    assert packed_length(k, bits) == expected


def test_unsupported_bits():
    with pytest.raises(ValueError, match="5-bit"):
        pack_codes(jnp.zeros(4, jnp.int32), 5)
