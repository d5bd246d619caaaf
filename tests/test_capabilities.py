"""The capability-table reader: one table, every kind of need, and the reason each one words."""

import dataclasses

import torch

from fp8dispatch.capabilities import Capabilities, Serves
from fp8dispatch.grouped import GroupedLinearProblem
from fp8dispatch.problem import dequantize_problem, matmul_problem, quantize_problem

E4M3, E5M2, BF16 = torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16
CUDA = torch.device("cuda")  # a device object only: nothing here touches a GPU
GROUP, BLOCK = (1, 128), (128, 128)

TABLE = Capabilities("Lib", (
    Serves("matmul", "row", "lib_rowwise", None, (E4M3,), (BF16,), archs=((9, 0), (10, 0)),
           multiples=(("K", 16), ("N", 8)), bias="any", why={"arch": "sm_90a and sm_100a cubins"}),
    Serves("matmul", "block", "lib_blockwise", (GROUP, BLOCK), min_arch=(8, 9), multiples=(("K", 128),),
           bias="out_dtype", why={"K": "tails are unverified"}),
    Serves("dequantize", "row", "lib_dequant_row", out_dtypes=(BF16,), multiples=(("rows", 16),)),
), declined={"quantize": "Lib's quantizers are not offered"}, elsewhere={"matmul": "tensor goes to backend other"})


def matmul(recipe, m=256, n=256, k=256, capability=(9, 0), **options):
    blocks = {"row": ((1, k), (k, 1)), "block": (GROUP, BLOCK), "tensor": ((m, k), (k, n))}[recipe]
    return matmul_problem(CUDA, m, n, k, *blocks, capability=capability, **options)


def test_a_served_problem_has_no_reasons_and_names_its_row():
    assert TABLE.check(matmul("row")) == ([], TABLE.serves[0])
    assert TABLE.check(matmul("block", capability=(8, 9))) == ([], TABLE.serves[1])


def test_each_need_names_the_quantity_what_is_needed_and_what_was_seen():
    reasons, row = TABLE.check(matmul("row", n=100, k=40, capability=(8, 9), a_dtype=E5M2,
                                      out_dtype=torch.float16, a_row_major=False))
    assert row is TABLE.serves[0]
    assert reasons == [
        "lib_rowwise runs on sm90 and sm100 only (sm_90a and sm_100a cubins), this GPU is sm89",
        "a, b: lib_rowwise takes float8_e4m3fn only, got torch.float8_e5m2 × torch.float8_e4m3fn",
        "out_dtype: lib_rowwise writes bf16 only, asked torch.float16",
        "a: needs row-major contiguous [M, K] data (call .contiguous())",
        "K=40: needs K % 16 == 0",
        "N=100: needs N % 8 == 0",
    ]
    reasons, _ = TABLE.check(matmul("block", k=200, capability=(8, 6), bias_dtype=torch.float16))
    assert reasons == [
        "lib_blockwise needs sm89 or newer, this GPU is sm86",
        "bias: a torch.float16 bias with torch.bfloat16 output cannot ride in lib_blockwise's epilogue (it takes "
        "the output's dtype), and adding it afterwards would round twice; fp32 output takes any bias",
        "K=200: needs K % 128 == 0 (tails are unverified)",
    ]
    reasons, _ = TABLE.check(dequantize_problem(CUDA, (100, 64), (1, 64), out_dtype=torch.float32, capability=(9, 0),
                                                contiguous=False))
    assert reasons == ["dtype: lib_dequant_row writes bf16 only, asked torch.float32",
                       "t: needs contiguous data (call .contiguous())", "rows=100: needs rows % 16 == 0"]


def test_grouped_linear_rows_read_x_and_w_and_run_their_value_checks():
    table = Capabilities("Lib", (
        Serves("grouped_linear", "row", "lib_grouped", None, (E4M3,), (BF16,), archs=((9, 0),), multiples=(("N", 8),),
               checks=(lambda row, p, found: found, lambda row, p, found: None)),
    ))
    problem = GroupedLinearProblem(CUDA, (9, 0), "contiguous", "row", E5M2, E4M3, 4, 64, 100, 256, (1, 256),
                                   (1, 256), torch.int64, False, False, BF16, torch.float16)
    reasons, row = table.check(problem, "what the probe found")
    assert row is table.serves[0] and reasons == [
        "x, w: lib_grouped takes float8_e4m3fn only, got torch.float8_e5m2 × torch.float8_e4m3fn",
        "bias: lib_grouped has no bias epilogue, and adding it afterwards would round twice (bf16 output)",
        "x: needs row-major contiguous data (call .contiguous())",
        "w: needs contiguous [G, N, K] data and scales (build it from .contiguous() ones)",
        "N=100: needs N % 8 == 0",
        "what the probe found",
    ]
    block = dataclasses.replace(problem, recipe="block", x_block=GROUP, w_block=BLOCK)
    assert table.check(block, None) == (["recipe block (blocks (1, 128) × (128, 128)): Lib serves row only"], None)


def test_a_bias_rides_in_the_epilogue_or_on_an_fp32_output():
    assert TABLE.check(matmul("row", bias_dtype=torch.float16))[0] == []  # bias="any"
    assert TABLE.check(matmul("block", bias_dtype=BF16))[0] == []  # the output's dtype
    assert TABLE.check(matmul("block", bias_dtype=torch.float16, out_dtype=torch.float32))[0] == []


def test_what_the_table_does_not_serve_stops_the_check():
    assert TABLE.check(matmul("tensor")) == (
        ["recipe tensor (blocks (256, 256) × (256, 256)): Lib serves row and 1×128 · 128×128 only; "
         "tensor goes to backend other"], None)
    odd = matmul_problem(CUDA, 256, 256, 256, (1, 64), (64, 64), capability=(9, 0))
    assert TABLE.check(odd)[0] == ["recipe block (blocks (1, 64) × (64, 64)): Lib serves row and 1×128 · 128×128 "
                                   "only; tensor goes to backend other"]
    assert TABLE.check(quantize_problem(CUDA, (4, 256), GROUP, capability=(9, 0))) == (
        ["Lib's quantizers are not offered"], None)
    cpu = dataclasses.replace(matmul("row"), device=torch.device("cpu"), capability=None)
    assert TABLE.check(cpu) == (["needs a CUDA tensor, got device cpu"], None)
