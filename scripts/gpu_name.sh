#!/usr/bin/env bash
# Prints a short, file-name-safe name of GPU 0 for results folders ("NVIDIA H100 80GB HBM3" -> h100).
python3 -c '
import re, torch
words = re.split(r"[\s_-]+", torch.cuda.get_device_name(0).lower())
print(next((w for w in words if re.search(r"\d", w)), "gpu"))'
