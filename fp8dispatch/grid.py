"""What `bench` and `tune` measure by default: the ops and the shape grids, as plain data.

No torch here: `fp8dispatch bench --help` and `tune --help` quote these without importing it.
"""

# DeepSeek-V3's linear layers, (N, K): q_a, kv_a, q_b, kv_b, o_proj, shared-expert gate/up, down.
DEEPSEEK_NK = ((2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))
DEEPSEEK_M = (1, 16, 64, 128, 512, 4096, 8192)
SQUARES = (1024, 2048, 4096, 8192)
QUICK_M = (1, 128, 4096)
QUICK_NK = ((2112, 7168), (7168, 2048))
# --quick on a CPU checks the plumbing, not speed: a grid that finishes in seconds.
CPU_QUICK_M = (1, 64)
CPU_QUICK_NK = ((256, 512),)
OPS = ("matmul", "quantize", "linear", "grouped")  # grouped: fp8dispatch/bench_grouped.py
