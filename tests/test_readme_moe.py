"""README's mixture-of-experts example runs as written (on CPU, a small layer, the reference backend)."""

import re
from pathlib import Path

import torch

import fp8dispatch as fd

README = Path(__file__).parents[1] / "README.md"
G, H, I = 8, 256, 128


def _layer(prefix):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"{prefix}gate.weight": torch.randn(G, H, generator=gen)}
    for e in range(G):
        for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            q = fd.quantize(torch.randn(*shape, generator=gen) / 16, "block")
            tensors[f"{prefix}experts.{e}.{name}.weight"] = q.data
            tensors[f"{prefix}experts.{e}.{name}.weight_scale_inv"] = q.scale
    return tensors


def test_the_moe_example_runs_and_matches_a_per_token_loop(sandbox):
    sandbox.env(FP8DISPATCH_BACKEND="reference")
    block = re.search(r"### Mixture of experts\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace = {"load_layer": _layer}
    exec(compile(block.replace('"cuda"', '"cpu"'), str(README), "exec"), namespace)
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    got = namespace["moe"](x, top_k=2)
    experts, router = namespace["experts"], namespace["router"]
    weights, chosen = torch.topk(torch.softmax(x.float() @ router.float().T, dim=-1), 2)
    for t in range(5):  # token t alone, through each of its experts
        want = sum(w * experts(x[t:t + 1], torch.tensor([0] * (e + 1) + [1] * (G - e))).float()[0]
                   for w, e in zip(weights[t].tolist(), chosen[t].tolist()))
        assert torch.allclose(got[t].float(), want, rtol=0.02, atol=0.02)
