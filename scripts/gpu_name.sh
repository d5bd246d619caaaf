#!/usr/bin/env bash
# Prints a short, file-name-safe name of GPU 0 for results folders ("NVIDIA H100 80GB HBM3" -> h100),
# the name fp8dispatch gives shipped routing tables and '{gpu}' in output paths.
python3 -c 'from fp8dispatch.devices import current_gpu_slug; print(current_gpu_slug(0))'
