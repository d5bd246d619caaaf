"""What a migrating user reaches for: an Fp8Tensor indexes like its tuple; fp8dispatch.nn and
fp8dispatch.compat are attributes of the package, and importing the package stays free."""

import subprocess
import sys

import pytest
import torch

import fp8dispatch
from fp8dispatch import Fp8IndexError, Fp8TypeError


@pytest.fixture(scope="module")
def t():
    return fp8dispatch.quantize(torch.randn(4, 256), "group", backend="reference")


def test_indexes_like_the_tuple_it_unpacks_as(t):
    as_tuple = tuple(t)
    for i in range(-3, 3):
        assert t[i] is as_tuple[i]
    assert t[:2] == as_tuple[:2] and t[::-1] == as_tuple[::-1] and len(t) == 3
    assert t[0].dtype == torch.float8_e4m3fn and t[2] == (1, 128)


@pytest.mark.parametrize("index, error", [(3, Fp8IndexError), (-4, Fp8IndexError), ("data", Fp8TypeError),
                                          (1.0, Fp8TypeError)])
def test_a_bad_index_is_a_typed_error(t, index, error):
    with pytest.raises(error, match="index"):
        t[index]
    assert issubclass(Fp8IndexError, IndexError)


def test_nn_and_compat_are_attributes_and_import_stays_free():
    code = ("import sys, fp8dispatch\n"
            "print('torch' in sys.modules, 'fp8dispatch.nn' in sys.modules)\n"
            "print(fp8dispatch.nn.Fp8Linear.__name__, fp8dispatch.compat.__name__, len(fp8dispatch.backend_names()) > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["False", "False", "Fp8Linear", "fp8dispatch.compat", "True"], out.stdout + out.stderr


def test_every_public_name_resolves():
    for name in fp8dispatch.__all__:
        assert getattr(fp8dispatch, name) is not None
    with pytest.raises(AttributeError):
        fp8dispatch.no_such_name
