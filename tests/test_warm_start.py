"""A second process compiling the same model loads the lowered blocks from torch's on-disk
caches (Inductor's FX graph cache and the AOTAutograd cache) instead of lowering them again."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COMPILE = """
import json, torch, astraea
from torch._dynamo.utils import counters
from tests.models import sample, wan
family = wan(layers=3)
be = astraea.backend(schedule=[1.0, 0.5], lowering="inductor")
out = sample(family, torch.compile(family.model, backend=be), steps=2)
print(json.dumps({"aot": dict(counters["aot_autograd"]), "inductor": dict(counters["inductor"]),
                  "out": out.flatten()[:8].tolist()}))
"""


def compile_in_a_new_process(cache_dir: Path) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_lowered_blocks(tmp_path):
    cold = compile_in_a_new_process(tmp_path)
    warm = compile_in_a_new_process(tmp_path)
    # The cold process lowers the block once (three blocks share it), then its skip-free schedule
    # needs nothing else; the warm one finds it in both caches.
    assert cold["aot"].get("autograd_cache_miss") == 1 and cold["inductor"].get("fxgraph_cache_miss") == 1
    assert warm["aot"].get("autograd_cache_hit") == 1 and "autograd_cache_miss" not in warm["aot"]
    assert "autograd_cache_bypass" not in warm["aot"]
    assert warm["out"] == cold["out"]
